"""Quantized storage: linear layers whose weight stays in GGUF blocks and is dequantized when the layer runs.

A quantized weight is the tensor's raw bytes, a uint8 parameter of shape [out_features, row_bytes] (blocks never
cross rows, SPEC.md §10), with its GGUF type and shape on the layer. Being an ordinary parameter it moves with the
module (`.to(device)`, ComfyUI's load and offload) as its bytes, is left alone by dtype casts (`.to(torch.bfloat16)`
casts floating-point parameters only) and counts its true size in a state dict. In forward the bytes go to the
input's device, are dequantized there in fp32 (`dequantize_gguf`), patched, and cast to the input's dtype: one
layer's dense weight exists at a time, as with fp8 storage (`lumina_core.weights.fp8`).

`QuantizedWeight` is the part any linear class can mix in (the core's `GGUFLinear`; the nodes mix it into ComfyUI's
`comfy.ops` Linear so that low-VRAM partial loading and offload apply). Its hook for weight patches (LoRA): the
layer's `weight_function` / `bias_function` lists, ComfyUI's own names for them (its `cast_bias_weight` applies them
the same way), are applied in order to the dequantized fp32 weight before the cast, so a patch sees and changes the
real weight, never the blocks. A layer whose weight is a plain float tensor (an unquantized tensor of a GGUF file)
casts it to the input's dtype and applies the same functions.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

from .gguf_quants import QTypeLike, check_supported, dequantize_gguf, raw_shape


class QuantizedWeight:
    """Mixin for a linear layer (an nn.Linear subclass): the weight may be GGUF blocks, see the module docstring.

    qtype: None while the weight is a float tensor; else the GGUF type, with `weight_shape` the weight's dense shape.
    """

    qtype = None
    weight_shape: Optional[torch.Size] = None

    def load_quantized(self, raw: torch.Tensor, qtype: QTypeLike, shape) -> None:
        """Make `raw` (uint8 [out_features, row_bytes], on any device) the weight, kept quantized as `qtype`."""
        qtype = check_supported(qtype, "a quantized linear weight")
        shape = torch.Size(int(d) for d in shape)
        if tuple(shape) != (self.out_features, self.in_features):
            raise ValueError(f"a weight of shape {tuple(shape)} does not fit a linear layer {self.in_features} -> "
                             f"{self.out_features}")
        if raw.dtype != torch.uint8 or tuple(raw.shape) != raw_shape(qtype, shape):
            raise ValueError(f"the blocks of a {qtype.name} weight of shape {tuple(shape)} are uint8 of shape "
                             f"{raw_shape(qtype, shape)}, got {raw.dtype} of shape {tuple(raw.shape)}")
        self.weight = nn.Parameter(raw, requires_grad=False)
        self.qtype = qtype
        self.weight_shape = shape

    @property
    def is_quantized(self) -> bool:
        return self.qtype is not None

    def dequantized_weight(self, device=None) -> torch.Tensor:
        """The dense weight on `device` (default: where the blocks are): fp32 when quantized, else the stored tensor."""
        weight = self.weight if device is None else self.weight.to(device, non_blocking=True)
        if self.qtype is None:
            return weight
        return dequantize_gguf(weight, self.qtype, self.weight_shape)

    def cast_weight_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) for a forward on `x`: dense, patched by `weight_function`/`bias_function`, in x's dtype and
        on x's device."""
        weight = self.dequantized_weight(x.device)
        if self.qtype is None:
            weight = weight.to(x.dtype)
        for patch in getattr(self, "weight_function", ()):
            weight = patch(weight)
        weight = weight.to(x.dtype)
        bias = None
        if self.bias is not None:
            bias = self.bias.to(device=x.device, dtype=x.dtype)
            for patch in getattr(self, "bias_function", ()):
                bias = patch(bias)
        return weight, bias

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return f"{text}, gguf={self.qtype.name}" if self.qtype is not None else text


class GGUFLinear(QuantizedWeight, nn.Linear):
    """nn.Linear whose weight is GGUF blocks (after `load_quantized`) or any float tensor, cast to the input's dtype
    and device in forward. Same constructor and state-dict keys as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.cast_weight_bias(x)
        return nn.functional.linear(x, weight, bias)


# The `operations` namespace the DiTs are built with to keep a GGUF file's linear weights quantized.
GGUF_OPERATIONS = types.SimpleNamespace(Linear=GGUFLinear)


def quantized_bytes(model: nn.Module) -> int:
    """The bytes of a model's parameters and buffers as held (quantized weights as their blocks)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
