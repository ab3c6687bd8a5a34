"""The key forms of LoRA files for the Lumina DiTs (SPEC.md §11), as data: which tensor a key is, which module of
the model it names in each family, and which family a LoRA was made for.

A key is `<prefix><module><role>`:
- role: `.lora_A.weight`/`.lora_B.weight` (PEFT, diffusers), `.lora_down.weight`/`.lora_up.weight` (kohya, Civitai),
  `.lora_A.default.weight`/`.lora_B.default.weight` (PEFT with its adapter name), `.alpha` (a scalar; scale =
  alpha / rank); `.dora_scale` marks DoRA, which is not a plain LoRA.
- prefix and module: `transformer.` / `base_model.model.` / `diffusion_model.` / none, then a dotted module name in
  the original or the diffusers layout; `lora_unet_` (kohya) with the original name's dots written as `_`;
  `lora_transformer_` (OneTrainer) with the diffusers name's dots written as `_`; `lora_te…` / `text_encoder.`: a
  text-encoder part.
Original names are the released checkpoints' (the pack's modules have the same). diffusers names map onto them with
the layout tables of `lumina_core.weights.layouts`, so files and LoRAs share one map: Lumina-Next's `attn1.to_q`
is `attention.wq`, Lumina-Image-2.0's `attn.to_q`/`to_k`/`to_v` are row blocks of the fused `attention.qkv`
([0:n_heads*head_dim], then the two kv blocks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Optional

from ..weights import layouts

# key suffix -> role of the tensor
ROLES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".alpha", "alpha"),
    (".dora_scale", "dora"),
)
_TEXT_ENCODER = re.compile(r"(lora_te\d*_|(lora_te\d*|text_encoders?|te\d*)\.)")
_KOHYA = re.compile(r"lora_(unet|transformer)_")
_DOTTED_PREFIX = re.compile(r"((base_model\.model|model|module|diffusion_model|transformer|unet)\.)+")
# a block index in a module name, dotted or kohya ("layers.3.", "noise_refiner_0_")
_BLOCK = re.compile(r"(?<![A-Za-z0-9])(layers|noise_refiner|context_refiner)([._])(\d+)(?=[._])")
_PATTERN_BLOCK = re.compile(r"(?<![A-Za-z0-9])(layers|noise_refiner|context_refiner)([._])N(?=[._])")


def _general(name: str) -> tuple[str, Optional[str]]:
    """(the name with its block index as N, the index)."""
    m = _BLOCK.search(name)
    if m is None:
        return name, None
    return name[: m.start(3)] + "N" + name[m.end(3):], m.group(3)


def _specific(pattern: str, index: Optional[str]) -> str:
    """The pattern with its N replaced by the block index."""
    return pattern if index is None else _PATTERN_BLOCK.sub(lambda m: m.group(1) + m.group(2) + index, pattern, 1)


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands in a family's model: an original module name, a row block of it (index into the
    family's split of that weight), or a diffusers copy that has no place of its own in the original."""

    module: str
    part: Optional[int] = None
    copy: bool = False


@dataclass(frozen=True)
class FamilyNames:
    """What the LoRA files of one family may name."""

    family: str
    linears: tuple  # the original names of the family's linear layers ("N": a block index)
    adaln_chunks: int  # outputs of a block's adaLN_modulation.1 per model width
    final_chunks: int  # outputs of final_layer.adaLN_modulation.1 per model width
    to_original: Optional[Callable] = None  # diffusers weight key -> (original weight key, is a copy)
    part_of: Optional[Callable] = None  # diffusers weight key -> (original weight key, index, count) or None
    to_diffusers: Optional[Callable] = None  # original weight key -> its diffusers weight keys
    split: Optional[Callable] = None  # (shapes, weight key) -> row counts of the blocks a weight is split into

    @cached_property
    def diffusers(self) -> dict:
        """diffusers module pattern -> Target pattern."""
        out = {}
        for linear in self.linears if self.to_diffusers else ():
            for key in self.to_diffusers(_specific(linear, "0") + ".weight"):
                part = self.part_of(key) if self.part_of else None
                copy = part is None and self.to_original(key)[1]
                out[_general(key[: -len(".weight")])[0]] = Target(linear, None if part is None else part[1], copy)
        return out

    @cached_property
    def kohya(self) -> dict:
        """module pattern with dots written as underscores (original names, then diffusers names) -> Target."""
        out = {linear.replace(".", "_"): Target(linear) for linear in self.linears}
        for name, target in self.diffusers.items():
            out.setdefault(name.replace(".", "_"), target)
        return out

    def resolve(self, name: str, underscored: bool) -> Optional[Target]:
        """Where module `name` (prefix removed) lands in this family's model, or None."""
        pattern, index = _general(name)
        if underscored:
            target = self.kohya.get(pattern)
        elif pattern in self.linears:
            target = Target(pattern)
        else:
            target = self.diffusers.get(pattern)
        if target is None:
            return None
        return Target(_specific(target.module, index), target.part, target.copy)


_EMBEDDERS = ("x_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2", "cap_embedder.1")
_FINAL = ("final_layer.linear", "final_layer.adaLN_modulation.1")
_FFN = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
_CROSS_ATTENTION_DIT = _EMBEDDERS + _FINAL + tuple(
    f"layers.N.{m}" for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "attention.wk_y",
                              "attention.wv_y") + _FFN + ("adaLN_modulation.1",))
