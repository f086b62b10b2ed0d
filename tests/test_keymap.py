"""Tests for iteris_sd.lora.keymap: diffusers <-> LDM UNet paths and LoRA name -> module maps."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from iteris_sd.lora.keymap import (
    KeyMismatchError,
    ShapeMismatchError,
    build_keymap,
    delta_fits,
    delta_shape,
    detect_family,
    diffusers_to_ldm_unet,
    unet_layout,
)
from iteris_sd.lora.guess import guess_family
from iteris_sd.lora.layer import LoraFile, LoraLayer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD15_LAYERS = 2
SD15_UP_ATTENTION = [False, True, True, True]


# --- tiny models ---------------------------------------------------------------------


def _clip_config(**extra) -> "transformers.CLIPTextConfig":
    return transformers.CLIPTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1, **extra,
    )


@pytest.fixture(scope="module")
def sd1_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )


@pytest.fixture(scope="module")
def sdxl_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=64, attention_head_dim=8,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return transformers.CLIPTextModel(_clip_config())


@pytest.fixture(scope="module")
def text_encoder_2():
    torch.manual_seed(0)
    return transformers.CLIPTextModelWithProjection(_clip_config(projection_dim=32))


@pytest.fixture(scope="module")
def sd1_map(sd1_unet, text_encoder):
    return build_keymap({"unet": sd1_unet, "text_encoder": text_encoder}, "sd1")


@pytest.fixture(scope="module")
def sdxl_map(sdxl_unet, text_encoder, text_encoder_2):
    return build_keymap(
        {"unet": sdxl_unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}, "sdxl"
    )


def _lora(layers: list[LoraLayer], path: str = "style.safetensors") -> LoraFile:
    return LoraFile(path=path, name="style", sha256="0" * 64, layers={layer.name: layer for layer in layers})


def _lowrank(name: str, d_out: int, d_in: int | tuple[int, ...], rank: int = 2) -> LoraLayer:
    d_in = (d_in,) if isinstance(d_in, int) else d_in
    return LoraLayer(name=name, up=torch.randn(d_out, rank), down=torch.randn(rank, *d_in), alpha=1.0)


# --- diffusers -> LDM paths (pure) -----------------------------------------------------

SD15_KNOWN = [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "input_blocks.4.1.transformer_blocks.0.attn2.to_k"),
    ("up_blocks.1.attentions.2.proj_out", "output_blocks.5.1.proj_out"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.1.conv"),
    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("down_blocks.0.resnets.0.time_emb_proj", "input_blocks.1.0.emb_layers.1"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("conv_out", "out.2"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("conv_norm_out", "out.0"),
    ("down_blocks.3.resnets.1.norm1", "input_blocks.11.0.in_layers.0"),
    ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
    ("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj", "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj"),
    ("up_blocks.3.resnets.0.conv1.weight", "output_blocks.9.0.in_layers.2.weight"),
    ("mid_block.resnets.0.norm2", "middle_block.0.out_layers.0"),
    ("up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0", "output_blocks.7.1.transformer_blocks.0.attn1.to_out.0"),
]


@pytest.mark.parametrize("path, ldm", SD15_KNOWN)
def test_sd15_known_paths(path, ldm):
    assert diffusers_to_ldm_unet(path, SD15_LAYERS, SD15_UP_ATTENTION) == ldm


def test_sdxl_known_paths():
    # SDXL: 3 levels, down block 0 and up block 2 without attention
    layout = ([2, 2, 2], [True, True, False])
    assert diffusers_to_ldm_unet("add_embedding.linear_1", *layout) == "label_emb.0.0"
    assert diffusers_to_ldm_unet("add_embedding.linear_2", *layout) == "label_emb.0.2"
    assert diffusers_to_ldm_unet("down_blocks.1.attentions.1.proj_in", *layout) == "input_blocks.5.1.proj_in"
    assert diffusers_to_ldm_unet("down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q", *layout) == (
        "input_blocks.7.1.transformer_blocks.9.attn1.to_q"
    )
    assert diffusers_to_ldm_unet("up_blocks.0.upsamplers.0.conv", *layout) == "output_blocks.2.2.conv"
    assert diffusers_to_ldm_unet("up_blocks.2.resnets.2.conv2", *layout) == "output_blocks.8.0.out_layers.3"


@pytest.mark.parametrize(
    "path",
    ["add_time_proj", "encoder_hid_proj", "down_blocks.0.resnets.0.nonlinearity", "down_blocks.4.resnets.0.conv1",
     "down_blocks.0.resnets.2.conv1", "up_blocks.0.resnets.3.conv1", "mid_block.resnets.2.conv1", "down_blocks"],
)
def test_paths_without_ldm_counterpart(path):
    assert diffusers_to_ldm_unet(path, SD15_LAYERS, SD15_UP_ATTENTION) is None


def test_layers_per_block_list_must_match_blocks():
    with pytest.raises(ValueError, match="one per block"):
        diffusers_to_ldm_unet("conv_in", [2, 2], SD15_UP_ATTENTION)


def test_uneven_layers_per_block():
    # down blocks with 1 and 3 resnets: up blocks have 4 and 2 layers
    layout = ([1, 3], [True, False])
    assert diffusers_to_ldm_unet("down_blocks.1.resnets.2.conv1", *layout) == "input_blocks.5.0.in_layers.2"
    assert diffusers_to_ldm_unet("up_blocks.0.upsamplers.0.conv", *layout) == "output_blocks.3.2.conv"
    assert diffusers_to_ldm_unet("up_blocks.1.resnets.1.conv1", *layout) == "output_blocks.5.0.in_layers.2"


@pytest.mark.parametrize("unet_fixture", ["sd1_unet", "sdxl_unet"])
def test_ldm_paths_agree_with_diffusers_converter(unet_fixture, request):
    """Our diffusers -> LDM renaming, undone by diffusers' own LDM -> diffusers converter,
    gives back every parameter of the tiny UNet."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    unet = request.getfixturevalue(unet_fixture)
    state = unet.state_dict()
    layout = unet_layout(unet)
    ldm = {"model.diffusion_model." + diffusers_to_ldm_unet(key, *layout): value for key, value in state.items()}
    back = single_file.convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[key] is state[key] or torch.equal(back[key], state[key]) for key in state)


