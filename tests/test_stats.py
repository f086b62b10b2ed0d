"""Streamed statistics: conv inputs unfold into rows that reproduce the conv exactly."""

import pytest
import torch
import torch.nn.functional as F

from iteris_sd.stats import ConceptStats, ConvGeometry, layer_rows


@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), (1, 1), (1, 1)), ((1, 1), (1, 1), (0, 0)), ((3, 3), (2, 2), (1, 1))])
def test_conv_rows_times_flat_weight_equal_the_conv(kernel, stride, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, 7, generator=g)
    w = torch.randn(4, 5, *kernel, generator=g)
    geometry = ConvGeometry(kernel, stride, padding)
    rows = layer_rows(x, geometry)
    y = F.conv2d(x, w, None, stride, padding)
    expected = y.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(rows @ w.reshape(4, -1).T, expected, rtol=1e-5, atol=1e-5)


def test_linear_rows_flatten_leading_dims():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert layer_rows(x, None).shape == (6, 4)


def test_statistics_accumulate_in_batches_like_one_big_batch():
    g = torch.Generator().manual_seed(1)
    X, Xm = torch.randn(10, 3, generator=g), torch.randn(10, 3, generator=g)
    whole, parts = ConceptStats.zeros(3, torch.float64), ConceptStats.zeros(3, torch.float64)
    whole.add_reference(X)
    whole.add_pair(X, Xm)
    for a, b in ((0, 4), (4, 10)):
        parts.add_reference(X[a:b])
        parts.add_pair(X[a:b], Xm[a:b])
    for s in (whole, parts):
        G, C, H = s.solve_inputs()
        torch.testing.assert_close(G, (X.T @ X).double())
        torch.testing.assert_close(C, (X.T @ Xm).double())
        torch.testing.assert_close(H, (Xm.T @ Xm).double())
    assert parts.rows == 10


def test_before_any_merged_capture_cross_and_merged_gram_equal_gram():
    s = ConceptStats.zeros(2, torch.float64)
    s.add_reference(torch.tensor([[1.0, 2.0]]))
    G, C, H = s.solve_inputs()
    assert torch.equal(G, C) and torch.equal(G, H)
    s.add_pair(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]))
    s.reset_merged()
    assert torch.equal(s.solve_inputs()[1], G)
