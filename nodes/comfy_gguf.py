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
