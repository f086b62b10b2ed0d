"""Tests for iteris_sd.lora.read and iteris_sd.lora.write: reading every LoRA layout to exact deltas, and writing kohya files."""

from __future__ import annotations

import json
import os
import pickle
import random

import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

from iteris_sd.lora.layer import LoraFile
from iteris_sd.lora.read import LoraFormatError, read_lora
from iteris_sd.lora.write import kohya_metadata, write_kohya

GEN = torch.Generator().manual_seed(0)
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
ATTN_KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"


def rnd(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def save(tmp_path, tensors, name="lora.safetensors", metadata=None):
    path = tmp_path / name
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def only_layer(lora: LoraFile):
    assert len(lora.layers) == 1, list(lora.layers)
    return next(iter(lora.layers.values()))


def read_error(path, match: str, exc=LoraFormatError) -> str:
    """Read ``path`` expecting ``exc``; check the one-line message names the file."""
    with pytest.raises(exc, match=match) as info:
        read_lora(path)
    message = str(info.value)
    assert os.path.basename(str(path)) in message and "\n" not in message
    return message


# Independent formulas for the expected deltas ----------------------------------------------


def tucker_by_loops(core, w_out, w_in):
    """W[p, q, h, w] = sum_ij core[i, j, h, w] w_out[i, p] w_in[j, q], as a sum of outer products."""
    out = torch.zeros(w_out.shape[1], w_in.shape[1], *core.shape[2:])
    for i in range(core.shape[0]):
        for j in range(core.shape[1]):
            out += core[i, j][None, None] * w_out[i][:, None, None, None] * w_in[j][None, :, None, None]
    return out


def kron_by_blocks(w1, w2):
    """Block (i, j) of the result is w1[i, j] * w2."""
    (a, b), (c, d) = w1.shape, w2.shape[:2]
    out = torch.zeros(a * c, b * d, *w2.shape[2:])
    for i in range(a):
        for j in range(b):
            out[i * c : (i + 1) * c, j * d : (j + 1) * d] = w1[i, j] * w2
    return out


def dora_by_rows(W0, dW, magnitude, strength):
    """strength * (m * (W0 + dW) / ||rows of W0 + dW|| - W0)."""
    W = W0 + dW
    norms = torch.stack([row.flatten().norm() for row in W])
    return strength * (magnitude.reshape(-1, *[1] * (W.dim() - 1)) * W / norms.reshape(-1, *[1] * (W.dim() - 1)) - W0)


# Low-rank layouts -------------------------------------------------------------------------


def test_kohya_with_alpha(tmp_path):
    up, down = rnd(5, 2), rnd(2, 3)
    path = save(tmp_path, {f"{ATTN_KOHYA}_to_q.lora_up.weight": up,
                           f"{ATTN_KOHYA}_to_q.lora_down.weight": down,
                           f"{ATTN_KOHYA}_to_q.alpha": torch.tensor(1.0)})  # fmt: skip
    lora = read_lora(path)
    layer = only_layer(lora)
    assert layer.name == f"{ATTN_KOHYA}_to_q"
    assert layer.alpha == 1.0 and layer.scale == pytest.approx(0.5)
    torch.testing.assert_close(layer.dense_delta(), up @ down * 0.5)
    assert lora.format == "kohya" and lora.name == "lora" and lora.path == str(path)


def test_kohya_without_alpha_has_scale_one(tmp_path):
    up, down = rnd(5, 2), rnd(2, 3)
    path = save(tmp_path, {"lora_te_x.lora_up.weight": up, "lora_te_x.lora_down.weight": down})
    layer = only_layer(read_lora(path))
    assert layer.alpha is None and layer.scale == 1.0
    torch.testing.assert_close(layer.dense_delta(), up @ down)


def test_alpha_zero_is_kept_and_gives_zero_delta(tmp_path):
    path = save(tmp_path, {"lora_te_x.lora_up.weight": rnd(5, 2), "lora_te_x.lora_down.weight": rnd(2, 3),
                           "lora_te_x.alpha": torch.tensor(0.0)})  # fmt: skip
    layer = only_layer(read_lora(path))
    assert layer.alpha == 0.0
    assert torch.count_nonzero(layer.dense_delta()) == 0


def test_strength_multiplies_and_is_recorded(tmp_path):
    up, down = rnd(5, 2), rnd(2, 3)
    path = save(tmp_path, {"lora_te_x.lora_up.weight": up, "lora_te_x.lora_down.weight": down,
                           "lora_te_x.alpha": torch.tensor(4.0)})  # fmt: skip
    lora = read_lora(path, strength=0.25, name="mine")
    layer = only_layer(lora)
    assert lora.strength == 0.25 and layer.strength == 0.25 and lora.name == "mine"
    torch.testing.assert_close(layer.dense_delta(), up @ down * (4.0 / 2) * 0.25)


@pytest.mark.parametrize(
    "prefix, kohya_prefix, module",
    [("unet.", "lora_unet_", f"{ATTN}.to_k"), ("text_encoder.", "lora_te_", TE_Q),
     ("text_encoder_2.", "lora_te2_", TE_Q)],
)  # fmt: skip
@pytest.mark.parametrize("adapter", ["", ".default"])
def test_peft_lora_a_b(tmp_path, prefix, kohya_prefix, module, adapter):
    A, B = rnd(3, 6), rnd(4, 3)
    path = save(tmp_path, {f"{prefix}{module}.lora_A{adapter}.weight": A,
                           f"{prefix}{module}.lora_B{adapter}.weight": B})  # fmt: skip
    lora = read_lora(path)
    layer = only_layer(lora)
    assert layer.name == kohya_prefix + module.replace(".", "_")
    assert lora.format == "peft"
    torch.testing.assert_close(layer.dense_delta(), B @ A)


def test_peft_alpha_from_diffusers_adapter_metadata(tmp_path):
    A_q, B_q, A_k, B_k = rnd(4, 6), rnd(5, 4), rnd(4, 6), rnd(5, 4)
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_k": 2}}
    path = save(tmp_path, {f"unet.{ATTN}.to_q.lora_A.weight": A_q, f"unet.{ATTN}.to_q.lora_B.weight": B_q,
                           f"unet.{ATTN}.to_k.lora_A.weight": A_k, f"unet.{ATTN}.to_k.lora_B.weight": B_k},
                metadata={"lora_adapter_metadata": json.dumps(config)})  # fmt: skip
    layers = read_lora(path).layers
    torch.testing.assert_close(layers[f"{ATTN_KOHYA}_to_q"].dense_delta(), B_q @ A_q * 2.0)
    torch.testing.assert_close(layers[f"{ATTN_KOHYA}_to_k"].dense_delta(), B_k @ A_k * 0.5)


@pytest.mark.parametrize("style", ["lora.{}.weight", "lora_{}.weight", "lora_linear_layer.{}.weight"])
def test_diffusers_up_down_with_alpha(tmp_path, style):
    up, down = rnd(4, 2), rnd(2, 6)
    path = save(tmp_path, {f"unet.{ATTN}.to_v.{style.format('up')}": up,
                           f"unet.{ATTN}.to_v.{style.format('down')}": down,
                           f"unet.{ATTN}.to_v.alpha": torch.tensor(1.0)})  # fmt: skip
    lora = read_lora(path)
    layer = only_layer(lora)
    assert layer.name == f"{ATTN_KOHYA}_to_v" and lora.format == "diffusers"
    torch.testing.assert_close(layer.dense_delta(), up @ down / 2)


@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_attention_processor_style(tmp_path, prefix):
    tensors, expected = {}, {}
    for proj, kohya in [("to_q", "to_q"), ("to_out", "to_out_0")]:
        up, down = rnd(4, 2), rnd(2, 4)
        tensors[f"{prefix}{ATTN}.processor.{proj}_lora.up.weight"] = up
        tensors[f"{prefix}{ATTN}.processor.{proj}_lora.down.weight"] = down
        expected[f"{ATTN_KOHYA}_{kohya}"] = up @ down
    layers = read_lora(save(tmp_path, tensors)).layers
    assert set(layers) == set(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(layers[name].dense_delta(), delta)


def test_locon_3x3_conv_matches_two_convolutions(tmp_path):
    up, down = rnd(6, 2, 1, 1), rnd(2, 3, 3, 3)
    path = save(tmp_path, {"lora_unet_conv_in.lora_up.weight": up, "lora_unet_conv_in.lora_down.weight": down,
                           "lora_unet_conv_in.alpha": torch.tensor(1.0)})  # fmt: skip
    delta = only_layer(read_lora(path)).dense_delta()
    assert delta.shape == (6, 3, 3, 3)
    x = rnd(1, 3, 7, 7)
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), F.conv2d(F.conv2d(x, down, padding=1), up) * 0.5)


