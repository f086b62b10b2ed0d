"""The merged LORA_MODEL (nodes/lora_model.py, which imports no ComfyUI module): what the Save
node needs beside the UNet tensors survives copies of the dict. That ComfyUI's core "Load
LoRA Model" applies it, with no key left unloaded, is test_comfy_nodes.py's
test_lora_model_output_feeds_core_load_lora_model."""

import copy
import importlib.util
import pickle
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "iteris_nodes_lora_model", Path(__file__).resolve().parent.parent / "nodes" / "lora_model.py")
lora_model = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # (nodes/__init__ imports comfy)
_spec.loader.exec_module(lora_model)

UNET = "diffusion_model.input_blocks.1.1.proj_in"
TE = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"


def state_dict(prefix, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.lora_up.weight": torch.randn(8, rank, generator=g),
            f"{prefix}.lora_down.weight": torch.randn(rank, 6, generator=g),
            f"{prefix}.alpha": torch.tensor(float(rank))}


def merged():
    extras = lora_model.MergeExtras(
        text_encoder=state_dict(TE, 2, 1),
        names={UNET: "lora_unet_down_blocks_0_attentions_0_proj_in",
               TE: "lora_te_text_model_encoder_layers_0_self_attn_q_proj"},
        metadata={"ss_network_module": "networks.lora", "iteris_recipe": "{}"})
    return lora_model.merged_lora(state_dict(UNET, 3, 0), extras)


COPIES = {
    "dict()": dict,
    "dict.copy": lambda x: x.copy(),
    "unpacked": lambda x: {**x},
    "comprehension": lambda x: {k: v for k, v in x.items()},
    "copy.copy": copy.copy,
    "copy.deepcopy": copy.deepcopy,
    "pickled": lambda x: pickle.loads(pickle.dumps(x)),
}


def test_what_the_save_node_needs_survives_any_copy_of_the_lora_model():
    lora = merged()
    for how, make_copy in COPIES.items():
        copied = make_copy(lora)
        assert set(copied) == set(lora), how  # the UNet keys only: what "Load LoRA Model" applies, no other
        layers = lora_model.named_layers(copied)
        assert set(layers) == {"lora_unet_down_blocks_0_attentions_0_proj_in",
                               "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}, how
        up, down, alpha = layers["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
        assert torch.equal(up, state_dict(TE, 2, 1)[f"{TE}.lora_up.weight"]) and down.shape == (2, 6) and alpha == 2.0
        assert lora_model.merge_extras(copied).metadata["iteris_recipe"] == "{}", how
    # any other LORA_MODEL (and a merge's tensors made anew, e.g. scaled): ComfyUI's names, no extras
    for other in (state_dict(UNET, 3, 0), {k: v * 0.5 for k, v in lora.items()}):
        assert lora_model.merge_extras(other) is None
        assert set(lora_model.named_layers(other)) == {"lora_unet_input_blocks_1_1_proj_in"}
    # a merge without UNet layers still carries its text-encoder part (uncopied: nothing else to carry it)
    te_only = lora_model.merged_lora({}, lora_model.MergeExtras(text_encoder=state_dict(TE, 2, 1)))
    assert len(te_only) == 0 and list(lora_model.named_layers(te_only)) == [TE]
