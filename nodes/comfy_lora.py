"""LoRAs on Lumina MODELs the ComfyUI way: the core matches the LoRA's keys (any form of SPEC.md §11) to the DiT's
original parameter names, and the result is handed to ComfyUI as a key map for its own LoRA reader
(`comfy.lora.load_lora`), then registered on a clone of the ModelPatcher (`add_patches`). ComfyUI patches the weights
itself when it moves the model to its device (fp8 and low-VRAM included) and restores them after, and a changed
strength needs no reload. Works on the pack's DiTs and on ComfyUI's own Lumina 2 MODEL, whose diffusion_model keeps
the original names too. Outside ComfyUI the MODEL is a PlainModel: the LoRA is applied to a copy of its DiT.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from lumina_core import families
from lumina_core.lora import apply_lora, plan_lora
from lumina_core.lora.plan import family_title
from lumina_core.weights.layouts import find_layout

from .comfy_env import IN_COMFYUI, comfy
from .comfy_model import PlainModel

logger = logging.getLogger(__name__)

COMFY_PREFIX = "diffusion_model."


def model_family(model) -> str:
    """The Lumina family of a MODEL's diffusion model: the pack's DiTs say it; ComfyUI's own Lumina 2 is recognised
    from its parameter names (the original layout's)."""
    dit = getattr(getattr(model, "model", None), "diffusion_model", None)
    family = getattr(dit, "family", None)
    if family in families.FAMILIES:
        return family
    found = find_layout(list(dit.state_dict())) if dit is not None else None
    if found is not None:
        return found[0].family
    what = type(getattr(model, "model", model)).__name__
    raise ValueError(
        f"The MODEL input is a {what} model, not a Lumina DiT (the pack's Lumina Load DiT, or ComfyUI's own Lumina 2): "
        f"use ComfyUI's LoraLoaderModelOnly for other models."
    )


def comfy_key_map(plan) -> dict:
    """{LoRA module key prefix: the MODEL's state-dict key, or (key, (dim, first row, rows)) for a row block}, the
    form of ComfyUI's `model_lora_keys_unet`."""
    key_map = {}
    for target in plan.targets:
        key = COMFY_PREFIX + target.key
        if target.rows is None:
            key_map[target.stem] = key
        else:
            key_map[target.stem] = (key, (0, target.rows[0], target.rows[1] - target.rows[0]))
    return key_map


def _log(plan, strength: float, applied: int) -> None:
    logger.info("LoRA %s: %d modules patched on the %s at strength %g", plan.source, applied,
                family_title(plan.family), strength)
    if plan.unmatched:
        logger.warning("LoRA %s: %d keys not applied: %s", plan.source, len(plan.unmatched),
                       "; ".join(f"{k} ({why})" for k, why in list(plan.unmatched.items())[:5]))


def lora_model(model, state: dict, strength: float, source: str):
    """A new MODEL with the LoRA `state` on top of `model` (which is left as it is)."""
    family = model_family(model)
    if not IN_COMFYUI:
        dit = copy.deepcopy(model.model.diffusion_model)
        apply_lora(dit, state, strength, name=Path(source).stem)
        return PlainModel(dit)
    dit = model.model.diffusion_model
    shapes = dense_weight_shapes(dit)
    plan = plan_lora(state, shapes, family, source)
    patches = comfy.lora.load_lora(state, comfy_key_map(plan), log_missing=False)
    patched = model.clone()
    added = patched.add_patches(patches, strength)
    _log(plan, strength, len(added))
    return patched


def dense_weight_shapes(dit) -> dict:
    """The shapes of the DiT's linear weights as they compute: a GGUF layer's dense shape, not its raw blocks'."""
    shapes = {}
    for name, module in dit.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        shape = getattr(module, "weight_shape", None) if getattr(module, "qtype", None) is not None else None
        shape = tuple(shape) if shape is not None else tuple(weight.shape)
        if len(shape) == 2:
            shapes[f"{name}.weight" if name else "weight"] = shape
    return shapes
