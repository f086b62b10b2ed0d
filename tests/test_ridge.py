"""The automatic ridge (iteris_sd.merge.ridge): its cross-validation error against a brute-force
solve on one fold scored on the other, and the choices it makes on problems with known answers."""

import pytest
import torch

from iteris_sd.merge.ridge import FALLBACK, RIDGE_GRID, choose_ridge, cross_validation_errors, describe_ridges
from iteris_sd.merge.solve import LayerProblem
from iteris_sd.merge.stats import ConceptStats


def _problem(folds_rows, deltas, d_in=6, d_out=5):
    """A layer whose concept i saw rows folds_rows[i] = (X_0, X_1), one per fold."""
    stats = []
    for X0, X1 in folds_rows:
        st = ConceptStats.lazy(d_in, torch.float64, track_folds=True)
        st.add_reference(torch.cat([X0, X1]), torch.cat([torch.zeros(len(X0)), torch.ones(len(X1))]).bool())
        stats.append(st)
    return LayerProblem("layer", torch.zeros(d_out, d_in), deltas, stats)


def _brute_force(problem, folds_rows, weights, a, target):
    """e_01 + e_10 by solving IterIS's first closed form on one fold and scoring it on the other."""
    dWs = [torch.zeros(problem.base_weight.shape, dtype=torch.float64) if f is None else (f[0] @ f[1]).double()
           for f in problem.factors]
    grams = [[X.T @ X for X in pair] for pair in folds_rows]
    norms = [c * torch.linalg.matrix_norm(g[0] + g[1]) for c, g in zip(weights, grams)]
    Wt = sum(dWs) if target == "sum" else sum(n * dW for n, dW in zip(norms, dWs)) / sum(norms)
    total = 0.0
    for f, g in ((0, 1), (1, 0)):
        D = sum(c * G[f] for c, G in zip(weights, grams))
        lam = a * sum(c * torch.linalg.matrix_norm(G[f]) for c, G in zip(weights, grams))
        R = sum(c * dW @ G[f] for c, dW, G in zip(weights, dWs, grams))
        W = (R + lam * Wt) @ torch.linalg.inv(D + lam * torch.eye(D.shape[0], dtype=torch.float64))

        def err(M):
            return sum(c * torch.trace((M - dW) @ G[g] @ (M - dW).T) for c, dW, G in zip(weights, dWs, grams))

        total += float(err(W))
    return total


def _lora(d_out, d_in, r, gen):
    return torch.randn(d_out, r, generator=gen, dtype=torch.float64), torch.randn(r, d_in, generator=gen, dtype=torch.float64)


def test_cross_validation_error_equals_brute_force_fold_solves():
    gen = torch.Generator().manual_seed(0)
    rows = [(torch.randn(4, 6, generator=gen, dtype=torch.float64), torch.randn(3, 6, generator=gen, dtype=torch.float64))
            for _ in range(3)]
    deltas = [_lora(5, 6, 2, gen), None, _lora(5, 6, 3, gen)]  # concept 2 asks for the base behaviour
    problem = _problem(rows, deltas)
    weights = [0.7, 1.3, 0.4]
    grid = (1e-4, 1e-2, 1.0)
    curves = cross_validation_errors(problem, weights, ("sum", "average"), grid)
    for target, errors in curves.items():
        for a, e in zip(grid, errors):
            assert e == pytest.approx(_brute_force(problem, rows, weights, a, target), rel=1e-8, abs=1e-9)


def _consistent_rows(gen, n, d_in=6):
    return torch.randn(n, d_in, generator=gen, dtype=torch.float64), torch.randn(n, d_in, generator=gen, dtype=torch.float64)


def test_plenty_of_consistent_data_gets_a_small_ridge():
    # Two LoRAs on disjoint input directions, many rows in each fold: the data alone fits each
    # LoRA exactly, so a large ridge (toward any target) can only cost.
    gen = torch.Generator().manual_seed(1)
    X = torch.zeros(200, 6, dtype=torch.float64)
    Y = torch.zeros(200, 6, dtype=torch.float64)
    X[:, :3] = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    Y[:, 3:] = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    rows = [(X[:100], X[100:]), (Y[:100], Y[100:])]
    problem = _problem(rows, [_lora(5, 6, 2, gen), _lora(5, 6, 2, gen)])
    choice = choose_ridge(problem, [1.0, 1.0])
    assert choice.validated and choice.a <= 1e-4


def test_folds_that_disagree_get_pulled_to_the_target():
    # Each concept's two folds reach different input directions: what one fold fits says
    # nothing about the other, where stacking (the sum; the LoRAs are zero on each other's
    # inputs) is exact. Cross-validation must keep the sum, at the largest ridges.
    gen = torch.Generator().manual_seed(2)
    def rows_on(cols):
        X = torch.zeros(30, 8, dtype=torch.float64)
        X[:, cols] = torch.randn(30, len(cols), generator=gen, dtype=torch.float64)
        return X
    rows = [(rows_on([0, 1]), rows_on([2, 3])), (rows_on([4, 5]), rows_on([6, 7]))]
    B1, A1 = _lora(5, 8, 2, gen)
    B2, A2 = _lora(5, 8, 2, gen)
    A1[:, 4:] = 0  # LoRA 1 acts only on concept 1's inputs, LoRA 2 only on concept 2's
    A2[:, :4] = 0
    problem = _problem(rows, [(B1, A1), (B2, A2)], d_in=8)
    choice = choose_ridge(problem, [1.0, 1.0])
    assert choice.target == "sum" and choice.a >= 1.0


def test_an_unsplit_layer_gets_the_fallback_and_says_so():
    gen = torch.Generator().manual_seed(3)
    st = ConceptStats.lazy(6, torch.float64, track_folds=True)
    st.add_reference(torch.randn(10, 6, generator=gen, dtype=torch.float64))  # every row in fold 0
    problem = LayerProblem("layer", torch.zeros(5, 6), [_lora(5, 6, 2, gen)], [st])
    assert choose_ridge(problem, [1.0]) is FALLBACK
    text = describe_ridges({"a": FALLBACK, "b": choose_ridge(_problem([_consistent_rows(gen, 20)], [_lora(5, 6, 2, gen)]), [1.0])})
    assert "1 layer not cross-validated" in text and "over 1 layers" in text


def test_grid_spans_the_papers_values_to_the_target():
    assert min(RIDGE_GRID) <= 1e-7 and max(RIDGE_GRID) >= 10
