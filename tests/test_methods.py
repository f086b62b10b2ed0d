"""The one registry of merge methods: every method, run the same way."""

import pytest
import torch

from iteris_sd.merge import weight_space
from iteris_sd.merge.methods import METHOD_NAMES, METHODS, get_method
from iteris_sd.merge.options import MergeOptions


class _Problem:
    def __init__(self, factors):
        self.factors = factors


class _Calibration:
    """Only what a data-free method reads: each layer's factors per LoRA (None: untouched)."""

    def __init__(self, layers):
        self.layers = layers

    def problems(self):
        return {m: _Problem(f) for m, f in self.layers.items()}


def _factors(d_out, d_in, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g)


def test_the_registry_names_every_method_once_and_only_the_data_driven_ones_use_data():
    assert METHOD_NAMES == ("iteris", "regmean", "ssr", "stack", "linear", "concat", "svd", "ties", "dare")
    assert {m.name for m in METHODS.values() if m.uses_data} == {"iteris", "regmean", "ssr"}
    assert all(m.summary and name == m.name for name, m in METHODS.items())
    with pytest.raises(ValueError, match="unknown merge method 'stak'; use one of iteris, regmean, ssr, stack"):
        get_method("stak")


def test_a_weight_method_through_the_registry_is_its_layer_function_on_every_layer():
    a, b = _factors(6, 5, 2, 0), _factors(6, 5, 3, 1)
    cal = _Calibration({"x": [a, b], "y": [None, _factors(4, 3, 2, 2)]})
    options = MergeOptions(rank=2, density=0.5)
    out = get_method("ties").run(None, cal, options, None)
    want = weight_space.ties([a, b], 2, 0.5)
    torch.testing.assert_close(out.deltas["x"][0] @ out.deltas["x"][1], want.delta())
    assert set(out.deltas) == {"x", "y"} and out.energy["x"] == pytest.approx(want.energy)
    stacked = get_method("stack").run(None, cal, options, None)
    torch.testing.assert_close(stacked.deltas["x"][0] @ stacked.deltas["x"][1], a[0] @ a[1] + b[0] @ b[1])
    assert stacked.energy == {}  # exact: nothing truncated


def test_dare_draws_a_different_mask_per_layer_from_one_seed():
    f = _factors(8, 8, 4, 3)
    cal = _Calibration({"p": [f, f], "q": [f, f]})
    out = get_method("dare").run(None, cal, MergeOptions(seed=7), None)
    p, q = (out.deltas[m][0] @ out.deltas[m][1] for m in ("p", "q"))
    assert not torch.allclose(p, q)
    again = get_method("dare").run(None, cal, MergeOptions(seed=7), None)
    torch.testing.assert_close(again.deltas["p"][0] @ again.deltas["p"][1], p)
