"""The IterIS driver (`run_iteris`, and `merge_loras` through `MergeOptions`) against the
formulas of docs/iteris-math.md written out densely in float64: the first solve's closed
form (adaptive weights, Frobenius-scaled ridge, both ridge targets), the re-solve on the
merged model's own inputs, the damping, and which iterate is kept.

The model is a tiny fake backend: two bias-free linear layers, "a" applied twice (to the
calibration data x, then to act(x (W_a + dW_a)^T)) and "b" reading the result, so the
layers' inputs in the merged model (X~) differ from those in each LoRA's model (X). Its inputs are computed exactly, so
every expected value below is built from X_i and X~_i in plain torch.
"""

from __future__ import annotations

import pytest
import torch

from iteris_sd.app.pipeline import merge_loras
from iteris_sd.lora.layer import LoraFile, LoraLayer
from iteris_sd.merge.backend import Target
from iteris_sd.merge.calibration import CalibrationStats
from iteris_sd.merge.iterate import IterISConfig, run_iteris
from iteris_sd.merge.options import MergeOptions
from iteris_sd.merge.solve import adaptive_weights

F64 = torch.float64
LAYERS = ("a", "b")


pytestmark = pytest.mark.usefixtures("one_thread")


def act(h):
    """The nonlinearity between the layers: scale-preserving, but not linear."""
    return h + 0.5 * torch.tanh(h)