def test_locon_tucker_mid_matches_three_convolutions(tmp_path):
    up, mid, down = rnd(6, 2, 1, 1), rnd(2, 2, 3, 3), rnd(2, 3, 1, 1)
    path = save(tmp_path, {"lora_unet_c.lora_up.weight": up, "lora_unet_c.lora_mid.weight": mid,
                           "lora_unet_c.lora_down.weight": down, "lora_unet_c.alpha": torch.tensor(4.0)})  # fmt: skip
    lora = read_lora(path)
    delta = only_layer(lora).dense_delta()
    assert delta.shape == (6, 3, 3, 3) and lora.format == "lycoris"
    x = rnd(1, 3, 7, 7)
    composed = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up) * 2.0
    torch.testing.assert_close(F.conv2d(x, delta, padding=1), composed)
    torch.testing.assert_close(delta, tucker_by_loops(mid, up[:, :, 0, 0].T, down[:, :, 0, 0]) * 2.0)


# Dense layouts ----------------------------------------------------------------------------


def test_full_diff(tmp_path):
    diff = rnd(4, 3, 3, 3)
    lora = read_lora(save(tmp_path, {"lora_unet_c.diff": diff}), strength=0.5)
    layer = only_layer(lora)
    assert layer.alpha is None and lora.format == "lycoris"
    torch.testing.assert_close(layer.dense_delta(), diff * 0.5)


