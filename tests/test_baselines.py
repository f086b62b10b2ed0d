import pytest
import torch

from iteris_sd.merge.weight_space import LayerMerge, concat, dare, linear, stack, svd, ties

# dW1 = B1 A1 = [[1, 0, -1], [2, 0, -2]],  dW2 = B2 A2 = [[0, 2, 0], [1, 1, 1]]
B1, A1 = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0, -1.0]])
B2, A2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
DW1 = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0]])
DW2 = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])


def _row(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of the 1 x n matrix [values]: B = [[1]], A = [values]."""
    return torch.ones(1, 1), torch.tensor([values])


def _mat(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of a small dense matrix: B = I, A = matrix."""
    M = torch.tensor(rows)
    return torch.eye(M.shape[0]), M


def test_stack_is_plain_sum():
    m = stack([(B1, A1), None, (B2, A2)])
    assert isinstance(m, LayerMerge) and m.energy == 1.0
    assert m.U.shape == (2, 3) and m.Z.shape == (3, 3)
    torch.testing.assert_close(m.delta(), torch.tensor([[1.0, 2.0, -1.0], [3.0, 1.0, -1.0]]))
    torch.testing.assert_close(m.U, torch.cat([B1, B2], dim=1))  # literally [B1 B2]


def test_linear_default_average_counts_absent_loras():
    # N = 3 with one absent: (dW1 + dW2) / 3
    m = linear([(B1, A1), None, (B2, A2)])
    torch.testing.assert_close(m.delta(), torch.tensor([[1.0, 2.0, -1.0], [3.0, 1.0, -1.0]]) / 3)
    # only one of two present: half of it
    torch.testing.assert_close(linear([None, (B2, A2)]).delta(), DW2 / 2)


def test_linear_weights_including_negative_and_zero():
    m = linear([(B1, A1), (B2, A2)], weights=[2.0, -0.5])
    # 2 dW1 - 0.5 dW2 = [[2, -1, -2], [3.5, -0.5, -4.5]]
    torch.testing.assert_close(m.delta(), torch.tensor([[2.0, -1.0, -2.0], [3.5, -0.5, -4.5]]))
    m = linear([(B1, A1), (B2, A2)], weights=[0.0, 1.0])
    assert m.rank == 2  # the zero-weight LoRA's block is dropped
    torch.testing.assert_close(m.delta(), DW2)
    m = linear([(B1, A1), (B2, A2)], weights=[0.0, 0.0])
    assert m.U.shape == (2, 1) and torch.all(m.delta() == 0)


def test_concat_default_equals_stack_and_ratios():
    f = [(B1, A1), (B2, A2)]
    torch.testing.assert_close(concat(f).U, stack(f).U)
    torch.testing.assert_close(concat(f).Z, stack(f).Z)
    m = concat(f, ratios=[0.25, -4.0])
    assert m.rank == 3
    torch.testing.assert_close(m.delta(), 0.25 * DW1 - 4.0 * DW2)
    # sqrt|ratio| on each side: block 1 is (0.5 B1, 0.5 A1), block 2 is (-2 B2, 2 A2)
    torch.testing.assert_close(m.U[:, :1], 0.5 * B1)
    torch.testing.assert_close(m.Z[1:], 2.0 * A2)


def test_svd_full_rank_reproduces_sum_and_rank1_is_top_component():
    f = [(B1, A1), (B2, A2)]
    m = svd(f, rank=2)
    torch.testing.assert_close(m.delta(), DW1 + DW2)
    assert m.energy == pytest.approx(1.0)
    m = svd(f, rank=1, weights=[1.0, 2.0])
    P, S, Qh = torch.linalg.svd(DW1 + 2 * DW2)
    top = S[0] * torch.outer(P[:, 0], Qh[0])
    torch.testing.assert_close(m.delta(), top, rtol=1e-5, atol=1e-5)
    assert m.energy == pytest.approx(float(S[0] ** 2 / (S**2).sum()), rel=1e-5)
    assert m.U.shape == (2, 1)


def test_ties_hand_computed_2x2():
    # tau_1 = [[3, -1], [0.5, 2]], tau_2 = [[-2, 4], [1, -1]], density 0.5: keep k = 2 of 4.
    # trim:  tau_1 -> [[3, 0], [0, 2]]      (|3|, |2| largest)
    #        tau_2 -> [[-2, 4], [0, 0]]     (|4|, |-2| largest)
    # elect: sign of the sum [[1, 4], [0, 2]] -> [[+, +], [0, +]]
    # mean over agreeing nonzero entries:
    #   (0,0): only tau_1's 3 is +  -> 3;   (0,1): only tau_2's 4 -> 4
    #   (1,0): sum 0, no sign        -> 0;   (1,1): only tau_1's 2 -> 2
    f = [_mat([[3.0, -1.0], [0.5, 2.0]]), _mat([[-2.0, 4.0], [1.0, -1.0]])]
    m = ties(f, rank=2, density=0.5)
    torch.testing.assert_close(m.delta(), torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    assert m.energy == pytest.approx(1.0)


def test_ties_weights_apply_before_trimming():
    # weights [1, 0.5]: tau_2 = [[-1, 2], [0.5, -0.5]] -> trimmed [[-1, 2], [0, 0]]
    # sum of trimmed [[2, 2], [0, 2]]: all +; (0,0) keeps tau_1's 3 -> [[3, 2], [0, 2]]
    f = [_mat([[3.0, -1.0], [0.5, 2.0]]), _mat([[-2.0, 4.0], [1.0, -1.0]])]
    m = ties(f, rank=2, density=0.5, weights=[1.0, 0.5])
    torch.testing.assert_close(m.delta(), torch.tensor([[3.0, 2.0], [0.0, 2.0]]))


def test_ties_disjoint_mean_three_tasks_no_trim():
    # density 1: nothing trimmed. Column sums [5, -2, -1, 1.5] -> signs [+, -, -, +]
    # col 0: mean(2, 4) = 3; col 1: mean(-1, -2) = -1.5; col 2: only -3; col 3: mean of 0.5s
    f = [_row([2.0, 1.0, -3.0, 0.5]), _row([4.0, -1.0, 1.0, 0.5]), None, _row([-1.0, -2.0, 1.0, 0.5])]
    m = ties(f, rank=1, density=1.0)
    torch.testing.assert_close(m.delta(), torch.tensor([[3.0, -1.5, -3.0, 0.5]]))


def test_ties_trim_ties_are_deterministic_and_k_is_ceil():
    # |1| = |-1| = |1| tie for 2 slots: the lowest flat indices win
    m = ties([_row([1.0, -1.0, 1.0, 0.5])], rank=1, density=0.5)
    torch.testing.assert_close(m.delta(), torch.tensor([[1.0, -1.0, 0.0, 0.0]]))
    # density 0.3 of 4 entries -> ceil(1.2) = 2 kept
    m = ties([_row([0.1, 0.4, -0.3, 0.2])], rank=1, density=0.3)
    torch.testing.assert_close(m.delta(), torch.tensor([[0.0, 0.4, -0.3, 0.0]]))
    # density 0.7 of 10 -> exactly 7 kept (0.7 * 10 is 7.000000000000001 in floats)
    m = ties([_row([float(i) for i in range(1, 11)])], rank=1, density=0.7)
    assert int((m.delta().abs() > 1e-4).sum()) == 7


def test_dare_density_one_is_weighted_sum():
    m = dare([(B1, A1), None, (B2, A2)], rank=2, density=1.0, weights=[2.0, 1.0, -1.0])
    torch.testing.assert_close(m.delta(), 2 * DW1 - DW2, rtol=1e-5, atol=1e-5)


def test_dare_is_seeded_and_rescales():
    f = [_row([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, 8.0])]
    a = dare(f, rank=1, density=0.5, seed=7).delta()
    b = dare(f, rank=1, density=0.5, seed=7).delta()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    tau = f[0][1]
    # each entry is dropped (0) or kept and doubled
    kept = (a - 2 * tau).abs() < 1e-4
    dropped = a.abs() < 1e-4
    assert torch.all(kept | dropped)
    outs = {tuple(dare(f, rank=1, density=0.5, seed=s).delta().flatten().round(decimals=3).tolist()) for s in range(5)}
    assert len(outs) > 1  # different seeds, different masks


def test_dare_expectation_preserved():
    f = [(B1, A1), (B2, A2)]
    target = DW1 + 0.5 * DW2
    runs = torch.stack([dare(f, rank=2, density=0.5, weights=[1.0, 0.5], seed=s).delta() for s in range(400)])
    # per-entry std of one run is <= |sum of |tau_i|| <= 2.5; of the mean over 400, <= 0.125
    torch.testing.assert_close(runs.mean(dim=0), target, rtol=0, atol=0.5)
    assert runs.std(dim=0).max() > 0.1  # it really is random


def test_validation_errors_quote_the_value():
    f = [(B1, A1), (B2, A2)]
    with pytest.raises(ValueError, match=r"\(2\), got 3"):
        linear(f, weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="got 3"):
        concat(f, ratios=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 0.0"):
        ties(f, rank=2, density=0.0)
    with pytest.raises(ValueError, match="got 1.5"):
        dare(f, rank=2, density=1.5)
    with pytest.raises(ValueError, match="got 0"):
        svd(f, rank=0)
    with pytest.raises(ValueError, match=r"weights must have one entry per LoRA \(2\), got 1"):
        svd(f, rank=1, weights=[1.0])
    with pytest.raises(ValueError, match="at least one LoRA"):
        stack([None, None])
    with pytest.raises(ValueError, match="at least one LoRA"):
        linear([])
    bad = (torch.ones(4, 1), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\(4, 3\) does not match \(2, 3\)"):
        stack([(B1, A1), None, bad])
    with pytest.raises(ValueError, match=r"\(2, 2\) and \(1, 3\)"):
        stack([(torch.ones(2, 2), torch.ones(1, 3))])
