"""Reading GGUF files (SPEC.md §10) without memory maps, lazily (`gguf_write` writes them).

Layout: "GGUF", version (2 or 3), tensor count, key/value count; the key/value metadata; one info per tensor (name,
dimensions innermost first, type, offset); padding to `general.alignment` (default 32); the tensor data, each tensor
at an aligned offset. `GGUFFile` parses the header with one buffered pass and keeps of each metadata value only where
it lies when it is a large array (a 256k-token vocabulary: skipped in a fraction of a second, decoded only when asked
for, where `gguf.GGUFReader` spends about a minute). Tensors are read with positioned reads into fresh buffers, as
`SafetensorsFile` does, so nothing stays resident after a tensor has been used.

The tensor interface is the one the loaders use on safetensors (`keys`, `shape` in torch order, `dtype`, `get`,
`read_into`, `metadata`), plus what quantized storage needs (`qtype`, `raw`: the raw blocks as uint8 [rows,
row_bytes]). `comfy.gguf.orig_shape.<name>` metadata (written by city96's converter for reshaped tensors) overrides
a tensor's shape.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .gguf_quants import (
    FLOAT_QTYPES,
    check_supported,
    dequantize_gguf,
    is_quantized,
    raw_shape,
    tensor_bytes,
)
from .tensor_io import WeightsFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."  # + tensor name: the shape a tensor had before it was reshaped to store it
ARCHITECTURE_KEY = "general.architecture"
# Arrays longer than this are not decoded while the header is parsed (tokenizer vocabularies, merges, scores).
EAGER_ARRAY_LIMIT = 1024

V = GGUFValueType
_SCALARS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i", V.FLOAT32: "<f",
    V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}
_NUMPY = {
    V.UINT8: np.uint8, V.INT8: np.int8, V.UINT16: np.uint16, V.INT16: np.int16, V.UINT32: np.uint32,
    V.INT32: np.int32, V.FLOAT32: np.float32, V.BOOL: np.bool_, V.UINT64: np.uint64, V.INT64: np.int64,
    V.FLOAT64: np.float64,
}
_TORCH = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
          GGMLQuantizationType.BF16: torch.bfloat16}


class _Truncated(Exception):
    pass


class _Cursor:
    """Sequential reads of the header through a window of the file (one read per MiB, not one per value)."""

    WINDOW = 1 << 20

    def __init__(self, f, size: int):
        self.f, self.size = f, size
        self.pos = 0  # file offset of the next byte
        self.buf, self.buf_start = b"", 0

    def _window(self, n: int) -> int:
        """Make bytes [pos, pos + n) available; returns their offset in the buffer."""
        at = self.pos - self.buf_start
        if at + n <= len(self.buf):
            return at
        if self.pos + n > self.size:
            raise _Truncated
        self.f.seek(self.pos)
        self.buf, self.buf_start = self.f.read(max(n, self.WINDOW)), self.pos
        if len(self.buf) < n:
            raise _Truncated
        return 0

    def take(self, n: int) -> bytes:
        at = self._window(n)
        self.pos += n
        return self.buf[at:at + n]

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        at = self._window(size)
        self.pos += size
        return struct.unpack_from(fmt, self.buf, at)[0]

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Truncated
        self.pos += n

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.size:
            raise _Truncated
        return self.take(n).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        self.skip(self.unpack("<Q"))


class LazyArray:
    """A metadata array left undecoded while the header was parsed; `GGUFFile.value(key)` decodes it."""

    def __init__(self, item_type: GGUFValueType, count: int, offset: int):
        self.item_type, self.count, self.offset = item_type, count, offset

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"<GGUF array of {self.count} {self.item_type.name.lower()}, not read>"


def _value_type(raw: int) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise ValueError(f"unknown metadata value type {raw}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, eager: bool = True) -> Any:
    if vtype in _SCALARS:
        return cur.unpack(_SCALARS[vtype])
    if vtype == V.STRING:
        return cur.string()
    if vtype != V.ARRAY:
        raise ValueError(f"unknown metadata value type {vtype}")
    item_type = _value_type(cur.unpack("<I"))
    count = cur.unpack("<Q")
    if not eager and count > EAGER_ARRAY_LIMIT:
        lazy = LazyArray(item_type, count, cur.pos)
        _skip_items(cur, item_type, count)
        return lazy
    if item_type in _NUMPY:
        size = np.dtype(_NUMPY[item_type]).itemsize
        if count * size > cur.size:
            raise _Truncated
        return np.frombuffer(cur.take(count * size), dtype=_NUMPY[item_type]).tolist()
    return [_read_value(cur, item_type) for _ in range(count)]


def _skip_items(cur: _Cursor, item_type: GGUFValueType, count: int) -> None:
    if item_type in _NUMPY:
        cur.skip(count * np.dtype(_NUMPY[item_type]).itemsize)
    elif item_type == V.STRING:
        for _ in range(count):
            cur.skip_string()
    else:
        for _ in range(count):
            _read_value(cur, item_type, eager=False)


class GGUFFile:
    """A GGUF file: its metadata, and its tensors read one at a time.

    Refused with `error` (the file named, and the problem): a file that is not GGUF or is empty or a Git LFS pointer,
    an unsupported version or byte order, a header or tensor data cut short, an unknown tensor type.
    """

    def __init__(self, path, error=WeightsFileError):
        self.path = Path(path)
        self.error = error
        size = self.path.stat().st_size
        fix = "The file is probably truncated or corrupted (an interrupted download?): download it again."
        with open(self.path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise error(f"{self.path}: it is empty (0 bytes): the download or copy did not finish; get it again")
            if head.startswith(b"version "):
                raise error(f"{self.path}: it is a Git LFS pointer, not the weights: run `git lfs pull` in its "
                            f"folder (or download the file itself)")
            if head[:4] != MAGIC:
                raise error(f"{self.path} is not a GGUF file (it does not start with 'GGUF')")
            cur = _Cursor(f, size)
            cur.skip(4)
            try:
                self.version = cur.unpack("<I")
                if self.version not in VERSIONS:
                    swapped = struct.unpack(">I", struct.pack("<I", self.version))[0]
                    if swapped in VERSIONS:
                        raise error(f"{self.path} is a big-endian GGUF, which this loader does not read; use a "
                                    f"little-endian file (the usual kind)")
                    raise error(f"{self.path} is GGUF version {self.version}; versions {VERSIONS} are read")
                n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
                self._fields: dict[str, Any] = {}
                for _ in range(n_kv):
                    key = cur.string()
                    self._fields[key] = _read_value(cur, _value_type(cur.unpack("<I")), eager=False)
                infos = []
                for _ in range(n_tensors):
                    name = cur.string()
                    n_dims = cur.unpack("<I")
                    if n_dims > 8:
                        raise ValueError(f"tensor {name!r} claims {n_dims} dimensions")
                    dims = [cur.unpack("<Q") for _ in range(n_dims)]
                    infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
            except _Truncated:
                raise error(f"{self.path} ends inside its header ({size} bytes). {fix}") from None
            except (ValueError, UnicodeDecodeError) as err:
                raise error(f"{self.path} has an unreadable GGUF header ({err}). {fix}") from None
        self.alignment = int(self._fields.get("general.alignment", DEFAULT_ALIGNMENT))
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise error(f"{self.path}: general.alignment {self.alignment} is not a power of two. {fix}")
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self._tensors: dict[str, tuple] = {}
        for name, dims, type_id, offset in infos:
            stored = tuple(int(d) for d in reversed(dims))  # torch order: outermost first
            try:
                qtype = GGMLQuantizationType(type_id)
                GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise error(f"{self.path}: tensor {name!r} has type id {type_id}, which is no known GGUF tensor type "
                            f"(shape {stored}); the file is damaged or of a newer format") from None
            try:
                nbytes = tensor_bytes(qtype, stored)
            except ValueError as err:
                raise error(f"{self.path}: tensor {name!r} of shape {stored}: {err}. {fix}") from None
            start = self.data_offset + offset
            if offset % self.alignment:
                raise error(f"{self.path}: tensor {name!r} starts at unaligned offset {offset}. {fix}")
            if start + nbytes > size:
                raise error(f"{self.path} is truncated: tensor {name!r} ends at byte {start + nbytes} but the file "
                            f"has {size} bytes. Download it again.")
            if name in self._tensors:
                raise error(f"{self.path} holds two tensors named {name!r}. {fix}")
            self._tensors[name] = (qtype, stored, start, nbytes)
        self.keys = list(self._tensors)

    # Metadata

    @property
    def architecture(self) -> Optional[str]:
        """`general.architecture`, or None when the file has none (stable-diffusion.cpp's DiT files)."""
        arch = self._fields.get(ARCHITECTURE_KEY)
        return arch if isinstance(arch, str) else None

    def metadata(self) -> dict:
        """Every key/value: numbers, strings, small arrays as lists, large arrays as `LazyArray` (see `value`)."""
        return dict(self._fields)

    def value(self, key: str, default=None):
        """A metadata value, arrays of any size decoded (a list; strings for a string array)."""
        value = self._fields.get(key, default)
        if not isinstance(value, LazyArray):
            return value
        with open(self.path, "rb") as f:
            cur = _Cursor(f, self.path.stat().st_size)
            cur.pos = value.offset
            try:
                if value.item_type in _NUMPY:
                    size = np.dtype(_NUMPY[value.item_type]).itemsize
                    return np.frombuffer(cur.take(value.count * size), dtype=_NUMPY[value.item_type]).tolist()
                return [_read_value(cur, value.item_type) for _ in range(value.count)]
            except _Truncated:
                raise self.error(f"{self.path} ends inside the metadata value {key!r}; download it again") from None

    # Tensors

    def qtype(self, key: str) -> GGMLQuantizationType:
        return self._tensors[key][0]

    def is_quantized(self, key: str) -> bool:
        return is_quantized(self._tensors[key][0])

    def stored_shape(self, key: str) -> tuple:
        """The shape the tensor is stored in (torch order), before any `comfy.gguf.orig_shape` override."""
        return self._tensors[key][1]

    def shape(self, key: str) -> tuple:
        """The tensor's shape in torch order (the GGUF dims reversed), or its `comfy.gguf.orig_shape` when given."""
        orig = self._fields.get(ORIG_SHAPE_KEY + key)
        if orig is None:
            return self._tensors[key][1]
        shape = tuple(int(d) for d in orig)
        if math.prod(shape) != math.prod(self._tensors[key][1]):
            raise self.error(f"{self.path}: {ORIG_SHAPE_KEY}{key} is {shape}, which does not hold the "
                             f"{math.prod(self._tensors[key][1])} values stored for {key!r}")
        return shape

    def dtype(self, key: str) -> torch.dtype:
        """The dtype `get` returns: the stored one for F32/F16/BF16, float32 for quantized types."""
        return _TORCH.get(self._tensors[key][0], torch.float32)

    def nbytes(self, key: str) -> int:
        return self._tensors[key][3]

    def offset(self, key: str) -> int:
        """The file offset of the tensor's first byte."""
        return self._tensors[key][2]

    @property
    def tensor_bytes(self) -> int:
        """The bytes of all tensors (without padding)."""
        return sum(entry[3] for entry in self._tensors.values())

    def qtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for qtype, *_ in self._tensors.values():
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        return counts

    def check_supported(self) -> None:
        """Refuse the file when a tensor has a type `dequantize_gguf` does not read, naming it and the types read."""
        for key, (qtype, *_rest) in self._tensors.items():
            try:
                check_supported(qtype, f"tensor {key!r}")
            except ValueError as err:
                raise self.error(f"{self.path}: {err}") from None

    def raw(self, key: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tensor's bytes, fresh (not a view of the file), as uint8 of `raw_shape`: the stored rows, the last
        dimension in bytes (whole blocks). out: a contiguous uint8 CPU tensor of the tensor's size to read into."""
        qtype, stored, start, nbytes = self._tensors[key]
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out.view(-1)
        if buf.numel() != nbytes or buf.dtype != torch.uint8:
            raise ValueError(f"raw: {key!r} has {nbytes} bytes, `out` holds {buf.numel()} of {buf.dtype}")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(start)
            view = memoryview(buf.numpy())
            got = 0
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise self.error(f"{self.path} ended while reading {key!r}: the file is truncated")
                got += n
        return buf.view(raw_shape(qtype, stored))

    def raw_together(self, keys) -> dict[str, torch.Tensor]:
        """The raw bytes of several tensors (as `raw`), read into one buffer, each a view of it.

        A model's blocks are then one allocation, which the system takes back at once when the model is freed.
        Read one by one, hundreds of blocks of 10-30 MB land in the C heap between smaller allocations; freed, they
        stayed resident as holes that later allocations did not fit (measured: a Q8_0 Flag-DiT loaded after a
        freed Q4_K_M LLaMA peaked 0.9 GB higher than in a fresh process)."""
        keys = sorted(keys, key=self.offset)
        aligned = [-(-self.nbytes(k) // 64) * 64 for k in keys]  # each view starts 64-byte aligned
        arena = torch.empty(sum(aligned), dtype=torch.uint8)
        views, at = {}, 0
        for key, size in zip(keys, aligned):
            views[key] = self.raw(key, out=arena[at:at + self.nbytes(key)])
            at += size
        return views

    def get(self, key: str) -> torch.Tensor:
        """The tensor in its shape: F32/F16/BF16 as stored, quantized types dequantized to float32."""
        qtype = self._tensors[key][0]
        if qtype in FLOAT_QTYPES:
            return self.raw(key).view(-1).view(_TORCH[qtype]).view(self.shape(key))
        try:
            return dequantize_gguf(self.raw(key), qtype, self._tensors[key][1]).view(self.shape(key))
        except ValueError as err:
            raise self.error(f"{self.path}: {key!r}: {err}") from None

    def read_into(self, key: str, out: torch.Tensor, chunk_bytes: int = 0) -> torch.Tensor:
        """Fill `out` (the tensor's shape, any dtype) with the tensor's values. chunk_bytes: the signature of
        `SafetensorsFile.read_into`; a GGUF tensor is read and dequantized whole."""
        if tuple(out.shape) != self.shape(key):
            raise ValueError(f"read_into: {key!r} has shape {self.shape(key)}, got a tensor of shape "
                             f"{tuple(out.shape)}")
        out.copy_(self.get(key))
        return out