def test_loha_linear(tmp_path):
    w1a, w1b, w2a, w2b = rnd(5, 2), rnd(2, 4), rnd(5, 2), rnd(2, 4)
    path = save(tmp_path, {"lora_unet_l.hada_w1_a": w1a, "lora_unet_l.hada_w1_b": w1b,
                           "lora_unet_l.hada_w2_a": w2a, "lora_unet_l.hada_w2_b": w2b,
                           "lora_unet_l.alpha": torch.tensor(1.0)})  # fmt: skip
    layer = only_layer(read_lora(path))
    assert layer.alpha is None and layer.up is None
    expected = torch.tensor([[(w1a[o] @ w1b[:, i]) * (w2a[o] @ w2b[:, i]) * 0.5 for i in range(4)] for o in range(5)])
    torch.testing.assert_close(layer.dense_delta(), expected)


def test_loha_conv_without_tucker_is_flattened(tmp_path):
    w1a, w1b, w2a, w2b = rnd(5, 2), rnd(2, 3 * 9), rnd(5, 2), rnd(2, 3 * 9)
    path = save(tmp_path, {"lora_unet_c.hada_w1_a": w1a, "lora_unet_c.hada_w1_b": w1b,
                           "lora_unet_c.hada_w2_a": w2a, "lora_unet_c.hada_w2_b": w2b})  # fmt: skip
    delta = only_layer(read_lora(path)).dense_delta()
    assert delta.shape == (5, 27)
    torch.testing.assert_close(delta, (w1a @ w1b) * (w2a @ w2b))


def test_loha_tucker(tmp_path):
    t1, t2 = rnd(2, 2, 3, 3), rnd(2, 2, 3, 3)
    w1a, w1b, w2a, w2b = rnd(2, 5), rnd(2, 4), rnd(2, 5), rnd(2, 4)  # (r, out), (r, in)
    path = save(tmp_path, {"lora_unet_c.hada_t1": t1, "lora_unet_c.hada_t2": t2,
                           "lora_unet_c.hada_w1_a": w1a, "lora_unet_c.hada_w1_b": w1b,
                           "lora_unet_c.hada_w2_a": w2a, "lora_unet_c.hada_w2_b": w2b,
                           "lora_unet_c.alpha": torch.tensor(1.0)})  # fmt: skip
    delta = only_layer(read_lora(path)).dense_delta()
    expected = tucker_by_loops(t1, w1a, w1b) * tucker_by_loops(t2, w2a, w2b) * 0.5
    assert delta.shape == (5, 4, 3, 3)
    torch.testing.assert_close(delta, expected)


