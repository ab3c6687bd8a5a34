"""Matching a LoRA to a model: which weight (and which rows of it) each LoRA module patches, with what scale, and
which keys have no place in the model and why. Works from the model's weight shapes alone, so the same plan serves
the core's modules and ComfyUI's ModelPatcher.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from .. import families
from ..weights.tensor_io import WeightsFileError, open_tensor_file
from .names import FAMILY_NAMES, group_modules, made_for


class LoraError(ValueError):
    """A LoRA that cannot be applied to this model, with what it is and what to do."""


class LoraFamilyError(LoraError):
    """A LoRA made for another Lumina family than the model's."""


@dataclass(frozen=True)
class LoraTarget:
    stem: str  # the LoRA module's key prefix in the file
    key: str  # the model's weight (original name)
    rows: Optional[tuple]  # (start, stop) of the weight's rows it patches; None: every row
    up: torch.Tensor  # [rows, rank]
    down: torch.Tensor  # [rank, in]
    scale: float  # alpha / rank, or 1 without alpha; the strength multiplies it


@dataclass
class LoraPlan:
    source: str
    family: str  # the model's
    made_for: Optional[str]  # the family the LoRA's keys say it was made for (None: they do not tell)
    targets: list = field(default_factory=list)
    unmatched: dict = field(default_factory=dict)  # LoRA key -> why it was not applied


def family_title(name: str) -> str:
    family = families.get_family(name)
    return f"{family.title} ({family.dit_title})"


def read_lora(lora: Union[str, Path, dict]) -> tuple[dict, str]:
    """(state dict, a name for messages) of a LoRA file (.safetensors, or a weights-only pickle) or a state dict."""
    if isinstance(lora, dict):
        return lora, "the LoRA state dict"
    path = Path(lora)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    try:
        src = open_tensor_file(path, LoraError)
        return {key: src.get(key) for key in src.keys}, str(path)
    except WeightsFileError as err:
        raise LoraError(str(err)) from None


def _shape_problem(module, up, down, height, width) -> Optional[str]:
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        return f"{module.stem}: up {tuple(up.shape)} and down {tuple(down.shape)} are no LoRA pair"
    if up.shape[0] != height or down.shape[1] != width:
        return f"{module.stem} is {up.shape[0]}x{down.shape[1]}, the model's layer {height}x{width}"
    return None


def plan_lora(state: dict, shapes: dict, family: str, source: str = "the LoRA") -> LoraPlan:
    """Match the LoRA `state` to a model of `family` whose linear weights have `shapes` ({original weight key:
    (out, in)}).

    Raises LoraFamilyError for a LoRA of another family (named), and LoraError when a module fits no layer of its
    size or nothing at all matches. Keys that match nothing are in `unmatched` with the reason.
    """
    names = FAMILY_NAMES[family]
    modules, unknown = group_modules(state)
    plan = LoraPlan(source, family, None)
    for key in unknown:
        plan.unmatched[key] = "not a LoRA tensor (lora_A/lora_B, lora_down/lora_up, alpha)"
    dit_modules = [m for m in modules.values() if not m.text_encoder and "up" in m.keys and "down" in m.keys]

    def shapes_of(module):
        return tuple(state[module.keys["up"]].shape), tuple(state[module.keys["down"]].shape)

    width = shapes.get("x_embedder.weight", (None,))[0]
    plan.made_for = made_for(dit_modules, shapes_of, width)
    if plan.made_for is not None and plan.made_for != family:
        raise LoraFamilyError(
            f"{source} is a LoRA for {family_title(plan.made_for)}, but the model is {family_title(family)}: load a "
            f"{families.get_family(family).title} LoRA, or the LoRA's own model"
        )
    problems = []
    for module in modules.values():
        def skip(reason: str, module=module):
            for key in module.keys.values():
                plan.unmatched[key] = reason

        if module.text_encoder:
            skip("a text-encoder part: the Lumina text encoders take no LoRA here")
            continue
        if "dora" in module.keys:
            skip("DoRA (dora_scale) is not a plain LoRA and is not supported")
            continue
        if "up" not in module.keys or "down" not in module.keys:
            skip(f"{module.stem} has no {'up' if 'up' not in module.keys else 'down'} matrix")
            continue
        target = names.resolve(module.name, module.underscored)
        if target is None:
            skip(f"{module.stem} names no layer of a {family_title(family)}")
            continue
        if target.copy:
            skip(f"{module.stem} is diffusers' copy of {target.module} for the cross-attention alone; the original "
                 f"shares one {target.module} with the self-attention, so it has no exact place")
            continue
        key = target.module + ".weight"
        if key not in shapes:
            skip(f"{module.stem} names {target.module}, which this model does not have")
            continue
        height, width_in = shapes[key]
        rows = None
        if target.part is not None:
            sizes = names.split(shapes, key)
            start = sum(sizes[: target.part])
            rows, height = (start, start + sizes[target.part]), sizes[target.part]
        up, down = state[module.keys["up"]], state[module.keys["down"]]
        problem = _shape_problem(module, up, down, height, width_in)
        if problem:
            problems.append(problem)
            continue
        scale = float(state[module.keys["alpha"]]) / down.shape[0] if "alpha" in module.keys else 1.0
        plan.targets.append(LoraTarget(module.stem, key, rows, up, down, scale))
    if problems:
        raise LoraError(
            f"{source} does not fit this {family_title(family)}: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. It was made for a model of another "
            f"size or family."
        )
    if not plan.targets:
        first = ", ".join(list(state)[:4])
        raise LoraError(
            f"none of the {len(state)} keys of {source} patches a layer of this {family_title(family)} (first keys: "
            f"{first}); it was made for another model"
            + ("; it holds text-encoder parts only" if modules and all(m.text_encoder for m in modules.values())
               else "")
        )
    return plan