_UNIFIED_DIT = _EMBEDDERS + _FINAL + tuple(
    f"{block}.N.{m}" for block in ("layers", "noise_refiner", "context_refiner")
    for m in ("attention.qkv", "attention.out") + _FFN + (() if block == "context_refiner" else ("adaLN_modulation.1",)))


def _qkv_split(shapes: dict, key: str) -> list:
    """Rows of the fused qkv: the queries (as many as `attention.out` takes), then the keys and the values."""
    q_rows = shapes[key.replace(".attention.qkv.weight", ".attention.out.weight")][1]
    kv_rows = (shapes[key][0] - q_rows) // 2
    return [q_rows, kv_rows, kv_rows]


FAMILY_NAMES = {
    "lumina_t2i": FamilyNames("lumina_t2i", _CROSS_ATTENTION_DIT, adaln_chunks=6, final_chunks=2),
    "lumina_next": FamilyNames(
        "lumina_next", _CROSS_ATTENTION_DIT, adaln_chunks=4, final_chunks=1,
        to_original=layouts.diffusers_to_original, to_diffusers=layouts.original_to_diffusers,
    ),
    "lumina2": FamilyNames(
        "lumina2", _UNIFIED_DIT, adaln_chunks=4, final_chunks=1, to_original=layouts.unified_diffusers_to_original,
        part_of=layouts.unified_diffusers_part, to_diffusers=layouts.unified_original_to_diffusers, split=_qkv_split,
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Keys -> modules


@dataclass
class LoraModule:
    """The tensors of one LoRA module: `stem` is the key prefix in the file, `name` the module name without the
    file's prefix (dots as underscores when `underscored`)."""

    stem: str
    name: str
    underscored: bool
    text_encoder: bool
    keys: dict = field(default_factory=dict)  # role -> key


def split_key(key: str) -> Optional[tuple[str, str]]:
    """(stem, role) of a LoRA key, or None when it is no tensor of a known role."""
    for suffix, role in ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def parse_stem(stem: str) -> LoraModule:
    if _TEXT_ENCODER.match(stem):
        return LoraModule(stem, stem, False, True)
    kohya = _KOHYA.match(stem)
    if kohya:
        return LoraModule(stem, stem[kohya.end():], True, False)
    prefix = _DOTTED_PREFIX.match(stem)
    return LoraModule(stem, stem[prefix.end():] if prefix else stem, False, False)


def group_modules(keys) -> tuple[dict, list]:
    """({stem: LoraModule}, keys of no known role), in file order."""
    modules, unknown = {}, []
    for key in keys:
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        stem, role = parts
        if stem not in modules:
            modules[stem] = parse_stem(stem)
        modules[stem].keys[role] = key
    return modules, unknown


# --------------------------------------------------------------------------------------------------------------
# Which family a LoRA was made for

# modules whose input (down's columns) or output (up's rows) is the model width
_WIDTH_IN = re.compile(r"(attention\.(wq|wk|wv|qkv)|feed_forward\.(w1|w3)|final_layer\.linear)$")
_WIDTH_OUT = re.compile(r"(attention\.(wo|out)|feed_forward\.w2|x_embedder)$")


def _width(resolved: list) -> Optional[int]:
    for target, up_shape, down_shape in resolved:
        if target.part is None and _WIDTH_IN.search(target.module):
            return down_shape[1]
        if target.part is None and _WIDTH_OUT.search(target.module):
            return up_shape[0]
    return None


def _fits(names: FamilyNames, resolved: list, width: int) -> bool:
    """Whether the LoRA's adaLN modules have the family's output widths for a model `width` wide."""
    for target, up_shape, _ in resolved:
        if target.module == "final_layer.adaLN_modulation.1":
            expected = names.final_chunks * width
        elif target.module.endswith(".adaLN_modulation.1"):
            expected = names.adaln_chunks * width
        else:
            continue
        if up_shape[0] != expected:
            return False
    return True


def made_for(modules: list, shapes_of: Callable, model_width: Optional[int] = None) -> Optional[str]:
    """The family a LoRA was made for, from its module names and shapes, or None when they do not tell.

    The family whose names resolve the most modules wins; a tie (Lumina-T2I and Lumina-Next share their original
    names) is settled by the adaLN widths (6 or 4 chunks of the model width per block, 2 or 1 in the final layer),
    the width read off the LoRA's attention or feed-forward modules (else `model_width`)."""
    scores = {}
    for family, names in FAMILY_NAMES.items():
        resolved = []
        for module in modules:
            target = names.resolve(module.name, module.underscored)
            if target is not None:
                up_shape, down_shape = shapes_of(module)
                resolved.append((target, up_shape, down_shape))
        scores[family] = resolved
    best = max(len(r) for r in scores.values())
    if best == 0:
        return None
    tied = [f for f, r in scores.items() if len(r) == best]
    if len(tied) > 1:
        tied = [f for f in tied if (w := _width(scores[f]) or model_width) is None
                or _fits(FAMILY_NAMES[f], scores[f], w)]
    return tied[0] if len(tied) == 1 else None
