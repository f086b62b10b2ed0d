"""Solver algebra: the closed form, its exact low-rank factorisation, adaptive weights."""

import math
import warnings

import pytest
import torch

from iteris_sd.merge.regmean import regmean_layer
from iteris_sd.merge.solve import (
    IllConditionedWarning,
    LayerProblem,
    adaptive_weights,
    choose_form,
    concept_residuals,
    solve_layer,
)
from iteris_sd.merge.ssr import ssr_layer
from iteris_sd.merge.stats import ConceptStats, SampledStats


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def stats_for(X, X_merged=None):
    st = ConceptStats.zeros(X.shape[1], torch.float64)
    st.add_reference(X)
    if X_merged is not None:
        st.add_pair(X, X_merged)
    return st


def lowrank(d_out, d_in, r, gen):
    return torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen)


def dense_closed_form(problem, weights, reg, ridge_target="average"):
    """W* written exactly as in the paper ("average"), or with the ridge a L ||W - sum_j dW_j||^2
    ("sum"), with dense matrices."""
    d_in = problem.base_weight.shape[1]
    I = torch.eye(d_in)
    num = torch.zeros_like(problem.base_weight)
    den = torch.zeros(d_in, d_in)
    total = torch.zeros_like(problem.base_weight)
    L = 0.0
    for f, st, c in zip(problem.factors, problem.stats, weights):
        _, C, H = st.solve_inputs()
        den += c * (H + reg * torch.linalg.matrix_norm(H) * I)
        L += c * float(torch.linalg.matrix_norm(H))
        if f is not None:
            total += f[0] @ f[1]
            if ridge_target == "average":
                num += c * (f[0] @ f[1]) @ (C + reg * torch.linalg.matrix_norm(C) * I)
            else:
                num += c * (f[0] @ f[1]) @ C
    if ridge_target == "sum":
        num += reg * L * total
    return num @ torch.linalg.inv(den)


def test_one_lora_alone_returns_that_lora_for_any_ridge():
    g = torch.Generator().manual_seed(0)
    B, A = lowrank(6, 5, 2, g)
    X = torch.randn(40, 5, generator=g)
    p = LayerProblem("l", torch.randn(6, 5, generator=g), [(B, A)], [stats_for(X)])
    for reg in (0.0, 1e-2, 1.0):
        for target in ("average", "sum"):
            Z = solve_layer(p, adaptive_weights(p), reg, ridge_target=target).double()
            torch.testing.assert_close(p.up @ Z, B @ A, rtol=1e-5, atol=1e-5)


def test_recovers_known_weight_under_input_drift():
    # The merged model sees X~ = X M; if LoRA's output X dW^T equals X~ W^T, the solve
    # with X~ must return W itself, not dW.
    g = torch.Generator().manual_seed(1)
    B, A_true = lowrank(4, 6, 3, g)
    M = torch.eye(6) + 0.3 * torch.randn(6, 6, generator=g)
    dW_A = A_true @ M.T  # dW = W M^T, still rank 3 with the same B
    X = torch.randn(50, 6, generator=g)
    p = LayerProblem("l", torch.zeros(4, 6), [(B, dW_A)], [stats_for(X, X @ M)])
    Z = solve_layer(p, [1.0], 0.0).double()
    torch.testing.assert_close(p.up @ Z, B @ A_true, rtol=1e-6, atol=1e-6)
    res, ref = concept_residuals(p, p.up, Z)
    assert res[0] < 1e-8 * ref[0]


def test_two_loras_on_disjoint_input_subspaces_merge_exactly():
    g = torch.Generator().manual_seed(2)
    X1 = torch.zeros(30, 8)
    X1[:, :4] = torch.randn(30, 4, generator=g)
    X2 = torch.zeros(30, 8)
    X2[:, 4:] = torch.randn(30, 4, generator=g)
    B1, A1 = lowrank(5, 8, 2, g)
    B2, A2 = lowrank(5, 8, 3, g)
    A1[:, 4:] = 0  # LoRA 1 reads only its own subspace, LoRA 2 only the other
    A2[:, :4] = 0
    p = LayerProblem("l", torch.randn(5, 8, generator=g), [(B1, A1), (B2, A2)], [stats_for(X1), stats_for(X2)])
    Z = solve_layer(p, adaptive_weights(p), 0.0).double()
    torch.testing.assert_close(p.up @ Z, B1 @ A1 + B2 @ A2, rtol=1e-6, atol=1e-6)
    res, _ = concept_residuals(p, p.up, Z)
    assert max(res) < 1e-9


