"""GGUF tensor types in torch: block sizes, and dequantization of the 13 types the loaders read.

A quantized GGUF tensor is a run of blocks along each row (the last, input dimension; SPEC.md §10): a block of
`block_size` weights is `type_size` bytes holding fp16 scales (and minimums) and packed small integers. Blocks never
cross rows, so a matrix's raw bytes are [rows, row_bytes] and can be split or gathered by rows while still quantized.

`dequantize_gguf` unpacks the blocks on the data's own device, in fp32 (the fp16 scales are converted exactly first),
doing the same float operations in the same order as the reference `gguf.quants.dequantize` of the `gguf` package, so
its results are bit-equal to it; the scaling is done in place on the freshly converted values (the same products
and sums, one fp32 copy of the tensor fewer at a time). bf16 arithmetic is never used (about 10x the error, SPEC.md
§10): a layer casts the finished fp32 weight to its compute dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Union

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # weights per K-quant super-block

Q = GGMLQuantizationType
# Types stored as plain numbers (one weight per element).
FLOAT_QTYPES = (Q.F32, Q.F16, Q.BF16)
QTypeLike = Union[int, str, GGMLQuantizationType]


def qtype_of(qtype: QTypeLike) -> GGMLQuantizationType:
    """The GGMLQuantizationType of a type id, a name ("Q8_0", "q4_k") or a type; a ValueError for others."""
    try:
        if isinstance(qtype, str):
            return GGMLQuantizationType[qtype.upper()]
        return GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError):
        raise ValueError(f"unknown GGUF tensor type {qtype!r}") from None


def block_layout(qtype: QTypeLike) -> tuple[int, int]:
    """(weights per block, bytes per block) of a type."""
    return GGML_QUANT_SIZES[qtype_of(qtype)]


def row_bytes(qtype: QTypeLike, columns: int) -> int:
    """Bytes of one row of `columns` weights; a ValueError when the row is not whole blocks."""
    qtype = qtype_of(qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    if columns % block:
        raise ValueError(f"a row of {columns} weights is not a whole number of {qtype.name} blocks of {block}")
    return columns // block * size


def raw_shape(qtype: QTypeLike, shape) -> tuple:
    """The shape of a tensor's raw bytes (torch order): the rows as they are, the last dimension in bytes."""
    shape = tuple(int(d) for d in shape)
    if not shape:
        shape = (1,)
    return shape[:-1] + (row_bytes(qtype, shape[-1]),)


def tensor_bytes(qtype: QTypeLike, shape) -> int:
    return math.prod(raw_shape(qtype, shape))


# --------------------------------------------------------------------------------------------------------------
# Unpacking. Each function takes blocks [n, type_size] (uint8) and returns the weights [n, block_size] (float32).


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 field at byte `start` of every block, as fp32 [n, 1] (exact)."""
    return blocks[:, start:start + 2].contiguous().view(torch.float16).float()


@functools.lru_cache(maxsize=None)
def _shift_table(values: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device)


def _shifts(*values: int, device) -> torch.Tensor:
    # Made once per device: on a GPU each new one would be a host-to-device copy in every layer's forward.
    return _shift_table(values, torch.device(device))


def _nibbles(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """Packed bytes [n, groups * 32 // 2 ... ] -> 4-bit values: per group of bytes, all the low nibbles, then all
    the high ones (`qs.reshape(n, -1, 1, width) >> [0, 4]`)."""
    n = packed.shape[0]
    width = packed.shape[1] // groups
    shifted = packed.reshape(n, groups, 1, width) >> _shifts(0, 4, device=packed.device).reshape(1, 1, 2, 1)
    return (shifted & 0x0F).reshape(n, groups, 2 * width)


def _bits(packed: torch.Tensor, groups: int, count: int, bits: int) -> torch.Tensor:
    """Packed bytes -> `bits`-bit fields: field j of every byte of a group of bytes, for j in 0..count-1, field-major
    (`x.reshape(n, groups, 1, width) >> [0, bits, 2 * bits, ...]`)."""
    n = packed.shape[0]
    width = packed.shape[1] // groups
    shifts = _shifts(*range(0, count * bits, bits), device=packed.device).reshape(1, 1, count, 1)
    return (packed.reshape(n, groups, 1, width) >> shifts) & ((1 << bits) - 1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    x = b[:, 2:].contiguous().view(torch.int8).float()
    return x.mul_(d)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:], 1).reshape(b.shape[0], -1).to(torch.int8) - 8
    return q.float().mul_(d)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:], 1).reshape(b.shape[0], -1).float()
    return q.mul_(d).add_(m)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """The 32 high bits of a Q5 block, from its 4 bytes read as a little-endian uint32: bit i of byte j is weight
    8 j + i."""
    n = qh.shape[0]
    bits = (qh.reshape(n, 4, 1) >> _shifts(*range(8), device=qh.device).reshape(1, 1, 8)) & 1
    return bits.reshape(n, 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    low = _nibbles(b[:, 6:], 1).reshape(b.shape[0], -1)
    q = (low | (_fifth_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return q.float().mul_(d)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    low = _nibbles(b[:, 8:], 1).reshape(b.shape[0], -1)
    q = (low | (_fifth_bits(b[:, 4:8]) << 4)).float()
    return q.mul_(d).add_(m)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 2, 4, 2).reshape(n, 16, 16).float()
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b, 108)
    low = (scales[:, :8].reshape(n, 1, 8) >> _shifts(0, 4, device=b.device).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, device=b.device).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).to(torch.int8) - 32
    dl = (d * sc.float()).reshape(n, 16, 1)
    ql = _bits(qs, 2, 4, 2).reshape(n, 16, 16)
    # A set bit of the high mask means no offset; a clear one subtracts 4.
    qh = _bits(hmask, 1, 8, 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return q.mul_(dl).reshape(n, QK_K)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and minimums of a Q4_K/Q5_K block from its 12 packed bytes."""
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32).float()
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scales(b[:, 4:16])
    d = (d * sc.float()).reshape(n, 8, 1)
    dm = (dmin * mn.float()).reshape(n, 8, 1)
    ql = _nibbles(b[:, 48:], 4).reshape(n, 8, 32)
    qh = _bits(b[:, 16:48], 1, 8, 1).reshape(n, 8, 32)
    q = (ql | (qh << 4)).float()
    return q.mul_(d).sub_(dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).reshape(n, 16, 1)
    low = _nibbles(ql, 2).reshape(n, 8, 32)
    high = _bits(qh, 2, 4, 2).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return q.mul_(d).reshape(n, QK_K)