# --- key maps on tiny models ---------------------------------------------------------


def _targetable(model: nn.Module) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


@pytest.mark.parametrize("map_fixture", ["sd1_map", "sdxl_map"])
def test_every_module_has_an_output_name_that_maps_back(map_fixture, request):
    keymap = request.getfixturevalue(map_fixture)
    assert set(keymap.output_name) == set(keymap.modules)
    for module_id, name in keymap.output_name.items():
        assert keymap.lookup[name] == module_id
    assert set(keymap.lookup.values()) == set(keymap.modules)


def test_modules_are_all_linear_and_conv(sd1_map, sd1_unet, text_encoder):
    expected = {f"unet.{p}" for p in _targetable(sd1_unet)} | {f"text_encoder.{p}" for p in _targetable(text_encoder)}
    assert set(sd1_map.modules) == expected
    assert sd1_map.modules["unet.conv_in"] is sd1_unet.conv_in


@pytest.mark.parametrize("unet_fixture, map_fixture", [("sd1_unet", "sd1_map"), ("sdxl_unet", "sdxl_map")])
def test_ldm_and_diffusers_names_reach_the_same_module(unet_fixture, map_fixture, request):
    unet, keymap = request.getfixturevalue(unet_fixture), request.getfixturevalue(map_fixture)
    layout = unet_layout(unet)
    for path in _targetable(unet):
        ldm = diffusers_to_ldm_unet(path, *layout)
        assert ldm is not None, path
        assert keymap.lookup["lora_unet_" + path.replace(".", "_")] == f"unet.{path}"
        assert keymap.lookup["lora_unet_" + ldm.replace(".", "_")] == f"unet.{path}"


