"""Low-rank patches on the weights of linear layers: what a LoRA adds to the weight a layer computes with, for every
way this package stores weights, with an exact way back.

A patch adds `scale * up @ down` to rows [start, stop) of a layer's weight (every row when `rows` is None). How it
reaches the computation depends on how the layer keeps its weight, decided when its first patch arrives:

- "layer": a layer that builds its weight in every forward (dequantizing GGUF blocks, `QuantizedWeight`) and applies
  the functions of its `weight_function` list to that dense weight before its matmul (ComfyUI's name for the same
  hook, which its casting layers apply too), or any layer declaring `applies_weight_function = True`. One function
  adding every patch (summed in fp32) goes into the layer's own `weight_function` list; the stored blocks are never
  touched.
- "merge": any other layer whose weight is a plain floating-point tensor (fp32, bf16, fp16). The weight is
  rewritten in place as original + every patch, summed in fp32 from a copy of the original kept on the CPU, so
  stacked patches are rounded once, the Parameter object stays the same (optimisers, compiled graphs and offloading
  keep working), and removing the last patch copies the original back bit for bit.
- "hook": any other layer, such as fp8 storage in `CastLinear`. A forward hook adds `x @ delta.T` to the output,
  which by linearity is the layer's linear map with its cast weight + delta, without writing the stored fp8 tensor.

The layers only need `in_features`/`out_features` and a `weight`; nothing else of them is assumed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..dtypes import is_fp8

_PATCHES = "_weight_patches"
_ORIGINAL = "_weight_patch_original"
_HOOK = "_weight_patch_hook"
_MODE = "_weight_patch_mode"
_FUNCTION = "_weight_patch_function"
_MERGEABLE = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class WeightPatch:
    """scale * up @ down added to rows [start, stop) of a weight [out, in] (all rows when rows is None); `owner` names
    the LoRA it belongs to, so it can be removed with it."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, scale: float, rows: Optional[tuple] = None,
                 owner: str = ""):
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"a low-rank patch needs up [rows, r] and down [r, in], got {tuple(up.shape)} and "
                             f"{tuple(down.shape)}")
        self.up, self.down, self.scale = up.detach(), down.detach(), float(scale)
        self.rows = None if rows is None else (int(rows[0]), int(rows[1]))
        self.owner = owner
        self._cast: dict = {}

    def delta(self, device, dtype=torch.float32) -> torch.Tensor:
        """scale * up @ down [rows, in], computed in fp32 and returned in `dtype`."""
        up = self.up.to(device=device, dtype=torch.float32)
        down = self.down.to(device=device, dtype=torch.float32)
        return (self.scale * (up @ down)).to(dtype)

    def add_to_(self, weight: torch.Tensor) -> torch.Tensor:
        """weight += delta on the patch's rows, in place (weight in fp32); returns weight."""
        rows = weight if self.rows is None else weight[self.rows[0]:self.rows[1]]
        rows += self.delta(weight.device, weight.dtype)
        return weight

    def output(self, x: torch.Tensor, out_features: int) -> torch.Tensor:
        """x @ delta.T [..., out_features] (zero outside the patch's rows), in x's dtype, without forming delta."""
        key = (x.device, x.dtype)
        if key not in self._cast:
            self._cast = {key: (self.up.to(device=x.device, dtype=x.dtype), self.down.to(device=x.device, dtype=x.dtype))}
        up, down = self._cast[key]
        extra = nn.functional.linear(nn.functional.linear(x, down), up) * self.scale
        if self.rows is None:
            return extra
        return nn.functional.pad(extra, (self.rows[0], out_features - self.rows[1]))


def weight_patches(module: nn.Module) -> list:
    """The patches on a layer, in the order they were added."""
    return list(getattr(module, _PATCHES, ()))