class ChainBackend:
    """The Backend protocol over x -> a -> act -> a -> act -> b (``loops`` = 2 calls of a),
    inputs known exactly.

    Concept i's calibration data are ``calls`` batches of ``rows`` random rows times
    ``scales[i]``, so the concepts' inputs can differ a lot in magnitude."""

    def __init__(self, dims=(6, 4), scales=(1.0, 20.0, 3.0), rows=3, calls=2, loops=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        d0, d1 = dims
        self.loops = loops
        self.weights = {"a": torch.randn(d0, d0, generator=g) / d0**0.5,
                        "b": torch.randn(d1, d0, generator=g) / d0**0.5}
        self.data = [[s * torch.randn(rows, d0, generator=g) for _ in range(calls)] for s in scales]

    # ----- the model, in any dtype
    def inputs(self, x, deltas, dtype=torch.float32):
        """Each layer's input rows for data x in the model carrying ``deltas``: a list of
        blocks, one per forward call of the layer (layer a is applied ``loops`` times)."""
        Wa = self.weights["a"].to(dtype)
        if "a" in deltas:
            U, Z = deltas["a"]
            Wa = Wa + U.to(dtype) @ Z.to(dtype)
        h, seen = x.to(dtype), []
        for _ in range(self.loops):
            seen.append(h)
            h = act(h @ Wa.T)
        return {"a": seen, "b": [h]}

    # ----- the Backend protocol
    def target(self, module_id):
        w = self.weights[module_id]
        return Target(w, tuple(w.shape), None)

    def match(self, lora):
        return dict(lora.layers)

    def output_name(self, module_id):
        return module_id

    @property
    def base_model_version(self):
        return "sd_v1"

    def capture(self, concept, reference, merged, modules, sink, progress=lambda *a: None):
        with torch.no_grad():
            for x in self.data[concept]:
                ref = self.inputs(x, reference)
                mer = None if merged is None else self.inputs(x, merged)
                for m in LAYERS:
                    if m in modules:
                        for k, X in enumerate(ref[m]):
                            sink(m, X, None if mer is None else mer[m][k])


def concept_deltas(backend, ranks=(2, 1, 2), seed=1, scale=0.5):
    """Per concept, low-rank (B, A) on both layers, except that the last concept leaves "b"
    alone (a concept asking for the base behaviour there)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        deltas = {}
        for m in LAYERS:
            if m == "b" and i == len(ranks) - 1:
                continue
            d_out, d_in = backend.weights[m].shape
            deltas[m] = (scale * torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g) / d_in**0.5)
        out.append(deltas)
    return out


def lora_files(deltas):
    return [LoraFile(f"l{i}.safetensors", f"l{i}", "0", {m: LoraLayer(m, up=B, down=A) for m, (B, A) in d.items()})
            for i, d in enumerate(deltas)]


# ----------------------------------------------------------------------------- the formulas, densely


def dense(factors):
    return None if factors is None else factors[0].double() @ factors[1].double()


def dense_inputs(backend, concept, deltas):
    """{layer: X (all rows of the concept's data, float64)} in the model carrying ``deltas``."""
    per_call = [backend.inputs(x, deltas, F64) for x in backend.data[concept]]
    return {m: torch.cat([X for c in per_call for X in c[m]]) for m in LAYERS}


def references(backend, cds):
    """X_i per concept and layer: inputs in the model carrying LoRA i alone."""
    return [dense_inputs(backend, i, d) for i, d in enumerate(cds)]


def delta_of(cds, i, m, like):
    d = dense(cds[i].get(m))
    return torch.zeros_like(like) if d is None else d


def dense_weights(backend, cds, Xs, m):
    """c_i = ||W0 + dW_i||_F^2 / ||X_i (W0 + dW_i)^T||_F^2 (iteris-math.md)."""
    W0 = backend.weights[m].double()
    out = []
    for i in range(len(cds)):
        M = W0 + delta_of(cds, i, m, W0)
        out.append(float((M**2).sum() / ((Xs[i][m] @ M.T) ** 2).sum()))
    return out


def dense_solve(backend, cds, Xs, Xts, m, c, a, target):
    """W* of iteris-math.md, with C_i = X_i^T X~_i, H_i = X~_i^T X~_i:
    "average": [sum c_i dW_i (C_i + a||C_i|| I)] [sum c_i (H_i + a||H_i|| I)]^-1;
    "sum": [sum c_i dW_i C_i + a L sum_j dW_j] [sum c_i H_i + a L I]^-1, L = sum c_i ||H_i||."""
    W0 = backend.weights[m].double()
    d_in = W0.shape[1]
    I = torch.eye(d_in, dtype=F64)
    num = torch.zeros_like(W0)
    den = torch.zeros(d_in, d_in, dtype=F64)
    L, total = 0.0, torch.zeros_like(W0)
    for i in range(len(cds)):
        X, Xt = Xs[i][m], Xts[i][m]
        C, H = X.T @ Xt, Xt.T @ Xt
        dW = delta_of(cds, i, m, W0)
        nC, nH = float(torch.linalg.matrix_norm(C)), float(torch.linalg.matrix_norm(H))
        total += dW
        L += c[i] * nH
        if target == "average":
            num += c[i] * dW @ (C + a * nC * I)
            den += c[i] * (H + a * nH * I)
        else:
            num += c[i] * dW @ C
            den += c[i] * H
    if target == "sum":
        num += a * L * total
        den += a * L * I
    return num @ torch.linalg.inv(den)


def dense_errors(backend, cds, merged):
    """Per concept: sqrt(sum_layers ||X~_i W^T - X_i dW_i^T||^2 / sum_layers ||X_i dW_i^T||^2),
    X~_i captured in the model carrying ``merged`` (W = U Z there)."""
    Xs = references(backend, cds)
    errors = []
    for i in range(len(cds)):
        Xt = dense_inputs(backend, i, merged)
        res = ref = 0.0
        for m in LAYERS:
            W0 = backend.weights[m].double()
            W = delta_of([merged], 0, m, W0)
            want = Xs[i][m] @ delta_of(cds, i, m, W0).T
            res += float(((Xt[m] @ W.T - want) ** 2).sum())
            ref += float((want**2).sum())
        errors.append((res / ref) ** 0.5)
    return errors


def assert_layer(got, expected, tol=1e-4):
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * float(expected.abs().max()))


def rel_diff(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


def first_solve(backend, cds, **options):
    """merge_loras' IterIS answer with no re-solve: {layer: U @ Z}."""
    report = merge_loras(backend, lora_files(cds), ["iteris"],
                         MergeOptions(iterations=0, memory_budget=None, **options))
    return {m: dense(f) for m, f in report.results["iteris"].deltas.items()}


def iterate(backend, cds, **config):
    cal = CalibrationStats(backend, cds)
    cal.capture_references(backend, lambda *a: None)
    return run_iteris(backend, cal, IterISConfig(keep_iterates=True, **config), lambda *a: None)


# ----------------------------------------------------------------------------- adaptive weights


def test_adaptive_weights_follow_the_formula_on_inputs_of_very_different_scales():
    """`adaptive_weights` of each captured layer problem is c_i = ||W0 + dW_i||^2 /
    ||X_i (W0 + dW_i)^T||^2 from the LoRA-i model's inputs (W0 alone for a concept not
    touching the layer), and input scales 1, 20, 3 make the c_i differ by orders of magnitude."""
    backend = ChainBackend()
    cds = concept_deltas(backend)
    cal = CalibrationStats(backend, cds)
    cal.capture_references(backend, lambda *a: None)
    Xs = references(backend, cds)
    for m, p in cal.problems().items():
        expected = dense_weights(backend, cds, Xs, m)
        assert adaptive_weights(p) == pytest.approx(expected, rel=1e-5)
        assert cal.weights(p, True) == pytest.approx(expected, rel=1e-5)
        assert max(expected) / min(expected) > 50  # the test problem is one where weights matter


@pytest.mark.parametrize("target", ["average", "sum"])
def test_first_solve_uses_the_adaptive_weights(target):
    """The one-shot merge (iterations=0) equals the dense closed form with X~ = X and the
    adaptive c_i, and differs clearly from the same closed form with equal weights."""
    backend = ChainBackend()
    cds = concept_deltas(backend)
    Xs = references(backend, cds)
    got = first_solve(backend, cds, regularization=1e-2, ridge_target=target)
    for m in LAYERS:
        c = dense_weights(backend, cds, Xs, m)
        expected = dense_solve(backend, cds, Xs, Xs, m, c, 1e-2, target)
        assert_layer(got[m], expected)
        equal = dense_solve(backend, cds, Xs, Xs, m, [1.0] * len(cds), 1e-2, target)
        assert rel_diff(expected, equal) > 0.05


@pytest.mark.parametrize("target", ["average", "sum"])
def test_adaptive_weights_off_gives_the_equal_weight_closed_form(target):
    """MergeOptions(adaptive_weights=False): the first solve is the dense closed form with
    c_i = 1 for every concept."""
    backend = ChainBackend()
    cds = concept_deltas(backend)
    Xs = references(backend, cds)
    got = first_solve(backend, cds, regularization=1e-2, ridge_target=target, adaptive_weights=False)
    for m in LAYERS:
        assert_layer(got[m], dense_solve(backend, cds, Xs, Xs, m, [1.0] * len(cds), 1e-2, target))


# ----------------------------------------------------------------------------- the ridge


@pytest.mark.parametrize("target", ["average", "sum"])
@pytest.mark.parametrize("a", [1e-3, 1.0])
def test_regularization_option_sets_the_frobenius_scaled_ridge(a, target):
    """merge_loras(MergeOptions(iterations=0, regularization=a, ridge_target=t)) equals the
    dense closed form with a1 = a2 = a times the Frobenius norms of the Grams, for both ridge
    targets and two values of a (neither the default 0.1); a ten times larger ridge, or one not
    scaled by the norms (the inputs here have norms far from 1), is a clearly different answer."""
    backend = ChainBackend()
    cds = concept_deltas(backend)
    Xs = references(backend, cds)
    got = first_solve(backend, cds, regularization=a, ridge_target=target)
    for m in LAYERS:
        c = dense_weights(backend, cds, Xs, m)
        expected = dense_solve(backend, cds, Xs, Xs, m, c, a, target)
        assert_layer(got[m], expected)
        assert rel_diff(dense_solve(backend, cds, Xs, Xs, m, c, 10 * a, target), expected) > 0.01
    # the norms matter: ||G_i||_F here is far from 1 (concept 1's inputs are 20 times larger)
    norms = [float(torch.linalg.matrix_norm(X["a"].T @ X["a"])) for X in Xs]
    assert max(norms) > 100 * min(norms)


# ----------------------------------------------------------------------------- the iteration


@pytest.mark.parametrize("target", ["average", "sum"])
def test_resolve_fits_the_merged_models_own_inputs_with_weights_from_the_references(target):
    """Iterate 1 undamped is the dense closed form with C_i = X_i^T X~_i, H_i = X~_i^T X~_i,
    X~_i captured with iterate 0 applied to every layer, and c_i still computed from X_i."""
    backend = ChainBackend()
    cds = concept_deltas(backend)
    out = iterate(backend, cds, iterations=1, damping=1.0, regularization=1e-2, ridge_target=target)
    Xs = references(backend, cds)
    Xts = [dense_inputs(backend, i, out.iterates[0]) for i in range(len(cds))]
    for m in LAYERS:
        c = dense_weights(backend, cds, Xs, m)
        assert_layer(dense(out.iterates[0][m]), dense_solve(backend, cds, Xs, Xs, m, c, 1e-2, target))
        assert_layer(dense(out.iterates[1][m]), dense_solve(backend, cds, Xs, Xts, m, c, 1e-2, target))
    # layer b's inputs drift in the merged model, so the re-solve is not the first solve
    assert rel_diff(dense(out.iterates[1]["b"]), dense(out.iterates[0]["b"])) > 0.01


def test_damping_mixes_the_previous_iterate_and_the_resolve():
    """With iterations=1, iterate 1 at damping 0.5 is 0.5 iterate 0 + 0.5 (iterate 1 at
    damping 1): the re-solve depends only on iterate 0's captures. And it is not the undamped
    iterate (layer b's re-solve differs from its first solve)."""
    backend = ChainBackend()
    cds = concept_deltas(backend)
    half = iterate(backend, cds, iterations=1, damping=0.5, regularization=1e-2)
    full = iterate(backend, cds, iterations=1, damping=1.0, regularization=1e-2)
    for m in LAYERS:
        U0, Z0 = half.iterates[0][m]
        torch.testing.assert_close(full.iterates[0][m][1], Z0)  # the same first solve
        U, Z = half.iterates[1][m]
        assert torch.equal(U, U0)  # U = [B_1 ... B_N] is fixed; only Z is iterated
        assert_layer(Z, 0.5 * Z0.double() + 0.5 * full.iterates[1][m][1].double())
    assert rel_diff(half.iterates[1]["b"][1], full.iterates[1]["b"][1]) > 0.01


def test_damping_03_weights_the_resolve_by_beta():
    """Z_1 = (1 - beta) Z_0 + beta Z*_1 for beta = 0.3 (the factor is beta on the re-solve,
    not on the previous iterate)."""
    backend = ChainBackend()
    cds = concept_deltas(backend)
    part = iterate(backend, cds, iterations=1, damping=0.3, regularization=1e-2)
    full = iterate(backend, cds, iterations=1, damping=1.0, regularization=1e-2)
    for m in LAYERS:
        Z0 = part.iterates[0][m][1].double()
        assert_layer(part.iterates[1][m][1], 0.7 * Z0 + 0.3 * full.iterates[1][m][1].double())


# ----------------------------------------------------------------------------- which iterate is kept

# An undamped merge whose objective goes down, then up (layer a feeds itself, so its inputs
# drift too): its best iterate is neither the first nor the last (checked in the test, from
# the dense errors). BEST_DELTAS: the concept_deltas seed of that problem.
BEST_CASE = dict(iterations=3, damping=1.0, regularization=0.1, ridge_target="sum")
BEST_DELTAS = 5


def test_history_measures_each_iterate_on_its_own_merged_model():
    """history[t].errors are the calibration errors of iterate t, computed densely with X~
    from the model carrying iterate t; the objective is their mean."""
    backend = ChainBackend()
    cds = concept_deltas(backend, seed=BEST_DELTAS)
    out = iterate(backend, cds, **BEST_CASE)
    assert [r.iteration for r in out.history] == list(range(BEST_CASE["iterations"] + 1))
    assert len(out.iterates) == len(out.history)
    for record, merged in zip(out.history, out.iterates):
        expected = dense_errors(backend, cds, merged)
        assert record.errors == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert record.objective == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_keep_best_returns_the_iterate_of_lowest_objective():
    """With keep_best (the default), chosen_iteration is the argmin of the objectives
    (computed densely here), on a problem where that is neither the first nor the last
    iterate, and the returned deltas are that iterate."""
    backend = ChainBackend()
    cds = concept_deltas(backend, seed=BEST_DELTAS)
    out = iterate(backend, cds, **BEST_CASE)
    objectives = [sum(e) / len(e) for e in (dense_errors(backend, cds, it) for it in out.iterates)]
    best = min(range(len(objectives)), key=objectives.__getitem__)
    assert 0 < best < len(objectives) - 1, objectives  # the problem is one that tells first, best and last apart
    assert sorted(objectives)[1] - objectives[best] > 1e-3 * objectives[best]  # a clear winner
    assert out.chosen_iteration == best
    assert out.deltas is out.iterates[best]
    assert out.history[out.chosen_iteration].objective == min(r.objective for r in out.history)


def test_without_keep_best_the_last_iterate_is_returned():
    """keep_best=False: the result is the last iterate, even when an earlier one measured better."""
    backend = ChainBackend()
    cds = concept_deltas(backend, seed=BEST_DELTAS)
    out = iterate(backend, cds, keep_best=False, **BEST_CASE)
    assert out.chosen_iteration == BEST_CASE["iterations"]
    assert out.deltas is out.iterates[-1]
    assert min(r.objective for r in out.history) < out.history[-1].objective


def test_merge_loras_reports_the_kept_iterate_and_its_errors():
    """Through merge_loras, IterIS's result is the best iterate of its history and its
    calibration errors are that iterate's measured errors."""
    backend = ChainBackend()
    cds = concept_deltas(backend, seed=BEST_DELTAS)
    report = merge_loras(backend, lora_files(cds), ["iteris"],
                         MergeOptions(memory_budget=None, **BEST_CASE))
    objectives = [r.objective for r in report.history]
    best = min(range(len(objectives)), key=objectives.__getitem__)
    assert report.chosen_iteration == best
    result = report.results["iteris"]
    assert result.calibration == pytest.approx(dense_errors(backend, cds, result.deltas), rel=1e-4, abs=1e-6)
    assert result.calibration == report.history[best].errors


class FoldedChainBackend(ChainBackend):
    """ChainBackend telling the sink each call's fold (its calibration batch's parity)."""

    def capture(self, concept, reference, merged, modules, sink, progress=lambda *a: None):
        with torch.no_grad():
            for call, x in enumerate(self.data[concept]):
                ref = self.inputs(x, reference)
                mer = None if merged is None else self.inputs(x, merged)
                for m in LAYERS:
                    if m in modules:
                        for k, X in enumerate(ref[m]):
                            sink(m, X, None if mer is None else mer[m][k], folds=call % 2)


def test_automatic_ridge_solves_each_layer_with_its_cross_validated_choice():
    from iteris_sd.merge.ridge import choose_ridge
    from iteris_sd.merge.solve import solve_layer

    backend = FoldedChainBackend(rows=5, calls=4)
    cds = concept_deltas(backend)
    config = IterISConfig(iterations=0, regularization="auto", ridge_target="auto")
    cal = CalibrationStats(backend, cds, track_folds=True)
    outcome = run_iteris(backend, cal, config, lambda *a: None)
    assert set(outcome.ridges) == set(LAYERS) and all(r.validated for r in outcome.ridges.values())
    check = CalibrationStats(backend, cds, track_folds=True)
    check.capture_references(backend, lambda *a: None)
    for m, p in check.problems().items():
        weights = adaptive_weights(p)
        chosen = choose_ridge(p, weights)
        assert outcome.ridges[m] == chosen
        torch.testing.assert_close(outcome.deltas[m][1], solve_layer(p, weights, chosen.a, ridge_target=chosen.target))


def test_automatic_ridge_through_merge_options_reports_its_choices():
    backend = FoldedChainBackend(rows=5, calls=4)
    report = merge_loras(backend, lora_files(concept_deltas(backend)), ["iteris"],
                         MergeOptions(iterations=1, regularization="auto", ridge_target="auto", memory_budget=None))
    assert set(report.ridges) == set(LAYERS)
    assert report.ridge_summary().startswith("ridge chosen by cross-validation: a = ")
    fixed = merge_loras(backend, lora_files(concept_deltas(backend)), ["iteris"],
                        MergeOptions(iterations=1, regularization=0.1, ridge_target="sum", memory_budget=None))
    assert not fixed.ridges and fixed.ridge_summary() is None


def test_every_layer_reports_progress_in_every_pass_the_last_one_included():
    """Each iterate's solves report per layer; the last iterate solves nothing and reports its
    measurement per layer instead, so no long pass is silent."""
    backend = ChainBackend()
    cds = concept_deltas(backend, seed=BEST_DELTAS)
    cal = CalibrationStats(backend, cds)
    cal.capture_references(backend, lambda *a: None)
    calls = []
    run_iteris(backend, cal, IterISConfig(iterations=2), lambda phase, done, total, detail=None: calls.append((phase, done, total)))
    layers = len(cal.layers)
    per_layer = [(phase, done) for phase, done, total in calls if phase in ("solve", "measure")]
    assert all(total == layers for phase, _, total in calls if phase in ("solve", "measure"))
    assert per_layer == [("solve", k) for k in range(1, layers + 1)] * 3 + [("measure", k) for k in range(1, layers + 1)]
