"""The memory planner's decisions at real model sizes, from the layer shapes alone (no model
is built): `python -m iteris_demo.memory_table` prints a markdown table.

Layers (d_out, d_in), every one a LoRA may target:
- SDXL: the UNet's transformer blocks (attn1/attn2 to_q, to_k, to_v, to_out.0; ff.net.0.proj
  (8C, C), GEGLU; ff.net.2 (C, 4C); attn2's to_k/to_v read the 2048-wide text context) and
  each Transformer2DModel's proj_in/proj_out: depth 2 at 640 channels (2 in the down path, 3
  in the up path), 10 at 1280 (2 down, 1 middle, 3 up), none at 320; plus CLIP-L (12 layers,
  768 wide, MLP 3072) and OpenCLIP-G (32 layers, 1280, MLP 5120): q/k/v/out_proj, fc1, fc2.
  986 layers.
- Flux.1 (12B): 19 double blocks, per side (img, txt) attn.qkv (9216, 3072), attn.proj
  (3072, 3072), mlp.0 (12288, 3072), mlp.2 (3072, 12288); 38 single blocks, linear1
  (21504, 3072), linear2 (3072, 15360). 228 layers.

Every LoRA is rank 16 on every layer. Rows one LoRA's calibration pass feeds a layer (they
decide only whether a token sample is exact, i.e. keeps every row): 3 prompts x 4 captured
timesteps = 12 calls at 1024 x 1024 px. SDXL runs each call as a CFG batch of 2: 2 x 4096
image tokens at 640 channels (64 x 64), 2 x 1024 at 1280 (32 x 32), 2 x 77 text tokens into
to_k/to_v; its text encoders see 2 x 77 tokens per prompt. Flux (guidance-distilled, batch 1):
4096 image tokens, 512 text tokens, 4608 in the single blocks.

Per (family, LoRAs, budget, tokens) the planner (`iteris_sd.merge.plan.make_plan`, the CUDA
device, 5 iterations, a fixed ridge) decides the form of each layer's statistics, whether the
reference statistics are kept, and the chunks. The budget is the planner's: memory for the
statistics and solves beside the model's weights and activations (on a 24 GiB card holding
Flux in bf16 hardly any is left); "d_in x d_in up to" is the widest layer whose
statistics or solve still hold a d_in x d_in matrix (Gram form, or a sample solved in the
primal form); passes are forward passes per LoRA (reference + paired), each 12 calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from iteris_sd.merge.plan import GiB, LayerSpec, Plan, PlanError, fmt_bytes, make_plan
from iteris_sd.merge.solve import dual_is_cheaper

RANK = 16
CALLS = 3 * 4  # prompts per LoRA x captured timesteps
LORA_COUNTS = (2, 4, 8)
BUDGETS = (12 * GiB, 24 * GiB)
TOKEN_SETTINGS = (None, 4096, 1024)  # None: the planner's default (exact unless a layer alone does not fit)


@dataclass(frozen=True)
class TargetLayer:
    """A LoRA-targetable layer: its shape and the input rows one LoRA's calibration pass feeds it."""

    name: str
    d_in: int
    d_out: int
    rows: int


def _transformer_block(prefix: str, width: int, image_rows: int, text_rows: int) -> list[TargetLayer]:
    """The ten targets of one SDXL BasicTransformerBlock at ``width`` channels."""
    square = [f"attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")] + ["attn2.to_q", "attn2.to_out.0"]
    layers = [TargetLayer(f"{prefix}.{p}", width, width, image_rows) for p in square]
    layers += [TargetLayer(f"{prefix}.attn2.{p}", 2048, width, text_rows) for p in ("to_k", "to_v")]
    layers += [TargetLayer(f"{prefix}.ff.net.0.proj", width, 8 * width, image_rows),
               TargetLayer(f"{prefix}.ff.net.2", 4 * width, width, image_rows)]
    return layers


def _text_encoder(prefix: str, depth: int, width: int, mlp: int, rows: int) -> list[TargetLayer]:
    layers = []
    for i in range(depth):
        p = f"{prefix}.text_model.encoder.layers.{i}"
        layers += [TargetLayer(f"{p}.self_attn.{q}", width, width, rows) for q in ("q_proj", "k_proj", "v_proj", "out_proj")]
        layers += [TargetLayer(f"{p}.mlp.fc1", width, mlp, rows), TargetLayer(f"{p}.mlp.fc2", mlp, width, rows)]
    return layers


