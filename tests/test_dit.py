"""SD3 and Flux.1 in the diffusers backend and the CLI, on tiny random-weight pipeline folders
(`iteris_demo.tiny_dit`): the calibration samples what diffusers' own pipelines sample, LoRAs
in diffusers/PEFT (`transformer.`) and OneTrainer (`lora_transformer_`, `lora_te*_`) names
match, and the CLI writes a merge that reads back as the deltas it merged."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from iteris_demo.tiny_dit import build_tiny_flux, build_tiny_sd3
from iteris_sd.app.cli import main
from iteris_sd.app.pipeline import merge_loras
from iteris_sd.backends.calibration import CalibrationSettings
from iteris_sd.backends.diffusers import DiffusersBackend, make_scheduler
from iteris_sd.backends.load import load_backend
from iteris_sd.lora.keymap import ShapeMismatchError
from iteris_sd.lora.read import read_lora
from iteris_sd.merge.options import MergeOptions
from iteris_sd.seeds import fold_seed

SIDE = 16  # latent pixels; no VAE, so also the calibration resolution
PROMPTS = [["a photo of sks", "sks on a beach"], ["a house, zwx style"]]
BUILDERS = {"sd3": build_tiny_sd3, "flux": build_tiny_flux, "flux_schnell": lambda p: build_tiny_flux(p, guidance=False)}


@pytest.fixture(scope="module", params=list(BUILDERS))
def dit(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp("dit") / request.param)
    settings = CalibrationSettings(steps=3, timesteps=2, resolution=SIDE)
    return request.param, folder, load_backend(str(folder), PROMPTS, settings, device="cpu")


def _module(backend, suffix: str) -> str:
    return next(m for m in backend.keymap.modules if m.endswith(suffix))


def _lora_on(backend, modules: list[str], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        w = backend.keymap.modules[m].weight
        out[m] = (torch.randn(w.shape[0], rank, generator=g) * 0.3, torch.randn(rank, w.shape[1], generator=g) * 0.3)
    return out


def write_peft(path: Path, layers: dict) -> Path:
    """diffusers/PEFT keys: "<component>.<module path>.lora_A/B.weight" (no alpha: scale 1)."""
    tensors = {}
    for m, (up, down) in layers.items():
        tensors[f"{m}.lora_A.weight"] = down.contiguous()
        tensors[f"{m}.lora_B.weight"] = up.contiguous()
    save_file(tensors, str(path))
    return path


def write_onetrainer(path: Path, backend, layers: dict) -> Path:
    """kohya keys with OneTrainer's names (``lora_transformer_``, ``lora_te1_``, ``lora_te3_``)."""
    tensors = {}
    for m, (up, down) in layers.items():
        name = backend.output_name(m)
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(up.shape[1]))
    save_file(tensors, str(path))
    return path


def two_loras(backend, folder: Path):
    """LoRA a in PEFT names on attention q, k, v and a text encoder; LoRA b in OneTrainer names
    on q (shared with a), a feed-forward and T5."""
    q, k, v = (_module(backend, f"transformer_blocks.0.attn.to_{p}") for p in "qkv")
    ff = _module(backend, "transformer_blocks.0.ff.net.2")
    clip = _module(backend, "encoder.layers.0.self_attn.q_proj")
    t5 = _module(backend, "SelfAttention.q")
    a = _lora_on(backend, [q, k, v, clip], 2, 1)
    b = _lora_on(backend, [q, ff, t5], 3, 2)
    return write_peft(folder / "a.safetensors", a), write_onetrainer(folder / "b.safetensors", backend, b)


def test_family_and_calibration_defaults_come_from_the_model(dit):
    name, _, backend = dit
    assert backend.family == name.removesuffix("_schnell")
    assert backend.settings.cfg == (1.0 if backend.family == "flux" else 5.0)
    rows = 1 if backend.family == "flux" else 2  # Flux is guidance-distilled: no negative prompt
    ids = backend.token_ids(["a photo of sks"])
    assert [t.shape[0] for t in ids] == [rows] * len(backend.text_encoders)
    assert backend.base_model_version == {"sd3": "sd3", "flux": "flux1"}[backend.family]


