"""Applying LoRAs to the core's DiT modules and taking them off again.

Each LoRA module becomes a `WeightPatch` on its layer (`lumina_core.weights.weight_patches`): applied to the dense
weight by layers that build it per forward (GGUF blocks, through their `weight_function` list), merged into plain
fp32/bf16/fp16 weights from a kept copy of the original, and added to the output of any other layer (fp8 storage)
by a forward hook.
So fp8 and quantized storage is never rewritten, stacked LoRAs add up, and removing them restores the weights bit for
bit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from torch import nn

from .. import families
from ..weights.weight_patches import WeightPatch, add_weight_patch, remove_weight_patches, weight_patches
from .plan import family_title, plan_lora, read_lora

logger = logging.getLogger(__name__)

_NAMES = "_lora_names"  # on the DiT: the names of the LoRAs applied, in order


@dataclass
class LoraReport:
    """What `apply_lora` did: `applied`, the LoRA modules put on the model (their key prefixes in the file);
    `unmatched`, the LoRA keys that were not applied, each with the reason in `reasons`."""

    name: str  # the LoRA's name on the model (for remove_lora)
    source: str
    family: str
    strength: float
    applied: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)
    reasons: dict = field(default_factory=dict)


def _dit(model) -> nn.Module:
    dit = getattr(model, "_orig_mod", model)  # torch.compile keeps the module as _orig_mod
    if getattr(dit, "family", None) not in families.FAMILIES:
        raise TypeError(f"{type(dit).__name__} is not a Lumina DiT (Flag-DiT, Next-DiT or Unified Next-DiT)")
    return dit


def linear_layers(model: nn.Module) -> dict:
    """{weight key: layer} of every linear-like layer (in_features, out_features and a weight)."""
    return {
        f"{name}.weight": module for name, module in model.named_modules()
        if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
        and hasattr(module, "weight")
    }


def loaded_loras(model) -> list:
    """The names of the LoRAs on a DiT, in the order they were applied."""
    return list(getattr(_dit(model), _NAMES, ()))


def apply_lora(model, lora: Union[str, Path, dict], strength: float = 1.0, *, name: Optional[str] = None) -> LoraReport:
    """Apply a LoRA (a file or a state dict, in any key form of SPEC.md §11) to a Lumina DiT, on top of those already
    applied; returns a LoraReport. strength multiplies every module's alpha / rank (1 without alpha).

    A LoRA of another family raises LoraFamilyError naming the family it was made for; modules that fit no layer of
    their size raise LoraError; keys that name nothing in the model are listed in the report (and logged).
    """
    dit = _dit(model)
    state, source = read_lora(lora)
    layers = linear_layers(dit)
    shapes = {key: (layer.out_features, layer.in_features) for key, layer in layers.items()}
    plan = plan_lora(state, shapes, dit.family, source)
    names = getattr(dit, _NAMES, [])
    if name is None:  # the file's name, numbered when it is applied again
        base = "lora" if isinstance(lora, dict) else Path(source).stem
        name, count = base, 1
        while name in names:
            count += 1
            name = f"{base}.{count}"
    elif name in names:
        raise ValueError(f"a LoRA named {name!r} is already applied; remove it first or choose another name")
    modes = set()
    if strength != 0:
        for target in plan.targets:
            patch = WeightPatch(target.up, target.down, strength * target.scale, target.rows, owner=name)
            modes.add(add_weight_patch(layers[target.key], patch))
    setattr(dit, _NAMES, names + [name])
    report = LoraReport(name, source, dit.family, float(strength), [t.stem for t in plan.targets],
                        sorted(plan.unmatched), dict(plan.unmatched))
    logger.info("LoRA %s: %d modules on the %s at strength %g (%s)", source, len(report.applied),
                family_title(dit.family), strength, ", ".join(sorted(modes)) or "nothing changed")
    if report.unmatched:
        logger.warning("LoRA %s: %d keys not applied: %s", source, len(report.unmatched),
                       "; ".join(f"{k} ({v})" for k, v in list(report.reasons.items())[:5]))
    return report


def remove_lora(model, name: Optional[str] = None) -> None:
    """Take the LoRA `name` (every LoRA when None) off a DiT; without LoRAs its weights are the loaded ones again,
    bit for bit."""
    dit = _dit(model)
    names = getattr(dit, _NAMES, [])
    if name is not None and name not in names:
        raise ValueError(f"no LoRA named {name!r} is applied (applied: {', '.join(names) or 'none'})")
    for layer in linear_layers(dit).values():
        if weight_patches(layer):
            remove_weight_patches(layer, name)
    remaining = [n for n in names if name is not None and n != name]
    if remaining:
        setattr(dit, _NAMES, remaining)
    elif hasattr(dit, _NAMES):
        delattr(dit, _NAMES)
