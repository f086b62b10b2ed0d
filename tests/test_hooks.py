"""The forward hooks that apply low-rank deltas: in the layer's compute dtype, whatever the
dtype its weight is stored in."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iteris_sd.backends.hooks import hooked

STORAGE = [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16]


class StoredLinear(nn.Module):
    """A linear layer whose weight is stored in a low-precision dtype and cast to the input's
    dtype in forward, as ComfyUI's manual-cast layers do with fp8 and bf16 checkpoints."""

    def __init__(self, weight: torch.Tensor, storage: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight.to(storage), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


@pytest.mark.parametrize("storage", STORAGE, ids=str)
def test_delta_is_applied_in_the_compute_dtype_not_the_storage_dtype(storage):
    g = torch.Generator().manual_seed(0)
    layer = StoredLinear(torch.randn(6, 8, generator=g), storage)
    assert layer.weight.dtype == storage  # torch can create it on this CPU
    U, Z = torch.randn(6, 3, generator=g), torch.randn(3, 8, generator=g) * 0.37
    x = torch.randn(4, 8, generator=g)
    with torch.no_grad():
        base = layer(x)
        with hooked({"l": layer}, [{"l": (U, Z)}]):
            out = layer(x)
    expected = x @ Z.T @ U.T  # float32 throughout
    torch.testing.assert_close(out - base, expected, rtol=1e-5, atol=1e-5)
    rounded = x @ Z.to(storage).float().T @ U.to(storage).float().T  # the delta in the storage dtype
    assert float((rounded - expected).abs().max()) > 1e-3  # is measurably off: the check can tell
    # a bf16 input: the factors cast to bf16 (the compute dtype), not through the storage dtype
    x16 = x.to(torch.bfloat16)
    with torch.no_grad():
        base16 = layer(x16)
        with hooked({"l": layer}, [{"l": (U, Z)}]):
            out16 = layer(x16)
    assert out16.dtype == torch.bfloat16
    assert torch.equal(out16, base16 + F.linear(F.linear(x16, Z.to(torch.bfloat16)), U.to(torch.bfloat16)))
