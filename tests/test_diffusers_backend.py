"""The diffusers backend on the tiny SD1 model: paired captures, hooks, delta application."""

import pytest
import torch

from iteris_sd.app.pipeline import concept_deltas
from iteris_sd.backends.calibration import CalibrationSettings
from iteris_sd.backends.load import load_backend
from iteris_sd.lora.read import read_lora
from iteris_sd.merge.iterate import IterISConfig, merge_iteris

pytestmark = pytest.mark.slow
SETTINGS = CalibrationSettings(steps=4, timesteps=2, resolution=32)


@pytest.fixture(scope="module")
def setup(tiny_assets):
    from iteris_demo.tiny import CONCEPTS

    base, paths = tiny_assets
    loras = [read_lora(p) for p in paths]
    backend = load_backend(str(base), [list(c.prompts[:2]) for c in CONCEPTS[:2]], SETTINGS, device="cpu")
    return backend, loras, concept_deltas(backend, loras)


def weights_snapshot(backend):
    return {m: mod.weight.detach().clone() for m, mod in backend.keymap.modules.items()}


def test_capture_pairs_rows_and_leaves_the_model_untouched(setup):
    backend, _, deltas = setup
    before = weights_snapshot(backend)
    seen = {}

    def sink(module, X, Xm, folds=None):
        seen.setdefault(module, []).append((X.clone(), Xm.clone()))

    modules = sorted(deltas[0])
    backend.capture(0, deltas[0], deltas[0], modules, sink)
    # The same deltas on both halves: X~ equals X row for row in every captured layer.
    assert set(seen) == set(modules)
    for pairs in seen.values():
        for X, Xm in pairs:
            assert X.shape == Xm.shape
            torch.testing.assert_close(X, Xm)
    assert all(not mod._forward_hooks for mod in backend.keymap.modules.values())
    after = weights_snapshot(backend)
    assert all(torch.equal(before[m], after[m]) for m in before)