def test_sampling_matches_the_diffusers_pipeline(dit):
    """The backend's trajectory (text conditioning, timesteps, shift, Flux's packing, ids and
    guidance, SD3's CFG) ends where diffusers' own pipeline ends from the same noise."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    _, _, backend = dit
    noise = torch.randn(1, backend.denoiser.latent_channels, SIDE, SIDE, generator=torch.Generator().manual_seed(fold_seed(7)))
    ours = backend.sample(["a photo of sks"], 7, {})
    parts = dict(transformer=backend.model, scheduler=make_scheduler("euler", backend.scheduler_config), vae=None)
    if backend.family == "sd3":
        pipe = StableDiffusion3Pipeline(text_encoder=backend.text_encoders[0], tokenizer=backend.tokenizers[0],
                                        text_encoder_2=backend.text_encoders[1], tokenizer_2=backend.tokenizers[1],
                                        text_encoder_3=backend.text_encoders[2], tokenizer_3=backend.tokenizers[2], **parts)
        theirs = pipe("a photo of sks", height=8 * SIDE, width=8 * SIDE, num_inference_steps=3, guidance_scale=5.0,
                      latents=noise, max_sequence_length=77, output_type="latent").images
    else:
        pipe = FluxPipeline(text_encoder=backend.text_encoders[0], tokenizer=backend.tokenizers[0],
                            text_encoder_2=backend.text_encoders[1], tokenizer_2=backend.tokenizers[1], **parts)
        packed = pipe._pack_latents(noise, 1, noise.shape[1], SIDE, SIDE)
        out = pipe("a photo of sks", height=8 * SIDE, width=8 * SIDE, num_inference_steps=3, guidance_scale=3.5,
                   latents=packed, max_sequence_length=77, output_type="latent").images
        theirs = pipe._unpack_latents(out, 8 * SIDE, 8 * SIDE, 8)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def test_a_merge_of_one_lora_is_that_lora(dit, tmp_path):
    _, _, two = dit
    backend = DiffusersBackend(two.model, two.text_encoders, two.tokenizers, two.scheduler_config, PROMPTS[:1], two.settings)
    a, _ = two_loras(backend, tmp_path)
    lora = read_lora(a)
    matched = backend.match(lora)
    report = merge_loras(backend, [lora], ["iteris"], MergeOptions(iterations=1))
    deltas = report.results["iteris"].deltas
    assert set(deltas) == set(matched)
    for m, layer in matched.items():
        U, Z = deltas[m]
        torch.testing.assert_close(U @ Z, layer.dense_delta().reshape(U.shape[0], -1).float(), rtol=1e-3, atol=1e-4)


def test_cli_merges_peft_and_onetrainer_loras_into_one_exact_lora(dit, tmp_path, capsys):
    name, folder, backend = dit
    a, b = two_loras(backend, tmp_path)
    out = tmp_path / "merged.safetensors"
    recipe = tmp_path / "r.toml"
    text = f'base = "{folder}"\noutput = "{out}"\ndtype = "fp32"\ndevice = "cpu"\niterations = 2\ncompare = ["stack"]\n'
    text += f"[calibration]\nresolution = {SIDE}\nsteps = 3\ntimesteps = 2\n"
    for path, prompts in zip((a, b), PROMPTS):
        text += f'[[lora]]\npath = "{path}"\nprompts = {json.dumps(prompts)}\n'
    recipe.write_text(text)
    assert main(["merge", str(recipe)]) == 0, capsys.readouterr().err
    merged = read_lora(out)
    assert merged.metadata["ss_base_model_version"] == backend.base_model_version
    inputs = [read_lora(a), read_lora(b)]
    wanted = {backend.output_name(m) for f in inputs for m in backend.match(f)}
    assert set(merged.layers) == wanted
    assert any(n.startswith("lora_transformer_transformer_blocks_0_attn_to_q") for n in merged.layers)
    assert any(n.startswith("lora_te3_encoder_block_") for n in merged.layers)
    for layer_name, layer in merged.layers.items():  # exact low rank: the sum of the input ranks
        assert layer.dense is None
        ranks = [f.layers[n].rank for f in inputs for n in f.layers if backend.output_name(backend.keymap.lookup[n]) == layer_name]
        assert layer.rank == sum(ranks)
    # it reads back onto the same modules, and moves the model toward each LoRA
    assert set(backend.match(merged)) == {m for f in inputs for m in backend.match(f)}
    recipe_meta = json.loads(merged.metadata["iteris_recipe"])
    assert all(0 <= e < 1 for e in recipe_meta["calibration_error"].values())


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    folder = build_tiny_flux(tmp_path_factory.mktemp("flux") / "flux")
    return load_backend(str(folder), PROMPTS, CalibrationSettings(steps=2, timesteps=1, resolution=SIDE), device="cpu")


BFL_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_mod.lin",
              "single_blocks.0.linear1", "final_layer.adaLN_modulation.1")


def kohya_flux_lora(backend, path: Path, rank: int = 2, seed: int = 3) -> Path:
    """A kohya (sd-scripts) Flux LoRA: BFL module names, on fused modules, with alpha."""
    modules = dict(backend.model.named_modules())
    widths = {"double_blocks.0.img_attn.qkv": 3 * modules["transformer_blocks.0.attn.to_q"].weight.shape[0],
              "double_blocks.0.txt_attn.qkv": 3 * modules["transformer_blocks.0.attn.add_q_proj"].weight.shape[0],
              "double_blocks.0.img_mod.lin": modules["transformer_blocks.0.norm1.linear"].weight.shape[0],
              "single_blocks.0.linear1": sum(modules[f"single_transformer_blocks.0.{p}"].weight.shape[0]
                                             for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
              "final_layer.adaLN_modulation.1": modules["norm_out.linear"].weight.shape[0]}
    d_in = {"single_blocks.0.linear1": modules["single_transformer_blocks.0.attn.to_q"].weight.shape[1]}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for bfl in BFL_LAYERS:
        name = "lora_unet_" + bfl.replace(".", "_")
        width_in = d_in.get(bfl, modules["transformer_blocks.0.attn.to_q"].weight.shape[1])
        tensors[f"{name}.lora_up.weight"] = torch.randn(widths[bfl], rank, generator=g)
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, width_in, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


def test_kohya_flux_layers_on_fused_modules_split_exactly(flux, tmp_path):
    """Each fused BFL layer becomes one LoRA layer per diffusers module, of the same rank,
    whose deltas put back in BFL's layout (`to_bfl`, checked against diffusers' own
    converter below) are the file's deltas."""
    lora = read_lora(kohya_flux_lora(flux, tmp_path / "kohya.safetensors"))
    matched = flux.match(lora)
    assert all(layer.rank == 2 for layer in matched.values())
    assert {"transformer.single_transformer_blocks.0.proj_mlp", "transformer.transformer_blocks.0.attn.add_v_proj",
            "transformer.norm_out.linear"} <= set(matched)
    fused = to_bfl({m.removeprefix("transformer.") + ".weight": layer.dense_delta() for m, layer in matched.items()})
    for bfl in BFL_LAYERS:
        torch.testing.assert_close(fused[bfl + ".weight"], lora.layers["lora_unet_" + bfl.replace(".", "_")].dense_delta())


