"""Rewriting a LoRA in the original-name form that ComfyUI's own LoraLoader reads on any model whose weights keep
the original names (the pack's DiTs, ComfyUI's Lumina 2): `diffusion_model.<original module>.lora_down.weight`,
`.lora_up.weight` and `.alpha`.

Modules that map one to one keep their tensors and alpha. Modules that land on row blocks of one weight
(Lumina-Image-2.0's diffusers to_q/to_k/to_v on the fused qkv), or several modules on the same weight, become one
LoRA on that weight: the downs stacked, the ups placed on their rows with their scales folded in, no alpha (scale 1),
which is the same update exactly. Text-encoder parts are kept as they are (ComfyUI's LoraLoader applies them to its
own text encoders where their names match); keys that name no Lumina layer are left out and reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..weights.dit_files import DiTFile
from ..weights.tensor_io import write_safetensors
from .names import FAMILY_NAMES, group_modules, made_for
from .plan import LoraError, family_title, read_lora

PREFIX = "diffusion_model."


def convert_lora(state: dict, *, family: Optional[str] = None, shapes: Optional[dict] = None) -> tuple[dict, dict]:
    """(the LoRA in original names, {key left out: why}).

    family: the Lumina family it is for (default: read from its keys; Lumina-T2I and Lumina-Next share their names).
    shapes: {original weight key: (out, in)} of a model, needed only to place a lone diffusers to_q/to_k/to_v (the
    qkv split is otherwise read from the LoRA's own blocks).
    """
    modules, unknown = group_modules(state)
    dropped = {key: "not a LoRA tensor" for key in unknown}
    dit = [m for m in modules.values() if not m.text_encoder and "up" in m.keys and "down" in m.keys]

    def shapes_of(module):
        return tuple(state[module.keys["up"]].shape), tuple(state[module.keys["down"]].shape)

    family = family or made_for(dit, shapes_of) or "lumina_t2i"
    names = FAMILY_NAMES[family]
    out, groups = {}, {}
    for module in modules.values():
        if module.text_encoder:
            out.update({key: state[key] for key in module.keys.values()})
            continue
        target = names.resolve(module.name, module.underscored)
        why = None
        if "dora" in module.keys:
            why = "DoRA is not a plain LoRA"
        elif "up" not in module.keys or "down" not in module.keys:
            why = "an incomplete LoRA module"
        elif target is None:
            why = f"names no layer of a {family_title(family)}"
        elif target.copy:
            why = f"diffusers' copy of {target.module}, which has no exact place in the original"
        if why:
            dropped.update(dict.fromkeys(module.keys.values(), why))
            continue
        groups.setdefault(target.module, []).append((module, target))
    for original, members in groups.items():
        stem = PREFIX + original
        if len(members) == 1 and members[0][1].part is None:
            module = members[0][0]
            out[f"{stem}.lora_down.weight"] = state[module.keys["down"]]
            out[f"{stem}.lora_up.weight"] = state[module.keys["up"]]
            if "alpha" in module.keys:
                out[f"{stem}.alpha"] = state[module.keys["alpha"]]
            continue
        down, up = _fuse(state, original, members, names, shapes)
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, up
    return out, dropped


def _fuse(state, original, members, names, shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA (down, up) equal to the sum of `members` (each on all rows or on one block of the weight)."""
    key = original + ".weight"
    block_rows = {t.part: state[m.keys["up"]].shape[0] for m, t in members if t.part is not None}
    if any(t.part is not None for _, t in members):
        if shapes is not None and key in shapes:
            sizes = names.split(shapes, key)
        elif len(block_rows) == 3:
            sizes = [block_rows[i] for i in range(3)]
        else:
            raise LoraError(f"the LoRA patches only some of the row blocks of {original}; pass the model (--dit) so "
                            f"that their places in it are known")
        height = sum(sizes)
    else:
        height = state[members[0][0].keys["up"]].shape[0]
    downs, ups = [], []
    for module, target in members:
        down, up = state[module.keys["down"]].float(), state[module.keys["up"]].float()
        scale = float(state[module.keys["alpha"]]) / down.shape[0] if "alpha" in module.keys else 1.0
        start = 0 if target.part is None else sum(sizes[: target.part])
        placed = torch.zeros(height, down.shape[0])
        placed[start:start + up.shape[0]] = up * scale
        downs.append(down)
        ups.append(placed)
    dtype = state[members[0][0].keys["up"]].dtype
    return torch.cat(downs).to(dtype), torch.cat(ups, dim=1).to(dtype)


def convert_lora_file(src, dst, *, dit=None, family: Optional[str] = None) -> dict:
    """Write the LoRA file `src` to `dst` (.safetensors) in original names; `dit`: a checkpoint of the model (read
    for its family and shapes, no weights). Returns {"modules", "text_encoder_keys", "dropped"} for the summary."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise LoraError(f"output {dst} is the input file; choose another output name")
    state, _ = read_lora(src)
    shapes = None
    if dit is not None:
        source = DiTFile(dit)
        family = family or source.layout.family
        shapes = {k: source.shape(k) for k in source.file_key}
    out, dropped = convert_lora(state, family=family, shapes=shapes)
    if not any(k.startswith(PREFIX) for k in out):
        raise LoraError(f"{src}: no key names a Lumina DiT layer (first keys: {', '.join(list(state)[:4])})")
    write_safetensors(dst, iter(out.items()), shapes={k: (tuple(v.shape), v.dtype) for k, v in out.items()},
                      metadata={"format": "pt", "converted_from": src.name})
    return {"modules": sum(k.endswith(".lora_down.weight") for k in out if k.startswith(PREFIX)),
            "text_encoder_keys": sum(not k.startswith(PREFIX) for k in out), "dropped": dropped}