def patched_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` (the layer's weight as it computes with it) plus every patch on the layer, summed in fp32 and returned
    in weight's dtype; `weight` itself when the layer has none."""
    patches = getattr(module, _PATCHES, None)
    if not patches:
        return weight
    total = weight.to(torch.float32, copy=True)
    for patch in patches:
        patch.add_to_(total)
    return total.to(weight.dtype)


class _LayerFunction:
    """The function put in a layer's `weight_function` list: the layer's dense weight -> plus its patches."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return patched_weight(self.module, weight)


def _mode_of(module: nn.Module) -> str:
    if getattr(module, "applies_weight_function", False) or callable(getattr(module, "dequantized_weight", None)):
        return "layer"
    weight = getattr(module, "weight", None)
    plain = type(weight) in (torch.Tensor, nn.Parameter)  # tensor subclasses hold quantized blocks
    if plain and weight.dtype in _MERGEABLE and not is_fp8(weight.dtype) and weight.device.type != "meta":
        return "merge"
    return "hook"


def _hook(module, args, output):
    out_features = output.shape[-1]
    for patch in getattr(module, _PATCHES):
        output = output + patch.output(args[0], out_features)
    return output


def _merge(module: nn.Module) -> None:
    original = getattr(module, _ORIGINAL)
    weight = module.weight
    with torch.no_grad():
        if not getattr(module, _PATCHES):
            weight.copy_(original)
            return
        total = original.to(device=weight.device, dtype=torch.float32, copy=True)
        for patch in getattr(module, _PATCHES):
            patch.add_to_(total)
        weight.copy_(total.to(weight.dtype))


def add_weight_patch(module: nn.Module, patch: WeightPatch) -> str:
    """Put `patch` on a linear layer (see the module docstring for how); returns the way it applies
    ("merge", "layer" or "hook")."""
    out_features, in_features = module.out_features, module.in_features
    height = out_features if patch.rows is None else patch.rows[1] - patch.rows[0]
    if patch.down.shape[1] != in_features or patch.up.shape[0] != height or (
            patch.rows is not None and not 0 <= patch.rows[0] < patch.rows[1] <= out_features):
        raise ValueError(f"a patch of {patch.up.shape[0]}x{patch.down.shape[1]} on rows {patch.rows} does not fit a "
                         f"layer of {out_features}x{in_features}")
    if not getattr(module, _PATCHES, None):
        mode = _mode_of(module)
        setattr(module, _MODE, mode)
        setattr(module, _PATCHES, [])
        if mode == "merge":
            setattr(module, _ORIGINAL, module.weight.detach().to("cpu", copy=True))
        elif mode == "hook":
            setattr(module, _HOOK, module.register_forward_hook(_hook))
        else:
            function = _LayerFunction(module)
            setattr(module, _FUNCTION, function)
            module.weight_function = list(getattr(module, "weight_function", ())) + [function]
    getattr(module, _PATCHES).append(patch)
    if getattr(module, _MODE) == "merge":
        _merge(module)
    return getattr(module, _MODE)


def remove_weight_patches(module: nn.Module, owner: Optional[str] = None) -> int:
    """Remove the patches of `owner` (every patch when None) from a layer; once none is left the layer is as before
    its first patch (the original weight copied back bit for bit, or the hook removed). Returns how many went."""
    patches = getattr(module, _PATCHES, None)
    if not patches:
        return 0
    kept = [p for p in patches if owner is not None and p.owner != owner]
    removed = len(patches) - len(kept)
    patches[:] = kept
    mode = getattr(module, _MODE)
    if mode == "merge":
        _merge(module)
    if not kept:
        if mode == "hook":
            getattr(module, _HOOK).remove()
        elif mode == "layer":
            function = getattr(module, _FUNCTION)
            module.weight_function = [f for f in module.weight_function if f is not function]
            if not module.weight_function and "weight_function" in vars(module):
                del module.weight_function  # the layer's own (class) default is seen again
        for attr in (_PATCHES, _ORIGINAL, _HOOK, _MODE, _FUNCTION):
            if hasattr(module, attr):
                delattr(module, attr)
    return removed
