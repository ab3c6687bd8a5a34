"""GGUF DiTs inside ComfyUI: a `comfy.ops` operations class whose Linear keeps a GGUF file's weights as blocks.

The Linear is ComfyUI's casting Linear (`comfy.ops.manual_cast.Linear`) with the core's `QuantizedWeight` mixed in,
so ComfyUI's ModelPatcher treats it as one of its own: it counts the blocks' true size, loads it whole or leaves it
on the offload device in low-VRAM mode, and moves it with the model. A quantized weight is dequantized on the input's
device in every forward and ComfyUI's `weight_function` / `bias_function` (low-VRAM LoRA patches) are applied to the
dequantized weight; an unquantized weight (the embedders and refiners a GGUF keeps in F16) takes ComfyUI's own
casting path unchanged. The same idea as city96/ComfyUI-GGUF's GGMLOps, without a tensor subclass.
"""

from __future__ import annotations

import torch

from .comfy_env import IN_COMFYUI, comfy

_OPERATIONS = None
_PATCHER = None
# Marks the LoRA patches this module's patcher puts on a quantized layer's weight_function list.
_TAG = "lumina_gguf_patch"


def gguf_operations():
    """The operations class to build a GGUF DiT with inside ComfyUI (built once)."""
    global _OPERATIONS
    if _OPERATIONS is None:
        _OPERATIONS = _make_operations()
    return _OPERATIONS


def _make_operations():
    if not IN_COMFYUI:
        raise RuntimeError("gguf_operations() is ComfyUI's; outside it the core's GGUF_OPERATIONS are used")
    # Imported here: it needs the gguf package, which only GGUF files need (the pack loads without it).
    from lumina_core.weights.quantized import QuantizedWeight

    run_every_op = getattr(comfy.ops, "run_every_op", lambda: None)

    class Linear(QuantizedWeight, comfy.ops.manual_cast.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            # Always with (meta) parameters, whatever ComfyUI's lazy-init mode: the GGUF loader fills them.
            torch.nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)

        def forward(self, x, *args, **kwargs):
            if self.qtype is None:
                return super().forward(x, *args, **kwargs)
            run_every_op()
            weight, bias = self.cast_weight_bias(x)
            return torch.nn.functional.linear(x, weight, bias)

    class GGUFOps(comfy.ops.manual_cast):
        pass

    GGUFOps.Linear = Linear
    return GGUFOps


def gguf_model_patcher():
    """The ModelPatcher class of a GGUF DiT (built once): ComfyUI's classic patcher, except that a patched weight of
    a GGUF layer is never merged (ComfyUI would cast a quantized layer's raw blocks to float and patch those, and
    round a patched F16 matrix back to F16): the patches go on the layer's `weight_function` list, which the layer
    applies to its dense weight in every forward, as ComfyUI's low-VRAM mode does for the layers it leaves on the
    offload device."""
    global _PATCHER
    if _PATCHER is None:
        _PATCHER = _make_patcher()
    return _PATCHER


def _quantized_owner(model, key: str):
    """The GGUF layer whose weight `key` names (quantized, or a float matrix the file kept in F16/BF16, which
    merging would round to that storage dtype), or None."""
    path, _, name = key.rpartition(".")
    if name != "weight" or not path:
        return None
    try:
        module = comfy.utils.get_attr(model, path)
    except AttributeError:
        return None
    return module if hasattr(module, "qtype") and hasattr(module, "dequantized_weight") else None


def _drop_tagged(module) -> None:
    functions = getattr(module, "weight_function", None)
    if functions:
        module.weight_function = [f for f in functions if not getattr(f, _TAG, False)]


def _make_patcher():
    base = comfy.model_patcher.ModelPatcher

    class GGUFModelPatcher(base):
        def patch_weight_to_device(self, key, device_to=None, inplace_update=False, return_weight=False,
                                   force_cast=False):
            module = _quantized_owner(self.model, key)
            if module is None:
                return super().patch_weight_to_device(key, device_to, inplace_update, return_weight, force_cast)
            if return_weight:  # the patched dense weight itself (e.g. for saving a merged model)
                weight = module.dequantized_weight(device_to).float()
                if key in self.patches:
                    weight = comfy.lora.calculate_weight(self.patches[key], weight, key)
                return weight
            _drop_tagged(module)
            if key in self.patches:
                patch = comfy.model_patcher.LowVramPatch(key, self.patches)
                setattr(patch, _TAG, True)
                module.weight_function = list(getattr(module, "weight_function", [])) + [patch]
            return module.weight

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                for module in self.model.modules():
                    _drop_tagged(module)
            return super().unpatch_model(device_to=device_to, unpatch_weights=unpatch_weights)

    return GGUFModelPatcher