def test_lokr_full_linear_ignores_alpha(tmp_path):
    w1, w2 = rnd(2, 3), rnd(4, 5)
    path = save(tmp_path, {"lora_unet_l.lokr_w1": w1, "lora_unet_l.lokr_w2": w2, "lora_unet_l.alpha": torch.tensor(7.0)})
    lora = read_lora(path)
    torch.testing.assert_close(only_layer(lora).dense_delta(), kron_by_blocks(w1, w2))
    assert lora.format == "lycoris"


def test_lokr_factored_linear_scale_alpha_over_dim(tmp_path):
    w1, w2a, w2b = rnd(2, 3), rnd(4, 2), rnd(2, 5)
    path = save(tmp_path, {"lora_unet_l.lokr_w1": w1, "lora_unet_l.lokr_w2_a": w2a, "lora_unet_l.lokr_w2_b": w2b,
                           "lora_unet_l.alpha": torch.tensor(1.0)})  # fmt: skip
    delta = only_layer(read_lora(path)).dense_delta()
    torch.testing.assert_close(delta, kron_by_blocks(w1, w2a @ w2b) * 0.5)


def test_lokr_both_factored_without_alpha(tmp_path):
    w1a, w1b, w2a, w2b = rnd(2, 1), rnd(1, 3), rnd(4, 1), rnd(1, 5)
    path = save(tmp_path, {"lora_unet_l.lokr_w1_a": w1a, "lora_unet_l.lokr_w1_b": w1b,
                           "lora_unet_l.lokr_w2_a": w2a, "lora_unet_l.lokr_w2_b": w2b})  # fmt: skip
    delta = only_layer(read_lora(path)).dense_delta()
    torch.testing.assert_close(delta, kron_by_blocks(w1a @ w1b, w2a @ w2b))


def test_lokr_full_conv(tmp_path):
    w1, w2 = rnd(2, 3), rnd(4, 5, 3, 3)
    path = save(tmp_path, {"lora_unet_c.lokr_w1": w1, "lora_unet_c.lokr_w2": w2})
    delta = only_layer(read_lora(path)).dense_delta()
    assert delta.shape == (8, 15, 3, 3)
    torch.testing.assert_close(delta, kron_by_blocks(w1, w2))


def test_lokr_tucker_conv(tmp_path):
    w1, t2, w2a, w2b = rnd(2, 3), rnd(2, 2, 3, 3), rnd(2, 4), rnd(2, 5)
    path = save(tmp_path, {"lora_unet_c.lokr_w1": w1, "lora_unet_c.lokr_t2": t2, "lora_unet_c.lokr_w2_a": w2a,
                           "lora_unet_c.lokr_w2_b": w2b, "lora_unet_c.alpha": torch.tensor(1.0)})  # fmt: skip
    delta = only_layer(read_lora(path)).dense_delta()
    torch.testing.assert_close(delta, kron_by_blocks(w1, tucker_by_loops(t2, w2a, w2b)) * 0.5)


# DoRA -------------------------------------------------------------------------------------


def test_kohya_dora_scale(tmp_path):
    up, down, magnitude, W0 = rnd(4, 2), rnd(2, 3), rnd(4, 1).abs() + 1, rnd(4, 3)
    path = save(tmp_path, {"lora_unet_l.lora_up.weight": up, "lora_unet_l.lora_down.weight": down,
                           "lora_unet_l.alpha": torch.tensor(1.0), "lora_unet_l.dora_scale": magnitude})  # fmt: skip
    layer = only_layer(read_lora(path, strength=0.7))
    torch.testing.assert_close(layer.dora_scale, magnitude)
    torch.testing.assert_close(layer.dense_delta(W0), dora_by_rows(W0, up @ down * 0.5, magnitude, 0.7))


