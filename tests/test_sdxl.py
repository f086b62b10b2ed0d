"""SDXL through the same driver: two text encoders, pooled embeddings, LDM-style names."""

import json

import pytest
import torch

from iteris_sd.app.pipeline import merge_loras, write_merged
from iteris_sd.backends.calibration import CalibrationSettings
from iteris_sd.backends.diffusers import DiffusersBackend
from iteris_sd.lora.read import read_lora
from iteris_sd.lora.write import write_kohya
from iteris_sd.merge.options import MergeOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl_backend():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from iteris_demo.tiny import tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    common = dict(vocab_size=len(tok), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, projection_dim=16, **common))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    )
    scheduler = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1}
    prompts = [["a photo of sks"], ["zwx style", "a zwx house"]]
    settings = CalibrationSettings(steps=3, timesteps=2, resolution=64, sampler="euler")
    return DiffusersBackend(unet.eval(), [te1.eval(), te2.eval()], [tok, tok], scheduler, prompts, settings)


def random_lora(backend, path, modules, rank, seed):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for m in modules:
        w = backend.keymap.modules[m].weight
        up = torch.randn(w.shape[0], rank, generator=g) * 0.1
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        layers[backend.output_name(m)] = (up, down, float(rank))
    write_kohya(path, layers, {}, dtype="fp32")
    return read_lora(path)


def test_sdxl_merge_runs_and_writes_ldm_names(sdxl_backend, tmp_path):
    backend = sdxl_backend
    assert backend.family == "sdxl"
    ids = list(backend.keymap.modules)
    te1 = next(m for m in ids if m.startswith("text_encoder.") and m.endswith("q_proj"))
    te2 = next(m for m in ids if m.startswith("text_encoder_2.") and m.endswith("v_proj"))
    attn = [m for m in ids if m.endswith("attn2.to_k")][:2]
    conv = next(m for m in ids if m.endswith("resnets.0.conv1"))
    a = random_lora(backend, tmp_path / "a.safetensors", [te1, *attn, conv], 2, 1)
    b = random_lora(backend, tmp_path / "b.safetensors", [te2, attn[0]], 3, 2)
    report = merge_loras(backend, [a, b], ["iteris", "stack"], MergeOptions(iterations=1))
    assert len(report.history) == 2
    for r in report.results.values():
        assert all(0 <= e < 10 for e in r.calibration)
    # te2 is touched only by LoRA b, yet the solve still asks LoRA a's prompts for base behaviour there
    assert report.results["iteris"].deltas[te2][0].shape[1] == 3
    out = tmp_path / "merged.safetensors"
    write_merged(str(out), backend, report.results["iteris"].deltas, inputs=[a, b], recipe={"method": "iteris"},
                 dtype="fp16")
    merged = read_lora(out)
    assert merged.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    names = set(merged.layers)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_unet_input_blocks_") or n.startswith("lora_unet_output_blocks_") for n in names)
    assert json.loads(merged.metadata["merged_from"])[1]["name"] == "b"
    # the file maps back onto the same modules
    assert set(backend.match(merged)) == {te1, te2, *attn, conv}
