"""Converting DiT checkpoints: any layout and family (safetensors, .pth or GGUF) rewritten as an unprefixed
safetensors file of the original names in one dtype, or as a GGUF in city96's conventions; both stream tensor by
tensor (`python -m lumina_core convert`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .dit_files import FP8_FILE_OTHER_DTYPE, DiTFile
from .fp8 import storage_dtypes
from .layouts import CheckpointError
from .tensor_io import write_safetensors

logger = logging.getLogger(__name__)


def convert_checkpoint(
    src_path, dst_path, *, dtype: torch.dtype = torch.bfloat16, progress: Optional[Callable[[int, int], None]] = None,
    families: Optional[Iterable[str]] = None,
):
    """Rewrite a DiT checkpoint (any layout; safetensors or .pth) as an unprefixed safetensors file of the original
    names in `dtype`; returns its configuration.

    Streams tensor by tensor: memory stays at about one tensor, whatever the file size. An fp8 dtype applies to the
    linear weights; the other tensors (norms, biases, tokens: 0.3% of the 5B) are written in bf16.
    """
    src_path, dst_path = Path(src_path), Path(dst_path)
    if dst_path.exists() and dst_path.resolve() == src_path.resolve():
        raise CheckpointError(f"output {dst_path} is the input file; choose another output name")
    source = DiTFile(src_path, families)
    meta_model = source.build()
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    targets = storage_dtypes(meta_model, dtype, FP8_FILE_OTHER_DTYPE)
    source.check_keys(expected)
    total = len(expected)

    def tensors():
        for i, key in enumerate(expected):
            yield key, source.get(key)
            if progress is not None:
                progress(i + 1, total)

    write_safetensors(
        dst_path,
        tensors(),
        shapes={k: (s, targets[k]) for k, s in expected.items()},
        metadata={"format": "pt", "model": source.layout.name, "converted_from": src_path.name},
    )
    return source.config


def convert_to_gguf(
    src_path, dst_path, *, qtype: str = "q8_0", progress: Optional[Callable[[int, int], None]] = None,
    families: Optional[Iterable[str]] = None,
):
    """Write a DiT checkpoint (any layout and family; safetensors, .pth or GGUF) as a GGUF file in city96's
    conventions (`lumina_core.weights.gguf_dit`): q8_0, q5_1, q5_0, q4_1, q4_0 (the matrices; small tensors F32, the
    embedders, final layer and refiners F16), or bf16/fp16/fp32. Streams tensor by tensor, so memory stays near one
    output tensor. Returns the configuration."""
    from .gguf_dit import gguf_write_type, write_dit_gguf

    src_path, dst_path = Path(src_path), Path(dst_path)
    if dst_path.exists() and dst_path.resolve() == src_path.resolve():
        raise CheckpointError(f"output {dst_path} is the input file; choose another output name")
    target = gguf_write_type(qtype)
    source = DiTFile(src_path, families)
    expected = {k: tuple(v.shape) for k, v in source.build().state_dict().items()}
    source.check_keys(expected)
    counts = write_dit_gguf(source, dst_path, expected, target, source.layout.family, progress)
    logger.info("Wrote %s (%s): %s", dst_path, source.layout.title, ", ".join(f"{k} x {n}" for k, n in counts.items()))
    return source.config