_UNPACK = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q2_K: _q2_k,
    Q.Q3_K: _q3_k,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.Q6_K: _q6_k,
}
SUPPORTED_QTYPES = FLOAT_QTYPES + tuple(_UNPACK)


def supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_QTYPES)


def check_supported(qtype: QTypeLike, what: str = "this tensor") -> GGMLQuantizationType:
    """The type, or a ValueError naming it and the supported types."""
    qtype = qtype_of(qtype)
    if qtype not in SUPPORTED_QTYPES:
        raise ValueError(f"{what} is stored as GGUF type {qtype.name}, which this loader does not read; supported "
                         f"types: {supported_names()}. Use a file quantized to one of them.")
    return qtype


def is_quantized(qtype: QTypeLike) -> bool:
    """Whether a type is block-quantized (not F32/F16/BF16)."""
    return qtype_of(qtype) not in FLOAT_QTYPES


def _aligned(flat: torch.Tensor, itemsize: int) -> torch.Tensor:
    # view(dtype) needs the first byte aligned to the new item size.
    return flat if flat.storage_offset() % itemsize == 0 else flat.clone()


def dequantize_gguf(data: torch.Tensor, qtype: QTypeLike, shape) -> torch.Tensor:
    """The float32 weights of a GGUF tensor of type `qtype` and torch-order `shape`, from its raw bytes.

    data: a uint8 tensor (any shape, contiguous) holding exactly the tensor's bytes, on any device; the result is on
    the same device. F32 may return a view of `data`. Bit-equal to `gguf.quants.dequantize`. Types other than F32,
    F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K are refused with a ValueError.
    """
    qtype = check_supported(qtype, "the tensor")
    shape = tuple(int(d) for d in shape)
    if data.dtype != torch.uint8:
        raise ValueError(f"dequantize_gguf takes the raw bytes as a uint8 tensor, got {data.dtype}")
    expected = tensor_bytes(qtype, shape)
    flat = data.contiguous().reshape(-1)
    if flat.numel() != expected:
        raise ValueError(f"a {qtype.name} tensor of shape {shape} has {expected} bytes, got {flat.numel()}")
    if qtype == Q.F32:
        return _aligned(flat, 4).view(torch.float32).reshape(shape)
    if qtype == Q.F16:
        return _aligned(flat, 2).view(torch.float16).float().reshape(shape)
    if qtype == Q.BF16:
        # bf16 is the top half of an fp32: a shift, no arithmetic.
        return (_aligned(flat, 2).view(torch.int16).to(torch.int32) << 16).view(torch.float32).reshape(shape)
    _block, size = GGML_QUANT_SIZES[qtype]
    return _UNPACK[qtype](flat.reshape(-1, size)).reshape(shape)
