"""Weight dtypes by name, fp8 storage, and a linear layer that casts its weights when it runs.

fp8 (`float8_e4m3fn`, `float8_e5m2`) is a storage format here, as in ComfyUI's fp8 weight dtypes: matrices are kept
in fp8 and each linear layer casts its weight to the activations' dtype (bf16, or fp32 on a CPU without bf16) for
its own matmul, so only one layer's weight exists in the compute dtype at a time. Only the weights of linear
layers are stored in fp8; norm weights, biases, embeddings and the other small tensors (under 1% of either model)
stay in the compute dtype. That follows ComfyUI's casting layers, which cast every weight to the input dtype
anyway, while keeping the values that set the scale of every activation at full precision.

Inside ComfyUI the nodes pass ComfyUI's own casting layers (`comfy.ops`) instead of `CastLinear`, so ComfyUI's
low-VRAM partial loading applies; this module is what the core uses on its own.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from torch import nn

# Every dtype name a loader, the converter or the demo accepts; the fp8 ones need a torch with float8 dtypes.
FP8_NAMES = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
DTYPE_NAMES = ("bf16", "fp16", "fp32") + tuple(FP8_NAMES)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPES.update({name: getattr(torch, attr) for name, attr in FP8_NAMES.items() if hasattr(torch, attr)})

FP8_DTYPES = frozenset(DTYPES[name] for name in FP8_NAMES if name in DTYPES)


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of a dtype name ("bf16", "fp8_e4m3fn", ...), or a ValueError that says what to pick."""
    if name in DTYPES:
        return DTYPES[name]
    if name in FP8_NAMES:
        raise ValueError(
            f"weight dtype {name!r} needs a PyTorch with float8 dtypes (2.1 or newer); this PyTorch "
            f"{torch.__version__} has no torch.{FP8_NAMES[name]}. Choose bf16, or update PyTorch."
        )
    raise ValueError(f"unknown weight dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")


def is_fp8(dtype: Optional[torch.dtype]) -> bool:
    return dtype in FP8_DTYPES


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def fp8_compute_dtype(device) -> torch.dtype:
    """The dtype fp8-stored weights are computed in on `device`: bf16 where it runs natively, else fp32.

    Never fp16: the Flag-DiT's activations overflow it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.bfloat16


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
