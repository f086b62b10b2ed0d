"""The ITERIS_LORA_LIST type the LoRA entry and Merge nodes share (a LORA_MODEL: lora_model.py)."""

from __future__ import annotations

from comfy_api.latest import io

LoraList = io.Custom("ITERIS_LORA_LIST")