def test_a_kohya_flux_lora_merges_with_a_peft_one_onto_the_same_modules(flux, tmp_path):
    a = read_lora(kohya_flux_lora(flux, tmp_path / "kohya.safetensors"))
    to_q = "transformer.transformer_blocks.0.attn.to_q"
    b = read_lora(write_peft(tmp_path / "peft.safetensors", _lora_on(flux, [to_q], 3, 4)))
    report = merge_loras(flux, [a, b], ["iteris"], MergeOptions(iterations=1))
    deltas = report.results["iteris"].deltas
    assert deltas[to_q][0].shape[1] == 2 + 3  # exact rank sum on the shared module
    assert deltas["transformer.transformer_blocks.0.attn.to_k"][0].shape[1] == 2


def test_a_short_fused_delta_is_refused_in_one_line(flux, tmp_path):
    path = tmp_path / "short.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 16),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(20, 2)}, str(path))
    with pytest.raises(ShapeMismatchError, match=r"short.safetensors: layer lora_unet_double_blocks_0_img_attn_qkv has a "
                                                 r"delta of shape \(20, 16\) but the modules it spans .* have 48 rows"):
        flux.match(read_lora(path))


# --- a single-file Flux transformer, as BFL ships it -------------------------------------
# Written here on purpose, apart from iteris_sd.lora.flux: an oracle that diffusers' own converter
# checks (the single-file test), against which the core's split of kohya layers is tested.