def sdxl_layers() -> list[TargetLayer]:
    """SDXL's UNet transformer layers and both text encoders (module docstring)."""
    text_rows = CALLS * 2 * 77
    # (Transformer2DModel, depth, channels, latent side at 1024 px)
    attentions = ([(f"down_blocks.1.attentions.{a}", 2, 640, 64) for a in range(2)]
                  + [(f"down_blocks.2.attentions.{a}", 10, 1280, 32) for a in range(2)]
                  + [("mid_block.attentions.0", 10, 1280, 32)]
                  + [(f"up_blocks.0.attentions.{a}", 10, 1280, 32) for a in range(3)]
                  + [(f"up_blocks.1.attentions.{a}", 2, 640, 64) for a in range(3)])
    layers = []
    for name, depth, width, side in attentions:
        image_rows = CALLS * 2 * side * side
        layers += [TargetLayer(f"unet.{name}.{p}", width, width, image_rows) for p in ("proj_in", "proj_out")]
        for b in range(depth):
            layers += _transformer_block(f"unet.{name}.transformer_blocks.{b}", width, image_rows, text_rows)
    prompt_rows = 3 * 2 * 77  # the text encoders run once per prompt, negative prompt beside it
    return layers + _text_encoder("text_encoder", 12, 768, 3072, prompt_rows) + _text_encoder(
        "text_encoder_2", 32, 1280, 5120, prompt_rows)


def flux_layers() -> list[TargetLayer]:
    """Flux.1's double- and single-block linears (module docstring)."""
    rows = {"img": CALLS * 4096, "txt": CALLS * 512}
    layers = []
    for b in range(19):
        for side in ("img", "txt"):
            p = f"diffusion_model.double_blocks.{b}.{side}_"
            layers += [TargetLayer(p + "attn.qkv", 3072, 9216, rows[side]),
                       TargetLayer(p + "attn.proj", 3072, 3072, rows[side]),
                       TargetLayer(p + "mlp.0", 3072, 12288, rows[side]),
                       TargetLayer(p + "mlp.2", 12288, 3072, rows[side])]
    for b in range(38):
        p = f"diffusion_model.single_blocks.{b}."
        layers += [TargetLayer(p + "linear1", 3072, 21504, CALLS * 4608),
                   TargetLayer(p + "linear2", 15360, 3072, CALLS * 4608)]
    return layers


FAMILIES = {"SDXL": sdxl_layers, "Flux.1": flux_layers}


def plan_for(layers: list[TargetLayer], loras: int, budget: int | None, tokens: int | None) -> Plan:
    """The planner's plan for ``loras`` rank-16 LoRAs on every layer (raises PlanError)."""
    specs = [LayerSpec(t.name, t.d_in, t.d_out, RANK * loras) for t in layers]
    return make_plan(specs, loras, budget, tokens=tokens, device="cuda")


def solved_dual(plan: Plan, name: str) -> bool:
    """Whether a layer is a token sample the plan solves in the dual (rows x rows) form."""
    k = plan.tokens.get(name)
    spec = plan.specs[name]
    return k is not None and dual_is_cheaper(spec.d_in, plan.concepts * k, spec.rank)


def widest_square(plan: Plan) -> int:
    """The largest d_in whose statistics or solve hold a d_in x d_in matrix (0: none)."""
    return max((s.d_in for m, s in plan.specs.items() if not solved_dual(plan, m)), default=0)


def statistics_cell(plan: Plan, rows: dict[str, int]) -> str:
    sampled = plan.tokens
    if not sampled:
        return f"Gram: all {len(plan.specs)}"
    ks = sorted(set(sampled.values()))
    k = f"k {ks[0]}" if len(ks) == 1 else f"k {ks[0]}..{ks[-1]}"
    dual = sum(solved_dual(plan, m) for m in sampled)
    exact = sum(rows[m] <= k_m for m, k_m in sampled.items())
    return (f"Gram {len(plan.specs) - len(sampled)}, samples {len(sampled)} ({k}; {dual} dual, "
            f"{exact} exact)")


def table_row(family: str, loras: int, budget: int, tokens: int | None) -> dict:
    layers = FAMILIES[family]()
    row = {"family": family, "LoRAs": loras, "budget": fmt_bytes(budget), "tokens": tokens or "unset"}
    try:
        plan = plan_for(layers, loras, budget, tokens)
    except PlanError as exc:
        return row | {"statistics": f"no plan: {exc}", "fits": "no"}
    ref, paired = plan.passes()
    peak = plan.estimated_peak()
    return row | {
        "statistics": statistics_cell(plan, {t.name: t.rows for t in layers}),
        "d_in x d_in up to": widest_square(plan) or "none",
        "reference": "kept" if plan.keep_reference else "recomputed",
        "chunks": len(plan.chunks),
        "passes per LoRA": f"{ref} + {paired}",
        "peak estimate": fmt_bytes(peak),
        "one chunk needs": fmt_bytes(plan_for(layers, loras, None, tokens).estimated_peak()),
        "fits": "yes" if peak <= budget else "no",
    }


def table_rows() -> list[dict]:
    return [table_row(f, n, b, t) for f in FAMILIES for n in LORA_COUNTS for b in BUDGETS for t in TOKEN_SETTINGS]


COLUMNS = ("family", "LoRAs", "budget", "tokens", "statistics", "d_in x d_in up to", "reference", "chunks",
           "passes per LoRA", "peak estimate", "one chunk needs", "fits")


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    print(markdown(table_rows()))


if __name__ == "__main__":
    main()
