"""GGUF files for the tests, written with the `gguf` package's own writer and quantizers (not with the package's), and
blocks of the K-quant types, which that package cannot quantize: random bytes whose fp16 scales are set to small
finite values, so that the weights are finite and of a sensible size. The truth for their values is always
`gguf.quants.dequantize`.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants

Q = GGMLQuantizationType
LEGACY = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
K_QUANTS = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
FLOATS = (Q.F32, Q.F16, Q.BF16)
ALL_13 = FLOATS + LEGACY + K_QUANTS

# Byte offsets of the fp16 scale (and minimum) fields in a block, and the largest integer a scale multiplies
# (llama.cpp's block layouts: ggml-common.h).
SCALE_FIELDS = {
    Q.Q8_0: ((0,), 127), Q.Q4_0: ((0,), 8), Q.Q4_1: ((0, 2), 15), Q.Q5_0: ((0,), 16), Q.Q5_1: ((0, 2), 31),
    Q.Q2_K: ((80, 82), 45), Q.Q3_K: ((108,), 128), Q.Q4_K: ((0, 2), 945), Q.Q5_K: ((0, 2), 1953),
    Q.Q6_K: ((208,), 4064),
}


def random_blocks(qtype, rows: int, cols: int, rng: np.random.Generator, finite: bool = True) -> np.ndarray:
    """uint8 [rows, row_bytes] of random blocks; with `finite`, scales of about 1/sqrt(cols) per weight unit."""
    block, size = GGML_QUANT_SIZES[qtype]
    assert cols % block == 0, (qtype, cols)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    if finite and qtype in SCALE_FIELDS:
        offsets, largest = SCALE_FIELDS[qtype]
        for at in offsets:
            scale = rng.uniform(0.5, 1.5, size=raw.shape[0]) / (np.sqrt(cols) * largest)
            raw[:, at:at + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, cols // block * size)


def encode(weight: torch.Tensor, qtype, rng: np.random.Generator) -> tuple[np.ndarray, torch.Tensor]:
    """(the data to write for `qtype`, the float32 values the file then holds). Legacy types and floats quantize
    `weight` with the gguf package; K types are random blocks of the weight's shape."""
    data = weight.detach().float().numpy()
    if qtype in K_QUANTS:
        raw = random_blocks(qtype, int(np.prod(data.shape[:-1])), data.shape[-1], rng)
        raw = raw.reshape(*data.shape[:-1], raw.shape[-1])
    else:
        raw = quants.quantize(data, qtype)
    values = quants.dequantize(raw, qtype) if qtype not in (Q.F32, Q.F16) else raw.astype(np.float32)
    return raw, torch.from_numpy(np.ascontiguousarray(values)).reshape(weight.shape)


def write_file(path, tensors: dict, *, arch=None, metadata: dict = None) -> None:
    """tensors: name -> (data from `encode`, type). arch None: no general.architecture key."""
    writer = GGUFWriter(str(path), arch or "")
    for key, value in (metadata or {}).items():
        if key == "general.alignment":
            writer.add_custom_alignment(value)  # the key, and the writer's padding to match
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_array(key, list(value))
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, (data, qtype) in tensors.items():
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