_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
                "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
                "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                "attn.add_v_proj": ("txt_attn.qkv", 2)}
_FLUX_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
                "proj_mlp": ("linear1", 3), "proj_out": "linear2", "norm.linear": "modulation.lin",
                "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_FLUX_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
             "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
             "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
             "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
             "norm_out.linear": "final_layer.adaLN_modulation.1"}


def to_bfl(state_dict: dict) -> dict:
    """A diffusers FluxTransformer2DModel state dict in BFL's layout (fused qkv and linear1,
    norm weights as ``.scale``, the final modulation's halves swapped)."""
    out, fused = {}, {}
    for key, value in state_dict.items():
        name, end = key.rsplit(".", 1)
        prefix, table, part = "", _FLUX_TOP, name
        for blocks, bfl, parts in (("transformer_blocks", "double_blocks", _FLUX_DOUBLE),
                                   ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE)):
            if name.startswith(blocks + "."):
                index, part = name[len(blocks) + 1:].split(".", 1)
                prefix, table = f"{bfl}.{index}.", parts
        target = table[part]
        if isinstance(target, str) and target.endswith(("query_norm", "key_norm")):
            end = "scale"
        if isinstance(target, tuple):
            fused.setdefault(f"{prefix}{target[0]}.{end}", {})[target[1]] = value
            continue
        if part == "norm_out.linear":
            value = torch.cat(value.chunk(2)[::-1])
        out[f"{prefix}{target}.{end}"] = value
    for key, pieces in fused.items():
        out[key] = torch.cat([pieces[k] for k in sorted(pieces)])
    return out


@pytest.mark.slow
def test_a_single_file_flux_transformer_loads_with_base_config(tmp_path):
    """A BFL-layout file (bf16, "model.diffusion_model." keys) of a full-width Flux with one
    block of each kind, its text encoders and configs from the diffusers folder."""
    folder = build_tiny_flux(tmp_path / "flux", full_width=True)
    settings = CalibrationSettings(steps=2, timesteps=1, resolution=SIDE)
    from_folder = load_backend(str(folder), PROMPTS, settings, device="cpu")
    reference = {k: v.bfloat16() for k, v in from_folder.model.state_dict().items()}
    single = tmp_path / "flux1-tiny.safetensors"
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in to_bfl(reference).items()}, str(single))
    with pytest.raises(ValueError, match=r"flux1-tiny.safetensors: a single-file Flux transformer needs base_config"):
        load_backend(str(single), PROMPTS, settings, device="cpu")
    backend = load_backend(str(single), PROMPTS, settings, device="cpu", base_config=str(folder))
    loaded = backend.model.state_dict()
    assert set(loaded) == set(reference) and all(torch.equal(loaded[k].bfloat16(), reference[k]) for k in reference)
    assert backend.family == "flux" and len(backend.text_encoders) == 2
    from_folder.model.load_state_dict({k: v.float() for k, v in reference.items()})  # the same bf16-rounded weights
    torch.testing.assert_close(backend.sample(["a photo of sks"], 3, {}), from_folder.sample(["a photo of sks"], 3, {}))