def test_hooked_delta_equals_patching_the_weights(setup):
    backend, _, deltas = setup
    ids = backend.token_ids(["a photo of sks"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    with backend._hooked([deltas[1]]):  # LoRA 2 has 3x3 conv layers
        hooked = backend._guided_eps(x, t, backend._encode(ids, 1), 1)[0]
    saved = weights_snapshot(backend)
    try:
        with torch.no_grad():
            for m, (U, Z) in deltas[1].items():
                w = backend.keymap.modules[m].weight
                w += (U @ Z).reshape(w.shape)
            with backend._hooked([{}]):
                patched = backend._guided_eps(x, t, backend._encode(ids, 1), 1)[0]
    finally:
        with torch.no_grad():
            for m, w in saved.items():
                backend.keymap.modules[m].weight.copy_(w)
    torch.testing.assert_close(hooked, patched, rtol=1e-4, atol=1e-4)


def test_noise_fidelity_is_zero_for_the_lora_itself_and_one_for_the_base(setup):
    backend, _, deltas = setup
    scores = backend.noise_fidelity(["sks at night"], 123, deltas[0], {"same": deltas[0], "base": {}})
    assert scores["same"] == pytest.approx(0.0, abs=1e-6)
    assert scores["base"] == pytest.approx(1.0, abs=1e-6)


def test_stabilised_iteration_keeps_the_best_iterate(setup):
    backend, _, deltas = setup
    outcome = merge_iteris(backend, deltas, IterISConfig(iterations=3))
    objectives = [r.objective for r in outcome.history]
    assert len(objectives) == 4
    assert objectives[outcome.chosen_iteration] == min(objectives)
    assert min(objectives) <= objectives[0]
    assert all(0 <= e < 1 for r in outcome.history for e in r.errors)


def test_iteris_does_not_depend_on_methods_measured_before_it(setup):
    from iteris_sd.app.pipeline import merge_loras
    from iteris_sd.merge.options import MergeOptions

    backend, loras, _ = setup
    alone = merge_loras(backend, loras, ["iteris"], MergeOptions(iterations=1))
    after = merge_loras(backend, loras, ["stack", "iteris"], MergeOptions(iterations=1))
    for m, (_, Z) in alone.results["iteris"].deltas.items():
        torch.testing.assert_close(after.results["iteris"].deltas[m][1], Z)
    assert alone.results["iteris"].calibration == pytest.approx(after.results["iteris"].calibration)


def test_ridge_target_reaches_the_solve_through_merge_options(setup):
    from iteris_sd.app.pipeline import merge_loras
    from iteris_sd.merge.options import MergeOptions

    backend, loras, deltas = setup
    merged = {t: merge_loras(backend, loras, ["iteris"], MergeOptions(iterations=0, ridge_target=t)).results["iteris"].deltas
              for t in ("average", "sum")}
    direct = merge_iteris(backend, deltas, IterISConfig(iterations=0, ridge_target="sum")).deltas
    for m, (_, Z) in direct.items():
        torch.testing.assert_close(merged["sum"][m][1], Z)
    assert any(not torch.allclose(merged["average"][m][1], merged["sum"][m][1]) for m in direct)


def test_a_second_merge_with_other_loras_or_strengths_equals_a_fresh_backends(tiny_assets):
    """Each concept's trajectory is sampled with LoRA i alone: another merge on the same backend
    object (other LoRAs, other strengths) must sample it again, not reuse the first merge's."""
    from iteris_demo.tiny import CONCEPTS
    from iteris_sd.app.pipeline import merge_loras
    from iteris_sd.merge.options import MergeOptions

    base, paths = tiny_assets
    prompts, settings = [list(c.prompts[:1]) for c in CONCEPTS[:2]], CalibrationSettings(steps=2, timesteps=1, resolution=16)
    options = MergeOptions(iterations=0)
    a, b = (read_lora(p) for p in paths)
    reused = load_backend(str(base), prompts, settings, device="cpu")
    merge_loras(reused, [a, b], ["iteris"], options)
    for loras in ([b, a], [read_lora(paths[0], strength=0.5), b]):
        again = merge_loras(reused, loras, ["iteris"], options).results["iteris"]
        fresh = merge_loras(load_backend(str(base), prompts, settings, device="cpu"), loras, ["iteris"],
                            options).results["iteris"]
        assert again.deltas.keys() == fresh.deltas.keys()
        assert all(torch.equal(x, y) for m in fresh.deltas for x, y in zip(again.deltas[m], fresh.deltas[m]))
        assert again.calibration == fresh.calibration
    # the same LoRAs once more, read anew (equal tensors, other objects): the trajectories are reused
    reused._sample = lambda *args, **kwargs: pytest.fail("sampled a trajectory again")
    same = merge_loras(reused, [read_lora(paths[0], strength=0.5), b], ["iteris"], options).results["iteris"]
    assert same.calibration == again.calibration


def test_capture_splits_each_concepts_pictures_into_two_folds(setup):
    """Two prompts per concept: the rows of prompt 0 and of prompt 1 go to different folds, in
    the text encoder and the UNet; with one prompt and one seed only the UNet's calls split."""
    from iteris_sd.merge.calibration import CalibrationStats

    backend, _, deltas = setup
    cal = CalibrationStats(backend, deltas, track_folds=True)
    cal.capture_references(backend, lambda *a: None)
    te = [m for m in cal.layers if m.startswith("text_encoder")]
    unet = [m for m in cal.layers if m.startswith("unet")]
    assert te and unet
    for m in cal.layers:
        for st in cal.stats[m]:
            zero, one = st.fold_rows
            assert zero == one == st.rows / 2  # two prompts of the same length and resolution
            G0, G1 = st.fold_grams64()
            torch.testing.assert_close(G0 + G1, st.gram64())
            assert not torch.allclose(G0, G1)


def test_one_picture_splits_the_unet_by_call_and_leaves_the_text_encoder_whole(tiny_assets):
    from iteris_demo.tiny import CONCEPTS
    from iteris_sd.merge.calibration import CalibrationStats

    base, paths = tiny_assets
    backend = load_backend(str(base), [list(c.prompts[:1]) for c in CONCEPTS[:2]], SETTINGS, device="cpu")
    deltas = concept_deltas(backend, [read_lora(p) for p in paths])
    cal = CalibrationStats(backend, deltas, track_folds=True)
    cal.capture_references(backend, lambda *a: None)
    for m in cal.layers:
        for st in cal.stats[m]:
            if m.startswith("unet"):  # SETTINGS.timesteps = 2 calls, one per fold
                assert st.fold_rows[0] == st.fold_rows[1] > 0
            else:
                assert st.fold_rows[1] == 0 and st.fold_grams64() is None