@pytest.mark.parametrize("unet_fixture", ["sd1_unet", "sdxl_unet"])
def test_ldm_block_indices_have_no_gaps(unet_fixture, request):
    unet = request.getfixturevalue(unet_fixture)
    down_layers, up_attention = unet_layout(unet)
    ldm = [diffusers_to_ldm_unet(p, down_layers, up_attention) for p in _targetable(unet)]
    inputs = {int(m.group(1)) for p in ldm if (m := re.match(r"input_blocks\.(\d+)\.", p))}
    outputs = {int(m.group(1)) for p in ldm if (m := re.match(r"output_blocks\.(\d+)\.", p))}
    middle = {int(m.group(1)) for p in ldm if (m := re.match(r"middle_block\.(\d+)\.", p))}
    # conv_in, (L + 1) per level, but the last level has no downsampler
    assert inputs == set(range(sum(n + 1 for n in down_layers)))
    assert outputs == set(range(sum(n + 1 for n in down_layers)))
    assert middle == {0, 1, 2}


def test_sd1_output_names_are_diffusers_style(sd1_map):
    assert sd1_map.output_name["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] == (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert sd1_map.lookup["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == (
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    )
    te_names = {v for k, v in sd1_map.output_name.items() if k.startswith("text_encoder.")}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in te_names
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in te_names
    assert all(name.startswith("lora_te_text_model_") for name in te_names)


def test_sdxl_output_names_are_ldm_style(sdxl_map):
    unet_names = [v for k, v in sdxl_map.output_name.items() if k.startswith("unet.")]
    assert all(re.match(r"lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_", n)
               for n in unet_names)
    assert sdxl_map.output_name["unet.down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k"] == (
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k"
    )
    assert sdxl_map.output_name["unet.add_embedding.linear_1"] == "lora_unet_label_emb_0_0"
    te1 = {v for k, v in sdxl_map.output_name.items() if k.startswith("text_encoder.")}
    te2 = {v for k, v in sdxl_map.output_name.items() if k.startswith("text_encoder_2.")}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in te1
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in te2
    assert "lora_te2_text_projection" in te2


def test_both_clip_layouts_get_text_model_names(text_encoder, text_encoder_2):
    """transformers 5: CLIPTextModel is flat (encoder.layers...), CLIPTextModelWithProjection
    nests text_model.; both give lora_te_text_model_... names and accept the flat form."""
    for model in (text_encoder, text_encoder_2):
        keymap = build_keymap({"text_encoder": model}, "sd1")
        module_id = keymap.lookup["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
        assert module_id.endswith("encoder.layers.0.self_attn.q_proj")
        assert keymap.lookup["lora_te_encoder_layers_0_self_attn_q_proj"] == module_id
        assert keymap.output_name[module_id] == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def test_sdxl_accepts_lora_te_as_te1(sdxl_map):
    te1 = sdxl_map.lookup["lora_te1_text_model_encoder_layers_1_self_attn_v_proj"]
    assert te1.startswith("text_encoder.")
    assert sdxl_map.lookup["lora_te_text_model_encoder_layers_1_self_attn_v_proj"] == te1
    assert sdxl_map.lookup["lora_te2_text_model_encoder_layers_1_self_attn_v_proj"].startswith("text_encoder_2.")


def test_sd1_does_not_accept_te1_or_te2(sd1_map):
    assert not any(name.startswith(("lora_te1_", "lora_te2_")) for name in sd1_map.lookup)


def test_colliding_module_names_are_refused():
    model = nn.Module()
    model.text_model = nn.Module()
    model.text_model.x_y = nn.Linear(2, 2)
    model.text_model.x = nn.Module()
    model.text_model.x.y = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="claimed by both"):
        build_keymap({"text_encoder": model}, "sd1")


def test_build_keymap_rejects_unknown_family_and_component(text_encoder):
    with pytest.raises(ValueError, match="unknown model family 'hunyuan'"):
        build_keymap({"text_encoder": text_encoder}, "hunyuan")
    with pytest.raises(ValueError, match="unknown component 'text_encoder_2'"):
        build_keymap({"text_encoder_2": text_encoder}, "sd1")


# --- match -------------------------------------------------------------------------


def test_match_pairs_layers_with_modules(sd1_map):
    q = _lowrank("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 32, 32)
    proj_in = _lowrank("lora_unet_input_blocks_1_1_proj_in", 32, (32, 1, 1))  # 1x1 conv, 4-D down
    proj_out = LoraLayer(name="lora_unet_output_blocks_5_1_proj_out", dense=torch.randn(32, 32))  # 2-D on 1x1 conv
    conv = LoraLayer(name="lora_unet_down_blocks_1_resnets_0_conv1", dense=torch.randn(64, 32 * 9))  # LoHa, flat
    te = _lowrank("lora_te_text_model_encoder_layers_1_mlp_fc1", 37, 32)
    matched = sd1_map.match(_lora([q, proj_in, proj_out, conv, te]))
    assert matched == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": q,
        "unet.down_blocks.0.attentions.0.proj_in": proj_in,
        "unet.up_blocks.1.attentions.2.proj_out": proj_out,
        "unet.down_blocks.1.resnets.0.conv1": conv,
        "text_encoder.encoder.layers.1.mlp.fc1": te,
    }


def test_match_lists_unmatched_names_and_counts(sd1_map):
    good = _lowrank("lora_unet_conv_in", 32, (4, 3, 3))
    bad = [_lowrank(f"lora_unet_nowhere_{i}", 4, 4) for i in range(12)]
    with pytest.raises(KeyMismatchError) as err:
        sd1_map.match(_lora([good, *bad]))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("style.safetensors: 12 of 13 layers match no module of this SD1.x model (1 matched)")
    assert "lora_unet_nowhere_0, " in message and "lora_unet_nowhere_9" in message
    assert "lora_unet_nowhere_10" not in message and "(and 2 more)" in message


def test_sdxl_lora_on_sd1_model_says_sdxl(sd1_map):
    layers = [
        _lowrank("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", 32, 32),
        _lowrank("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
        _lowrank("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
    ]
    with pytest.raises(KeyMismatchError, match="looks made for SDXL"):
        sd1_map.match(_lora(layers))


def test_shape_mismatch_names_key_and_shapes(sd1_map):
    layer = _lowrank("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 32, 768)
    with pytest.raises(ShapeMismatchError) as err:
        sd1_map.match(_lora([layer]))
    message = str(err.value)
    assert "\n" not in message
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in message
    assert "(32, 768)" in message and "(32, 32)" in message
    assert "looks made for SD1.x" in message  # told by the cross-attention width 768
    assert isinstance(err.value, KeyMismatchError)


def test_two_layers_on_one_module_are_refused(sd1_map):
    layers = [
        _lowrank("lora_unet_conv_in", 32, (4, 3, 3)),
        _lowrank("lora_unet_input_blocks_0_0", 32, (4, 3, 3)),
    ]
    with pytest.raises(KeyMismatchError, match="both target unet.conv_in"):
        sd1_map.match(_lora(layers))


# --- shapes ------------------------------------------------------------------------


def test_delta_shape_matches_dense_delta():
    layers = [
        _lowrank("a", 8, 6),
        _lowrank("b", 8, (6, 3, 3)),
        LoraLayer(name="c", up=torch.randn(8, 2, 1, 1), down=torch.randn(2, 6, 1, 1), mid=torch.randn(2, 2, 3, 3)),
        LoraLayer(name="d", dense=torch.randn(8, 6, 3, 3)),
    ]
    for layer in layers:
        assert delta_shape(layer) == tuple(layer.dense_delta().shape)


@pytest.mark.parametrize(
    "delta, weight, fits",
    [
        ((8, 6), (8, 6), True),
        ((8, 6), (8, 6, 1, 1), True),
        ((8, 6, 1, 1), (8, 6), True),
        ((8, 54), (8, 6, 3, 3), True),
        ((8, 6), (8, 6, 3, 3), False),
        ((8, 6), (6, 8), False),
        ((8, 6, 3, 3), (8, 6, 1, 1), False),
        ((48,), (8, 6), False),
    ],
)
def test_delta_fits(delta, weight, fits):
    assert delta_fits(delta, weight) is fits


# --- families ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "names, family",
    [
        (["lora_te2_text_model_encoder_layers_0_mlp_fc1"], "SDXL"),
        (["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"], "SDXL"),
        (["lora_unet_output_blocks_0_1_proj_in"], "SDXL"),
        (["lora_unet_up_blocks_0_attentions_0_proj_in"], "SDXL"),
        ([f"lora_te_text_model_encoder_layers_{i}_mlp_fc1" for i in range(12)], "SD1.x"),
        ([f"lora_te_text_model_encoder_layers_{i}_mlp_fc1" for i in range(23)], "SD2.x"),
        (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1"], "Flux"),
        (["lora_transformer_single_transformer_blocks_0_proj_out"], "Flux"),
        (["lora_unet_joint_blocks_0_context_block_attn_qkv"], "SD3"),
        (["lora_unet_transformer_blocks_0_attn_add_k_proj", "lora_unet_transformer_blocks_0_ff_context_net_2"], "SD3"),
        (["lora_unet_down_blocks_3_resnets_0_conv1", "lora_unet_up_blocks_3_attentions_0_proj_in"], "SD1.x or SD2.x"),
        (["lora_unet_down_blocks_1_attentions_0_proj_in"], "SD1.x, SD2.x or SDXL"),
        (["something_else"], "unknown"),
    ],
)
def test_guess_family(names, family):
    assert guess_family(names) == family


def test_guess_family_from_cross_attention_width():
    names = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"]
    assert guess_family(names, {names[0]: (640, 1024)}) == "SD2.x"
    assert guess_family(names, {names[0]: (640, 768)}) == "SD1.x"


@pytest.mark.parametrize(
    "config, family",
    [
        ({"addition_embed_type": "text_time", "cross_attention_dim": 2048}, "sdxl"),
        ({"addition_embed_type": None, "cross_attention_dim": 1024}, "sd2"),
        ({"cross_attention_dim": 768}, "sd1"),
        ({"_class_name": "FluxTransformer2DModel", "joint_attention_dim": 4096}, "flux"),
        ({"joint_attention_dim": 4096, "guidance_embeds": False}, "flux"),
        ({"_class_name": "SD3Transformer2DModel", "joint_attention_dim": 4096}, "sd3"),
        ({"joint_attention_dim": 4096, "caption_projection_dim": 1536}, "sd3"),
    ],
)
def test_detect_family(config, family):
    assert detect_family(config) == family


def test_detect_family_names_a_model_it_cannot_merge():
    with pytest.raises(ValueError, match=r"^HunyuanDiT2DModel is not an SD1.x, SD2.x or SDXL UNet nor an SD3 or Flux"):
        detect_family({"_class_name": "HunyuanDiT2DModel", "cross_attention_dim": None})
    with pytest.raises(ValueError, match=r"^this model is not an SD1.x"):
        detect_family({"joint_attention_dim": 4096})


def test_detect_family_on_model_configs(sd1_unet, sdxl_unet):
    assert detect_family(sd1_unet.config) == "sd1"
    assert detect_family(sdxl_unet.config) == "sdxl"


def test_unet_layout(sd1_unet, sdxl_unet):
    assert unet_layout(sd1_unet) == ([2, 2], [False, True])
    assert unet_layout(sdxl_unet) == ([2, 2, 2], [True, True, False])
