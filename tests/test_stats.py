"""Streamed statistics: conv inputs unfold into rows that reproduce the conv exactly."""

import pytest
import torch
import torch.nn.functional as F

from iteris_sd.merge.layers import ConvGeometry, layer_rows
from iteris_sd.merge.stats import ConceptStats, SampledStats


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


# ----------------------------------------------------------------------------- token samples


def stream(seed=0, calls=(7, 5, 9), d=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g) for n in calls]


def test_token_sample_keeps_the_same_rows_of_X_and_X_merged():
    batches = stream()
    s = SampledStats(4, size=6, seed=3)
    for X in batches:
        s.add_reference(X)
    for X in batches:
        s.add_pair(X, 2 * X + 1)  # X~ is a function of X row by row: pairs stay paired
    X, Xp, Xm, scale = s.rows64()
    assert X.shape == (6, 4) and s.kept == 6 and s.rows == 21 and scale == pytest.approx(21 / 6)
    torch.testing.assert_close(Xp, X)
    torch.testing.assert_close(Xm, 2 * X + 1)
    every = torch.cat(batches).double()
    assert all(any(torch.equal(row, r) for r in every) for row in X)  # real rows, no two alike
    assert len({tuple(r.tolist()) for r in X}) == 6


def test_token_sample_is_seeded_and_uniform_over_the_pass():
    batches = [torch.arange(10.0)[:, None] + 10 * k for k in range(3)]  # row value = its index
    picks = []
    for seed in range(300):
        s = SampledStats(1, size=6, seed=seed)
        for X in batches:
            s.add_reference(X)
        picks.append(sorted(int(v) for v in s.rows64()[0].flatten()))
    again = SampledStats(1, size=6, seed=0)
    for X in batches:
        again.add_reference(X)
    assert sorted(int(v) for v in again.rows64()[0].flatten()) == picks[0]
    assert len({tuple(p) for p in picks}) > 250  # seeds give different samples
    counts = torch.bincount(torch.tensor([i for p in picks for i in p]), minlength=30).double()
    expected = 300 * 6 / 30  # every row equally likely, in every call
    assert float(counts.min()) > 0.6 * expected and float(counts.max()) < 1.4 * expected


def test_token_sample_of_every_row_is_the_exact_statistics():
    batches = stream()
    merged = [X + 0.1 * torch.ones_like(X) for X in batches]
    s, gram = SampledStats(4, size=50), ConceptStats.zeros(4, torch.float64)
    for X, Xm in zip(batches, merged):
        s.add_reference(X)
        gram.add_reference(X)
    for X, Xm in zip(batches, merged):
        s.add_pair(X, Xm)
        gram.add_pair(X, Xm)
    assert s.kept == 21 and s.scale == 1.0
    for a, b in zip(s.solve_inputs(), gram.solve_inputs()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_paired_pass_with_other_calls_than_the_reference_is_refused():
    s = SampledStats(4, size=5)
    for X in stream(calls=(7, 5)):
        s.add_reference(X)
    for X in stream(calls=(5, 7)):
        s.add_pair(X, X)
    with pytest.raises(RuntimeError, match="same data in the same order"):
        s.rows64()


def test_recomputed_reference_sample_comes_from_the_paired_pass():
    s = SampledStats(4, size=5)
    for X in stream():
        s.add_pair(X, -X, reference=True)
    X, Xp, Xm, _ = s.rows64()
    assert s.has_reference and s.rows == 21
    torch.testing.assert_close(X, Xp)
    torch.testing.assert_close(Xm, -X)


def test_lazy_statistics_allocate_in_their_dtype_when_rows_arrive():
    s = ConceptStats.lazy(3)
    assert s.gram is None and not s.has_reference and s.nbytes() == 0
    with torch.inference_mode():  # as the capture sinks run
        s.add_reference(torch.ones(2, 3, dtype=torch.float64))
    assert s.gram.dtype == torch.float32 and not s.gram.is_inference()
    s.add_pair(torch.ones(2, 3), torch.zeros(2, 3), reference=True)  # in place, outside inference mode
    assert float(s.gram[0, 0]) == 4.0 and float(s.cross.abs().sum()) == 0.0 and s.rows == 4


def test_conv_geometry_takes_linear_and_plain_conv2d_and_names_any_other_conv():
    assert ConvGeometry.of(torch.nn.Linear(4, 3)) is None
    assert ConvGeometry.of(torch.nn.Conv2d(4, 3, 3, padding=1)) == ConvGeometry((3, 3), (1, 1), (1, 1))
    for module, kind in ((torch.nn.Conv1d(4, 3, 3), "Conv1d"), (torch.nn.Conv3d(4, 4, 1), "Conv3d"),
                         (torch.nn.Conv2d(4, 4, 3, groups=2), "Conv2d with groups=2")):
        with pytest.raises(ValueError, match=rf"^layer blocks\.0\.conv is a {kind}: the merge handles Linear and ungrouped Conv2d"):
            ConvGeometry.of(module, "blocks.0.conv")
