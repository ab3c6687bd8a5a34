"""fp8 storage: a linear layer that casts its weight when it runs, and which tensors of a model are stored in fp8.

fp8 (`float8_e4m3fn`, `float8_e5m2`) is a storage format here, as in ComfyUI's fp8 weight dtypes: matrices are kept
in fp8 and each linear layer casts its weight to the activations' dtype (the compute dtype chosen by
`lumina_core.dtypes.compute_dtype_for`) for its own matmul, so only one layer's weight exists in the compute dtype
at a time. Only the weights of linear layers are stored in fp8; norm weights, biases, embeddings and the other small
tensors (under 1% of any model here) stay in the compute dtype. That follows ComfyUI's casting layers, which cast
every weight to the input dtype anyway, while keeping the values that set the scale of every activation at full
precision.

Inside ComfyUI the nodes pass ComfyUI's own casting layers (`comfy.ops`) instead of `CastLinear`, so ComfyUI's
low-VRAM partial loading applies; this module is what the core uses on its own.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..dtypes import is_fp8


class CastLinear(nn.Linear):
    """nn.Linear that keeps its weight in any storage dtype (fp8) and casts it to the input's dtype and device in
    forward. Same constructor and state-dict keys as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(device=x.device, dtype=x.dtype)
        bias = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return nn.functional.linear(x, weight, bias)


# The `operations` namespace of the Flag-DiT (it builds every matrix through operations.Linear).
CAST_OPERATIONS = types.SimpleNamespace(Linear=CastLinear)


def swap_linear_layers(module: nn.Module, linear_cls=CastLinear) -> nn.Module:
    """Replace every nn.Linear under `module` by `linear_cls` with the same shape, device and dtype.

    Meant for a model still on the meta device (transformers' LlamaModel, built from plain nn.Linear), so the
    replacement allocates nothing; the weights are assigned afterwards.
    """
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            new = linear_cls(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                device=child.weight.device,
                dtype=child.weight.dtype,
            )
            # Layers that defer creating their weight until loading (ComfyUI's, in one of its memory modes) get the
            # original's meta tensors, so the state-dict keys exist; loading with assign=True replaces them.
            if getattr(new, "weight", None) is None:
                new.weight = child.weight
                new.bias = child.bias
            setattr(module, name, new)
        else:
            swap_linear_layers(child, linear_cls)
    return module


def linear_weight_names(model: nn.Module) -> set[str]:
    """State-dict keys of the weights of every linear layer: the tensors that fp8 storage applies to."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def storage_dtypes(model: nn.Module, weight_dtype: torch.dtype, other_dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype each state-dict tensor is stored in: linear weights in `weight_dtype`, the rest in `other_dtype`
    (the same when weight_dtype is not fp8)."""
    if not is_fp8(weight_dtype):
        return {key: weight_dtype for key in model.state_dict()}
    linear = linear_weight_names(model)
    return {key: weight_dtype if key in linear else other_dtype for key in model.state_dict()}
