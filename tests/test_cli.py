"""The command line's own help: every subcommand prints it and exits 0."""

import pytest

from iteris_sd.app.cli import main


@pytest.mark.parametrize("command", ["merge", "demo", "bench", "scale", "example-recipe"])
def test_every_subcommand_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m iteris_sd " + command)
    if command == "merge":  # every recipe field's flag, with help text that has a % in it
        assert "--memory_budget" in out and "10% of its total" in out