@pytest.mark.parametrize("target", ["average", "sum"])
@pytest.mark.parametrize("reg", [0.0, 1e-4, 1e-2])
def test_rank_sum_factorisation_equals_dense_closed_form(reg, target):
    g = torch.Generator().manual_seed(3)
    d_out, d_in = 7, 9
    factors = [lowrank(d_out, d_in, r, g) for r in (2, 3, 1)] + [None]  # a concept not touching it
    stats = []
    for _ in factors:
        X = torch.randn(25, d_in, generator=g)
        stats.append(stats_for(X, X + 0.2 * torch.randn(25, d_in, generator=g)))
    p = LayerProblem("l", torch.randn(d_out, d_in, generator=g), factors, stats)
    w = adaptive_weights(p)
    Z = solve_layer(p, w, reg, ridge_target=target).double()
    assert Z.shape == (6, d_in)  # rank 2 + 3 + 1
    torch.testing.assert_close(p.up @ Z, dense_closed_form(p, w, reg, target), rtol=1e-5, atol=1e-5)


def test_ridge_target_sets_what_the_merge_does_where_no_calibration_input_reaches():
    # Inputs span only the first 4 of 6 directions: along the other two the data says nothing,
    # and the ridge decides: the c||G||-weighted average of the deltas, or their sum.
    g = torch.Generator().manual_seed(4)
    factors = [lowrank(5, 6, 2, g), lowrank(5, 6, 3, g)]
    Xs = [torch.cat([torch.randn(20, 4, generator=g), torch.zeros(20, 2)], dim=1) for _ in factors]
    p = LayerProblem("l", torch.randn(5, 6, generator=g), factors, [stats_for(X) for X in Xs])
    w = adaptive_weights(p)
    dWs = [B @ A for B, A in factors]
    share = [c * float(torch.linalg.matrix_norm(X.T @ X)) for c, X in zip(w, Xs)]
    average = sum(s * dW for s, dW in zip(share, dWs)) / sum(share)
    for target, expected in (("average", average), ("sum", dWs[0] + dWs[1])):
        W = p.up @ solve_layer(p, w, 1e-2, ridge_target=target).double()
        torch.testing.assert_close(W[:, 4:], expected[:, 4:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("form", ["primal", "dual"])
def test_a_layer_no_calibration_input_reaches_gets_the_ridge_target(form):
    # Every input is zero, so every Gram is 0 and the objective is flat: W* is the ridge's target,
    # over all N = 3 concepts (the third does not touch the layer: a zero delta).
    g = torch.Generator().manual_seed(13)
    factors = [lowrank(5, 6, 2, g), lowrank(5, 6, 3, g), None]
    zeros = torch.zeros(10, 6)
    stats = [stats_for(zeros, zeros) if form == "primal" else sampled(zeros, zeros) for _ in factors]
    p = LayerProblem("l", torch.randn(5, 6, generator=g), factors, stats)
    dW1, dW2 = (B @ A for B, A in factors[:2])
    assert adaptive_weights(p) == [0.0, 0.0, 0.0]  # 0 / 0: undefined, so equal weights
    cases = [(adaptive_weights(p), (dW1 + dW2) / 3), ([1.0, 1.0, 1.0], (dW1 + dW2) / 3), ([2.0, 1.0, 1.0], (2 * dW1 + dW2) / 4)]
    for weights, average in cases:
        for reg in (0.0, 1e-2):
            for target, expected in (("average", average), ("sum", dW1 + dW2)):
                Z = solve_layer(p, weights, reg, form=form, ridge_target=target).double()
                torch.testing.assert_close(p.up @ Z, expected, rtol=1e-6, atol=1e-6)


def test_an_unknown_ridge_target_is_refused_by_name():
    g = torch.Generator().manual_seed(5)
    p = LayerProblem("l", torch.randn(3, 4, generator=g), [lowrank(3, 4, 1, g)], [stats_for(torch.randn(8, 4, generator=g))])
    with pytest.raises(ValueError, match="ridge_target must be one of average, sum, got 'stack'"):
        solve_layer(p, [1.0], 1e-3, ridge_target="stack")


def test_adaptive_weights_match_hand_computation():
    # W0 = [[1, 0], [0, 2]], dW = [[0, 1], [0, 0]] -> M = [[1, 1], [0, 2]], ||M||^2 = 6.
    # X = [[1, 0], [0, 1], [1, 1]]: X M^T = [[1, 0], [1, 2], [2, 2]], ||.||^2 = 1 + 1 + 4 + 4 + 4 = 14.
    # Concept 2 does not touch the layer: M = W0, ||W0||^2 = 5, X W0^T = [[1, 0], [0, 2], [1, 2]]: 10.
    W0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    B, A = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0, 1.0]])
    p = LayerProblem("l", W0, [(B, A), None], [stats_for(X), stats_for(X)])
    c = adaptive_weights(p)
    assert c == pytest.approx([6 / 14, 5 / 10])


