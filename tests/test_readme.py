"""The README documents what the code has."""

import re
from pathlib import Path

from iteris_sd.app.recipe import recipe_fields
from iteris_sd.merge.methods import METHOD_NAMES

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_readme_documents_every_recipe_field_and_method():
    for f in recipe_fields():
        assert f"`{f.name}`" in README, f"README lacks the recipe field {f.name}"
    for m in METHOD_NAMES:
        assert f"| `{m}` |" in README, f"README's method table lacks {m}"


def test_readme_starts_with_the_two_commands_ci_runs():
    first = README.split("```")[1].strip().splitlines()[1:]
    assert len(first) == 2
    assert "iteris_sd demo" in first[0]
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    test_command = first[1].split("#")[0].strip()
    assert test_command in ci


def test_readme_and_docs_links_point_at_files_that_exist():
    root = Path(__file__).parent.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to a missing {target}"
