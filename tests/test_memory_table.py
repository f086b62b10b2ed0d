"""The memory table's layer lists and what the planner promises for them at real sizes
(plans only: nothing is built or run)."""

from __future__ import annotations

from collections import Counter

import pytest

from iteris_demo.memory_table import flux_layers, markdown, plan_for, sdxl_layers, solved_dual, table_row, widest_square
from iteris_sd.merge.plan import GiB, MiB, layer_bytes
from iteris_sd.merge.stats import gram_bytes


def test_flux_layers_are_the_double_and_single_block_linears():
    layers = flux_layers()
    assert len(layers) == 19 * 2 * 4 + 38 * 2 == 228
    assert len({t.name for t in layers}) == 228
    shapes = Counter((t.d_out, t.d_in) for t in layers)
    assert shapes == {(9216, 3072): 38, (3072, 3072): 38, (12288, 3072): 38, (3072, 12288): 38,
                      (21504, 3072): 38, (3072, 15360): 38}
    rows = {t.name: t.rows for t in layers}
    assert rows["diffusion_model.double_blocks.0.img_attn.qkv"] == 12 * 4096
    assert rows["diffusion_model.double_blocks.0.txt_mlp.2"] == 12 * 512


def test_sdxl_layers_are_the_unet_transformers_and_both_text_encoders():
    layers = sdxl_layers()
    assert len({t.name for t in layers}) == len(layers) == 70 * 10 + 11 * 2 + 12 * 6 + 32 * 6
    context = [t for t in layers if t.name.endswith(("attn2.to_k", "attn2.to_v"))]
    assert len(context) == 140 and {t.d_in for t in context} == {2048}
    ff_out = Counter(t.d_in for t in layers if t.name.endswith("ff.net.2"))
    assert ff_out == {4 * 640: 10, 4 * 1280: 60}  # 2 x 2 + 3 x 2 blocks at 640, 2 x 10 + 10 + 3 x 10 at 1280
    assert max(t.d_in for t in layers) == 5120  # ff.net.2 at 1280 and OpenCLIP-G's fc2


def test_token_samples_keep_flux_wide_layers_free_of_d_in_squared_matrices():
    budget = 12 * GiB
    plan = plan_for(flux_layers(), 2, budget, tokens=1024)
    assert set(plan.tokens) == set(plan.specs)
    assert all(solved_dual(plan, m) for m in plan.specs) and widest_square(plan) == 0
    assert "228 solved in the dual form" in plan.describe()  # the planner's own count agrees
    for m, spec in plan.specs.items():
        if spec.d_in >= 12288:
            reference, paired, solve = plan.costs(m)
            assert reference + paired < plan.concepts * gram_bytes(spec.d_in)  # less than the reference Grams alone
            weights = 8 * spec.d_in * (2 * spec.d_out + 3 * spec.rank)  # float64 (d_out, d_in) copies and factors
            assert solve - weights < gram_bytes(spec.d_in, itemsize=8)  # the rest: under one float64 d_in x d_in
    assert plan.estimated_peak() <= budget
    assert sorted(m for c in plan.chunks for m in c) == sorted(plan.specs)


def test_default_plan_samples_exactly_the_layers_that_do_not_fit_alone():
    budget, loras = 24 * GiB, 8
    plan = plan_for(flux_layers(), loras, budget, tokens=None)
    alone = {m for m, s in plan.specs.items() if sum(layer_bytes(s, loras, None)) > budget}
    assert set(plan.tokens) == alone and {plan.specs[m].d_in for m in alone} == {15360}
    for m, k in plan.tokens.items():  # the largest sample that fits
        assert plan.min_layer_bytes(m) <= budget
        plan.tokens[m] = k + 1
        assert plan.min_layer_bytes(m) > budget
        plan.tokens[m] = k
    assert plan.estimated_peak() <= budget
    assert all(plan.persistent_bytes() + plan.chunk_bytes(c) <= budget for c in plan.chunks)


@pytest.mark.parametrize("budget, fits", [(24 * GiB, "yes"), (64 * MiB, "no")])
def test_table_row_says_whether_the_plan_fits(budget, fits):
    row = table_row("Flux.1", 4, budget, 1024)
    assert row["fits"] == fits
    text = markdown([row])
    assert text.count("\n") == 2 and f"| {fits} |" in text