def test_concept_without_inputs_gets_weight_zero():
    p = LayerProblem("l", torch.eye(2), [(torch.ones(2, 1), torch.ones(1, 2))], [ConceptStats.zeros(2, torch.float64)])
    assert adaptive_weights(p) == [0.0]


def test_singular_system_gives_finite_result_and_warning_naming_layer():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(3, 6, generator=g)  # 3 rows in 6 dims: X^T X is singular
    B, A = lowrank(4, 6, 2, g)
    p = LayerProblem("unet.mid.to_k", torch.randn(4, 6, generator=g), [(B, A)], [stats_for(X)])
    with pytest.warns(IllConditionedWarning, match="unet.mid.to_k"):
        Z = solve_layer(p, [1.0], 0.0)
    assert torch.isfinite(Z).all()
    # The pseudo-inverse still reproduces the LoRA on the inputs it saw.
    torch.testing.assert_close(X @ (p.up @ Z.double()).T, X @ (B @ A).T, rtol=1e-6, atol=1e-6)


def test_all_zero_statistics_do_not_crash():
    p = LayerProblem("l", torch.eye(3), [(torch.ones(3, 1), torch.ones(1, 3))], [ConceptStats.zeros(3, torch.float64)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        Z = solve_layer(p, [1.0], 1e-2)
    assert torch.isfinite(Z).all()


def test_nan_inputs_raise_naming_the_layer():
    st = stats_for(torch.ones(4, 2))
    st.gram[0, 0] = math.nan
    p = LayerProblem("te.q_proj", torch.eye(2), [(torch.ones(2, 1), torch.ones(1, 2))], [st])
    with pytest.raises(FloatingPointError, match="te.q_proj"):
        solve_layer(p, [1.0], 1e-2)


def test_residuals_match_direct_computation():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(20, 5, generator=g)
    Xm = X + 0.1 * torch.randn(20, 5, generator=g)
    B, A = lowrank(3, 5, 2, g)
    U, Z = lowrank(3, 5, 4, g)
    p = LayerProblem("l", torch.zeros(3, 5), [(B, A), None], [stats_for(X, Xm), stats_for(X, Xm)])
    res, ref = concept_residuals(p, U, Z)
    W = U @ Z
    assert res[0] == pytest.approx(float(((Xm @ W.T - X @ (B @ A).T) ** 2).sum()), rel=1e-9)
    assert ref[0] == pytest.approx(float(((X @ (B @ A).T) ** 2).sum()), rel=1e-9)
    assert res[1] == pytest.approx(float(((Xm @ W.T) ** 2).sum()), rel=1e-9)
    assert ref[1] == 0.0


def test_regmean_matches_its_dense_formula():
    g = torch.Generator().manual_seed(6)
    factors = [lowrank(4, 6, 2, g), lowrank(4, 6, 1, g)]
    Xs = [torch.randn(30, 6, generator=g) for _ in factors]
    p = LayerProblem("l", torch.zeros(4, 6), factors, [stats_for(X) for X in Xs])
    shrink = [0.9 * X.T @ X + 0.1 * torch.diag((X.T @ X).diagonal()) for X in Xs]
    expected = sum((B @ A) @ G for (B, A), G in zip(factors, shrink)) @ torch.linalg.inv(sum(shrink))
    torch.testing.assert_close(p.up @ regmean_layer(p).double(), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- primal and dual


def sampled(X, X_merged, size=None):
    st = SampledStats(X.shape[1], size or X.shape[0], dtype=torch.float64)
    st.add_reference(X)
    st.add_pair(X, X_merged)
    return st


@pytest.mark.parametrize("rows,d_in", [(12, 40), (30, 16), (25, 25)])
def test_primal_and_dual_solves_agree(rows, d_in):
    g = torch.Generator().manual_seed(rows * d_in)
    d_out = 9
    factors = [lowrank(d_out, d_in, r, g) for r in (2, 3)] + [None]
    stats = []
    for _ in factors:
        X = torch.randn(rows, d_in, generator=g)
        stats.append(sampled(X, X + 0.3 * torch.randn(rows, d_in, generator=g)))
    p = LayerProblem("l", torch.randn(d_out, d_in, generator=g), factors, stats)
    w = adaptive_weights(p)
    for target in ("average", "sum"):
        primal = solve_layer(p, w, 1e-2, form="primal", ridge_target=target).double()
        dual = solve_layer(p, w, 1e-2, form="dual", ridge_target=target).double()
        torch.testing.assert_close(dual, primal, rtol=1e-6, atol=1e-6 * float(primal.abs().max()))
    assert choose_form(p, 1e-2) == ("dual" if 3 * rows < d_in else "primal")
    assert choose_form(p, 0.0) == "primal"  # no ridge: no Woodbury


def test_dual_solve_of_every_row_equals_the_gram_solve():
    g = torch.Generator().manual_seed(11)
    d_in, rows = 48, 10
    factors = [lowrank(6, d_in, 2, g), lowrank(6, d_in, 4, g)]
    Xs = [torch.randn(rows, d_in, generator=g) for _ in factors]
    Xms = [X @ (torch.eye(d_in) + 0.1 * torch.randn(d_in, d_in, generator=g)) for X in Xs]
    gram = LayerProblem("l", torch.randn(6, d_in, generator=g), factors, [stats_for(X, Xm) for X, Xm in zip(Xs, Xms)])
    rows_form = LayerProblem("l", gram.base_weight, factors, [sampled(X, Xm) for X, Xm in zip(Xs, Xms)])
    assert choose_form(rows_form, 1e-2) == "dual" and choose_form(gram, 1e-2) == "primal"
    w = adaptive_weights(gram)
    assert adaptive_weights(rows_form) == pytest.approx(w, rel=1e-9)
    expected = solve_layer(gram, w, 1e-2).double()
    torch.testing.assert_close(solve_layer(rows_form, w, 1e-2).double(), expected, rtol=1e-6,
                               atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(regmean_layer(rows_form).double(), regmean_layer(gram).double(), rtol=1e-6,
                               atol=1e-6 * float(regmean_layer(gram).abs().max()))
    U, Z = lowrank(6, d_in, 3, g)
    for a, b in zip(concept_residuals(rows_form, U, Z), concept_residuals(gram, U, Z)):
        assert a == pytest.approx(b, rel=1e-9)


def test_gram_solve_is_unchanged_by_the_lean_rewrite():
    # The dense formula of the paper, evaluated exactly as the first version of solve_layer did.
    g = torch.Generator().manual_seed(12)
    d_in = 14
    factors = [lowrank(5, d_in, 2, g), lowrank(5, d_in, 3, g), None]
    stats = [stats_for(X, X + 0.2 * torch.randn(30, d_in, generator=g))
             for X in (torch.randn(30, d_in, generator=g) for _ in factors)]
    p = LayerProblem("l", torch.randn(5, d_in, generator=g), factors, stats)
    w = adaptive_weights(p)
    eye = torch.eye(d_in, dtype=torch.float64)
    D = torch.zeros(d_in, d_in, dtype=torch.float64)
    rhs = []
    for f, st, c in zip(factors, stats, w):
        _, C, H = st.solve_inputs()
        D += c * (H + 1e-2 * torch.linalg.matrix_norm(H) * eye)
        if f is not None:
            A = f[1].double()
            rhs.append(c * (C.T @ A.T + 1e-2 * torch.linalg.matrix_norm(C) * A.T))
    L = torch.linalg.cholesky(D)
    assert torch.equal(solve_layer(p, w, 1e-2), torch.cholesky_solve(torch.cat(rhs, dim=1), L).T.contiguous().float())


def test_ssr_is_the_least_squares_router_in_the_loras_own_subspace():
    g = torch.Generator().manual_seed(7)
    d_in = 12
    factors = [lowrank(5, d_in, 2, g), None, lowrank(5, d_in, 3, g)]
    Xs = [torch.randn(40, d_in, generator=g) for _ in factors]
    p = LayerProblem("l", torch.zeros(5, d_in), factors, [stats_for(X) for X in Xs])
    A, U = p.stacked_down(), p.up
    # brute force over the router Rt: sum_i ||X_i A^T Rt^T - X_i A^T P_i^T||^2, P_i the block selector
    selectors = [torch.diag(torch.tensor([1.0, 1, 0, 0, 0])), torch.zeros(5, 5), torch.diag(torch.tensor([0.0, 0, 1, 1, 1]))]
    design = torch.cat([X @ A.T for X in Xs])
    target = torch.cat([X @ A.T @ P.T for X, P in zip(Xs, selectors)])
    router = torch.linalg.lstsq(design, target).solution.T
    Z = ssr_layer(p, ridge=1e-12).double()
    torch.testing.assert_close(Z, router @ A, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(U @ Z, U @ A, atol=1e-3)  # the silent concept's inputs pull it from the sum


def test_ssr_keeps_each_lora_where_their_inputs_do_not_overlap():
    g = torch.Generator().manual_seed(8)
    a = (torch.randn(4, 2, generator=g), torch.cat([torch.randn(2, 3, generator=g), torch.zeros(2, 3)], dim=1))
    b = (torch.randn(4, 1, generator=g), torch.cat([torch.zeros(1, 3), torch.randn(1, 3, generator=g)], dim=1))
    X1 = torch.cat([torch.randn(20, 3, generator=g), torch.zeros(20, 3)], dim=1)
    X2 = torch.cat([torch.zeros(20, 3), torch.randn(20, 3, generator=g)], dim=1)
    p = LayerProblem("l", torch.zeros(4, 6), [a, b], [stats_for(X1), stats_for(X2)])
    torch.testing.assert_close(p.up @ ssr_layer(p).double(), a[0] @ a[1] + b[0] @ b[1], rtol=1e-6, atol=1e-6)


def test_ssr_of_token_samples_equals_the_gram_form_and_unreached_layers_get_the_sum():
    g = torch.Generator().manual_seed(9)
    d_in = 30
    factors = [lowrank(6, d_in, 2, g), lowrank(6, d_in, 3, g)]
    Xs = [torch.randn(8, d_in, generator=g) for _ in factors]
    gram = LayerProblem("l", torch.zeros(6, d_in), factors, [stats_for(X) for X in Xs])
    rows = LayerProblem("l", gram.base_weight, factors, [sampled(X, X) for X in Xs])
    torch.testing.assert_close(ssr_layer(rows).double(), ssr_layer(gram).double(), rtol=1e-6, atol=1e-6)
    silent = LayerProblem("l", gram.base_weight, factors, [ConceptStats.zeros(d_in, torch.float64) for _ in factors])
    torch.testing.assert_close(ssr_layer(silent).double(), silent.stacked_down(), rtol=0, atol=1e-6)