def test_peft_dora_magnitude_vector(tmp_path):
    A, B, magnitude, W0 = rnd(2, 3), rnd(4, 2), rnd(4).abs() + 1, rnd(4, 3)
    path = save(tmp_path, {f"unet.{ATTN}.to_q.lora_A.weight": A, f"unet.{ATTN}.to_q.lora_B.weight": B,
                           f"unet.{ATTN}.to_q.lora_magnitude_vector": magnitude})  # fmt: skip
    lora = read_lora(path)
    layer = only_layer(lora)
    assert layer.name == f"{ATTN_KOHYA}_to_q" and lora.format == "peft"
    torch.testing.assert_close(layer.dense_delta(W0), dora_by_rows(W0, B @ A, magnitude, 1.0))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_merge(tmp_path, use_dora, use_rslora):
    """Save a real PEFT adapter the way diffusers does and compare with PEFT's own merge."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("to_q", torch.nn.Linear(6, 5, bias=False))
    model.add_module("conv", torch.nn.Conv2d(3, 4, 3, bias=False))
    base = {n: m.weight.detach().clone() for n, m in model.named_children()}
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["to_q", "conv"], alpha_pattern={"conv": 2},
                             use_dora=use_dora, use_rslora=use_rslora, init_lora_weights=False)  # fmt: skip
    adapted = peft.get_peft_model(model, config)
    state = {"unet." + k.removeprefix("base_model.model."): v.contiguous()
             for k, v in get_peft_model_state_dict(adapted).items()}  # fmt: skip
    meta = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    path = save(tmp_path, state, metadata={"lora_adapter_metadata": json.dumps(meta, default=str)})
    layers = read_lora(path).layers
    merged = adapted.merge_and_unload()
    for name, W0 in base.items():
        expected = getattr(merged, name).weight.detach() - W0
        torch.testing.assert_close(layers[f"lora_unet_{name}"].dense_delta(W0), expected, atol=1e-6, rtol=1e-5)


# File-level fields ------------------------------------------------------------------------


def test_sha256_metadata_and_dominant_format(tmp_path):
    import hashlib

    tensors = {f"lora_unet_l{i}.lora_up.weight": rnd(3, 1) for i in range(3)}
    tensors |= {f"lora_unet_l{i}.lora_down.weight": rnd(1, 3) for i in range(3)}
    tensors |= {"lora_unet_c.diff": rnd(3, 3)}
    path = save(tmp_path, tensors, metadata={"ss_network_dim": "1"})
    lora = read_lora(path)
    assert lora.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert lora.metadata["ss_network_dim"] == "1"
    assert lora.format == "kohya" and len(lora.layers) == 4


# Writing ----------------------------------------------------------------------------------


def kohya_layers():
    return {
        f"{ATTN_KOHYA}_to_q": (rnd(6, 2), rnd(2, 5), 1.5),
        "lora_unet_conv_in": (rnd(4, 3), rnd(3, 2, 3, 3), 3.0),  # 2-D up with a conv down
    }


def test_write_kohya_fp32_round_trip_is_exact(tmp_path):
    layers = kohya_layers()
    path = tmp_path / "out.safetensors"
    write_kohya(path, layers, {"ss_network_dim": "2"}, dtype="fp32")
    lora = read_lora(path)
    assert set(lora.layers) == set(layers) and lora.metadata["ss_network_dim"] == "2"
    for name, (up, down, alpha) in layers.items():
        layer = lora.layers[name]
        assert layer.alpha == alpha and layer.up.dtype == torch.float32
        assert torch.equal(layer.up.reshape(up.shape), up) and torch.equal(layer.down, down)
    assert lora.layers["lora_unet_conv_in"].up.shape == (4, 3, 1, 1)
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.get_tensor(f"{ATTN_KOHYA}_to_q.alpha").dim() == 0


@pytest.mark.parametrize("dtype, torch_dtype, tol", [("fp16", torch.float16, 2e-3), ("bf16", torch.bfloat16, 2e-2)])
def test_write_kohya_half_round_trip(tmp_path, dtype, torch_dtype, tol):
    layers = kohya_layers()
    path = tmp_path / "out.safetensors"
    write_kohya(path, layers, {}, dtype=dtype)
    lora = read_lora(path)
    for name, (up, down, alpha) in layers.items():
        layer = lora.layers[name]
        assert layer.up.dtype == torch_dtype and layer.alpha == alpha
        expected = (up @ down.reshape(down.shape[0], -1) * alpha / down.shape[0]).reshape(up.shape[0], *down.shape[1:])
        torch.testing.assert_close(layer.dense_delta(), expected, rtol=tol * 4, atol=tol * 4)


def test_kohya_metadata_is_strings_and_json(tmp_path):
    source = read_lora(save(tmp_path, {"lora_te_x.lora_up.weight": rnd(3, 1), "lora_te_x.lora_down.weight": rnd(1, 3)}),
                       strength=0.5)  # fmt: skip
    meta = kohya_metadata(base_model_version="sd_v1", network_dim=8, network_alpha=4.0, inputs=[source],
                          recipe={"method": "iteris", "rank": 8}, conv=True)  # fmt: skip
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 4.0
    assert json.loads(meta["merged_from"]) == [
        {"name": "lora", "sha256": source.sha256, "strength": 0.5, "format": "kohya"}
    ]
    assert json.loads(meta["iteris_recipe"]) == {"method": "iteris", "rank": 8}
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}
    assert "ss_network_args" not in kohya_metadata(
        base_model_version="sdxl_base_v1-0", network_dim=8, network_alpha=4, inputs=[], recipe={}
    )
    path = tmp_path / "merged.safetensors"
    write_kohya(path, {"lora_te_x": (rnd(3, 1), rnd(1, 3), 1.0)}, meta)
    assert read_lora(path).metadata["iteris_recipe"] == meta["iteris_recipe"]


def test_write_kohya_refuses_to_overwrite_unless_asked(tmp_path):
    path = tmp_path / "out.safetensors"
    write_kohya(path, {"lora_te_x": (rnd(3, 1), rnd(1, 3), 1.0)}, {})
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        write_kohya(path, {"lora_te_y": (rnd(3, 1), rnd(1, 3), 1.0)}, {})
    assert "out.safetensors" in str(info.value)
    assert path.read_bytes() == before
    write_kohya(path, {"lora_te_y": (rnd(3, 1), rnd(1, 3), 1.0)}, {}, overwrite=True)
    assert set(read_lora(path).layers) == {"lora_te_y"}


@pytest.mark.parametrize("interrupt", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_no_temp_file_and_old_file_intact(tmp_path, monkeypatch, interrupt):
    path = tmp_path / "out.safetensors"
    write_kohya(path, {"lora_te_x": (rnd(3, 1), rnd(1, 3), 1.0)}, {})
    before = path.read_bytes()

    def half_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # some bytes reach the disk, then the save fails
        raise interrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_save)
    with pytest.raises(type(interrupt)):
        write_kohya(path, {"lora_te_y": (rnd(3, 1), rnd(1, 3), 1.0)}, {}, overwrite=True)
    assert os.listdir(tmp_path) == ["out.safetensors"]
    assert path.read_bytes() == before


def test_write_kohya_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        write_kohya(tmp_path / "nowhere" / "out.safetensors", {"lora_te_x": (rnd(3, 1), rnd(1, 3), 1.0)}, {})
    assert "out.safetensors" in str(info.value)
    assert not (tmp_path / "nowhere").exists()


def test_write_kohya_refuses_bad_input(tmp_path):
    path = tmp_path / "out.safetensors"
    good = (rnd(3, 1), rnd(1, 3), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        write_kohya(path, {"lora_te_x": good}, {}, dtype="fp8")
    with pytest.raises(ValueError, match="lora_te_nan.*NaN/Inf"):
        write_kohya(path, {"lora_te_nan": (torch.tensor([[float("nan")]]), torch.ones(1, 1), 1.0)}, {})
    with pytest.raises(ValueError, match="overflows"):
        write_kohya(path, {"lora_te_big": (torch.full((1, 1), 1e6), torch.ones(1, 1), 1.0)}, {})
    with pytest.raises(ValueError, match="kohya name"):
        write_kohya(path, {"unet.to_q": good}, {})
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        write_kohya(path, {"lora_te_x": (rnd(3, 2), rnd(1, 3), 1.0)}, {})
    assert os.listdir(tmp_path) == []


# Errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".ckpt", ".bin", ".PT"])
def test_pickle_files_refused_without_loading(tmp_path, monkeypatch, suffix):
    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle file was loaded")

    monkeypatch.setattr(torch, "load", forbidden)
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(b"\x80\x04K\x01.")
    message = read_error(path, "execute code")
    assert "safetensors.torch.save_file" in message


def test_missing_file(tmp_path):
    read_error(tmp_path / "absent.safetensors", "no such file", FileNotFoundError)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    read_error(path, r"not a valid safetensors file \(the file is empty\)")


@pytest.mark.parametrize("keep", [5, 40, -10])
def test_truncated_file(tmp_path, keep):
    full = save(tmp_path, {"lora_te_x.lora_up.weight": rnd(8, 2), "lora_te_x.lora_down.weight": rnd(2, 8)}).read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(full[:keep])
    read_error(path, "not a valid safetensors file.*(truncated|8-byte)")


def test_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    read_error(path, "not a valid safetensors file")


def test_corrupt_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all" + b"\x00" * 32)
    read_error(path, r"not a valid safetensors file \(the header is not valid JSON\)")


def test_bad_tensor_entry_wrapped(tmp_path):
    header = json.dumps({"t": {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 8)
    read_error(path, "not a valid safetensors file")


def test_nan_names_key(tmp_path):
    down = rnd(2, 3)
    down[1, 1] = float("inf")
    path = save(tmp_path, {"lora_te_x.lora_up.weight": rnd(3, 2), "lora_te_x.lora_down.weight": down})
    read_error(path, "'lora_te_x.lora_down.weight' contains NaN/Inf; the file is damaged")


def test_unknown_keys_listed(tmp_path):
    tensors = {f"lora_unet_l{i}.weird": torch.ones(1) for i in range(7)}
    tensors |= {"lora_unet_ok.lora_up.weight": rnd(2, 1), "lora_unet_ok.lora_down.weight": rnd(1, 2)}
    message = read_error(save(tmp_path, tensors), "7 key")
    assert sum(f"lora_unet_l{i}.weird" in message for i in range(7)) == 5


def test_not_a_lora(tmp_path):
    read_error(save(tmp_path, {"model.diffusion_model.conv_in.weight": rnd(2, 2)}), "1 key")
    read_error(save(tmp_path, {}, name="empty_lora.safetensors"), "no LoRA layers")
    read_error(save(tmp_path, {"lora_te_x.alpha": torch.tensor(1.0)}, name="alpha_only.safetensors"), "no LoRA layers")


@pytest.mark.parametrize("present, missing", [("lora_up.weight", "down"), ("lora_down.weight", "up")])
def test_half_a_pair(tmp_path, present, missing):
    path = save(tmp_path, {f"lora_te_x.{present}": rnd(2, 2), "lora_te_y.lora_up.weight": rnd(2, 1),
                           "lora_te_y.lora_down.weight": rnd(1, 2)})  # fmt: skip
    read_error(path, f"'lora_te_x.{present}'.*no {missing} weight")


def test_rank_mismatch_names_both_shapes(tmp_path):
    path = save(tmp_path, {"lora_te_x.lora_up.weight": rnd(4, 2), "lora_te_x.lora_down.weight": rnd(3, 5)})
    read_error(path, r"'lora_te_x.lora_up.weight' \(4, 2\) and 'lora_te_x.lora_down.weight' \(3, 5\)")


@pytest.mark.parametrize("key", ["lora_unet_l.diff_b", "lora_unet_l.bias", f"unet.{ATTN}.to_q.lora_B.bias"])
def test_bias_refused(tmp_path, key):
    path = save(tmp_path, {"lora_unet_l.lora_up.weight": rnd(2, 1), "lora_unet_l.lora_down.weight": rnd(1, 2),
                           key: rnd(2)})  # fmt: skip
    read_error(path, f"'{key}' is a bias delta")


def test_loha_missing_factor(tmp_path):
    path = save(tmp_path, {"lora_unet_l.hada_w1_a": rnd(2, 1), "lora_unet_l.hada_w1_b": rnd(1, 2),
                           "lora_unet_l.hada_w2_a": rnd(2, 1)})  # fmt: skip
    read_error(path, "lora_unet_l.hada_w2_b")


def test_loha_shape_mismatch(tmp_path):
    path = save(tmp_path, {"lora_unet_l.hada_w1_a": rnd(2, 1), "lora_unet_l.hada_w1_b": rnd(1, 3),
                           "lora_unet_l.hada_w2_a": rnd(2, 1), "lora_unet_l.hada_w2_b": rnd(1, 1)})  # fmt: skip
    read_error(path, "incompatible shapes")


def test_mixed_representations(tmp_path):
    path = save(tmp_path, {"lora_unet_l.lora_up.weight": rnd(2, 1), "lora_unet_l.lora_down.weight": rnd(1, 2),
                           "lora_unet_l.diff": rnd(2, 2)})  # fmt: skip
    read_error(path, "mixes")
