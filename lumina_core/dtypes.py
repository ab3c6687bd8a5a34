"""Weight dtypes by name, and the dtype fp8-stored weights are computed in.

The lowest layer of the core: every wing may import it, it imports nothing of the package.

fp8 (`float8_e4m3fn`, `float8_e5m2`) is a storage format only (see `lumina_core.weights.fp8`): its weights are cast
per layer to a compute dtype. That dtype is bf16 where the device computes bf16 natively, else fp32 (never fp16:
the DiTs' activations overflow it). On a CPU the choice depends on the CPU (AVX512-BF16 or AMX), so the same fp8
model computes in bf16 on one machine and in fp32 on another; `compute_dtype_for` makes the choice in one place,
logs it once, and can be forced with the environment variable LUMINA_CPU_COMPUTE_DTYPE=bf16|fp32 (or
`force_cpu_compute_dtype`), so that both paths can be run and tested on any machine.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# Every dtype name a loader, the converter or the demo accepts; the fp8 ones need a torch with float8 dtypes.
FP8_NAMES = {"fp8_e4m3fn": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
DTYPE_NAMES = ("bf16", "fp16", "fp32") + tuple(FP8_NAMES)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPES.update({name: getattr(torch, attr) for name, attr in FP8_NAMES.items() if hasattr(torch, attr)})

FP8_DTYPES = frozenset(DTYPES[name] for name in FP8_NAMES if name in DTYPES)

CPU_COMPUTE_ENV = "LUMINA_CPU_COMPUTE_DTYPE"
_CPU_COMPUTE_CHOICES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_forced_cpu_compute: Optional[torch.dtype] = None
_logged: set = set()


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


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    return "file dtype" if dtype is None else str(dtype).replace("torch.", "")


def is_fp8(dtype: Optional[torch.dtype]) -> bool:
    return dtype in FP8_DTYPES


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def force_cpu_compute_dtype(dtype: Optional[torch.dtype]) -> None:
    """Make fp8 weights compute in `dtype` (bf16 or fp32) on the CPU whatever the CPU; None restores the choice
    by CPU (and LUMINA_CPU_COMPUTE_DTYPE)."""
    global _forced_cpu_compute
    if dtype is not None and dtype not in _CPU_COMPUTE_CHOICES.values():
        raise ValueError(f"the CPU compute dtype must be torch.bfloat16 or torch.float32, got {dtype!r}")
    _forced_cpu_compute = dtype


def _cpu_compute_dtype() -> tuple[torch.dtype, str]:
    if _forced_cpu_compute is not None:
        return _forced_cpu_compute, "forced by force_cpu_compute_dtype"
    setting = os.environ.get(CPU_COMPUTE_ENV, "").strip().lower()
    if setting and setting != "auto":
        if setting not in _CPU_COMPUTE_CHOICES:
            raise ValueError(
                f"{CPU_COMPUTE_ENV}={setting!r} is not a CPU compute dtype; set it to bf16, fp32 or auto (or unset it)"
            )
        return _CPU_COMPUTE_CHOICES[setting], f"set by {CPU_COMPUTE_ENV}"
    if cpu_supports_bf16():
        return torch.bfloat16, "this CPU computes bf16 natively"
    return torch.float32, "this CPU has no native bf16 (no AVX512-BF16 or AMX), where bf16 is emulated and slow"


def compute_dtype_for(device) -> torch.dtype:
    """The dtype fp8-stored weights are computed in on `device`: bf16 where it runs natively, else fp32.

    On the CPU the choice is logged once per process (and whenever it changes).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu":
        return torch.bfloat16
    dtype, why = _cpu_compute_dtype()
    if (dtype, why) not in _logged:
        _logged.add((dtype, why))
        logger.info("fp8 weights compute in %s on the CPU: %s", dtype_name(dtype), why)
    return dtype

