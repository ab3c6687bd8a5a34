"""Reading and writing tensor files without unpickling code and without memory maps.

safetensors files are read tensor by tensor with positioned reads, and written tensor by tensor from a header
computed first, so converting or loading a 20 GB file needs about one tensor of scratch memory. Pickled files are
read only with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path
from typing import Iterator

import torch


class WeightsFileError(ValueError):
    """A weights file that cannot be read, with the file's name and what to do."""


_ST_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _ST_DTYPE_NAMES[getattr(torch, _attr)] = _name
_ST_DTYPES = {name: dtype for dtype, name in _ST_DTYPE_NAMES.items()}
_ST_DTYPES.update({"I16": torch.int16, "I8": torch.int8})


class SafetensorsFile:
    """A safetensors file read tensor by tensor with positioned reads.

    Not memory-mapped on purpose: pages of a mapping that have been read stay resident (and count in the process's
    memory) until the mapping closes, so reading a 20 GB fp32 file through one to build a 10 GB bf16 model peaks
    at about 30 GB; plain reads into a fresh buffer peak at the model plus one tensor.
    """

    def __init__(self, path: Path, error=WeightsFileError):
        self.path = path
        self.error = error
        size = path.stat().st_size
        bad = f"{path} could not be read as safetensors"
        fix = "The file is probably truncated or corrupted (an interrupted download?): download it again."
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise error(f"{path}: it is empty (0 bytes): the download or copy did not finish; get the file again")
            if head.startswith(b"version "):
                raise error(
                    f"{path}: it is a Git LFS pointer, not the weights: run `git lfs pull` in its folder "
                    f"(or download the file itself)"
                )
            if len(head) < 8:
                raise error(f"{bad} (only {size} bytes). {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise error(f"{bad} (its header claims {n} bytes in a {size}-byte file). {fix}")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise error(f"{bad} (the header is not valid JSON: {err}). {fix}") from None
        if not isinstance(header, dict):
            raise error(f"{bad} (the header is not a JSON object). {fix}")
        self._metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        data_len = size - self._base
        self._entries = {}
        for key, info in header.items():
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise error(f"{bad} (unreadable entry for {key!r}: {info!r}). {fix}") from None
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            if end - start != nbytes or start < 0:
                raise error(f"{bad} ({key!r} has inconsistent offsets {start}..{end}). {fix}")
            if end > data_len:
                raise error(
                    f"{path} is truncated: {key!r} ends at byte {self._base + end} but the file has {size} bytes. "
                    f"Download it again."
                )
            self._entries[key] = (dtype, shape, start, end)
        self.keys = list(self._entries)

    def shape(self, key: str) -> tuple:
        return self._entries[key][1]

    def offset(self, key: str) -> int:
        return self._entries[key][2]

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key][0]

    def get(self, key: str) -> torch.Tensor:
        """A fresh tensor (not a view of the file) with the stored dtype and shape."""
        dtype, shape, start, end = self._entries[key]
        buf = torch.empty(end - start, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._base + start)
            view = memoryview(buf.numpy())
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise self.error(f"{self.path} ended while reading {key!r}: the file is truncated")
                got += n
        return buf.view(dtype).view(shape)

    def read_into(self, key: str, out: torch.Tensor, chunk_bytes: int = 8 << 20) -> torch.Tensor:
        """Read a tensor into the contiguous `out` (same shape, any dtype), casting one chunk at a time.

        The scratch memory is one chunk, never a whole copy of the tensor in the stored dtype, so loading an fp32
        file into bf16 allocates nothing but the bf16 tensors themselves.
        """
        dtype, shape, start, end = self._entries[key]
        if tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"read_into: {key!r} has shape {shape}, got a tensor of shape {tuple(out.shape)}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_chunk = max(1, chunk_bytes // itemsize)
        scratch = torch.empty(min(per_chunk, max(1, out.numel())) * itemsize, dtype=torch.uint8)
        flat = out.view(-1)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._base + start)
            done = 0
            while done < flat.numel():
                count = min(per_chunk, flat.numel() - done)
                view = memoryview(scratch.numpy())[: count * itemsize]
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise self.error(f"{self.path} ended while reading {key!r}: the file is truncated")
                    got += n
                flat[done:done + count].copy_(scratch[: count * itemsize].view(dtype))
                done += count
        return out

    def metadata(self) -> dict:
        return dict(self._metadata)


class PickleFile:
    """The tensors of a weights-only pickled checkpoint (.pth/.pt/.ckpt/.bin)."""

    def __init__(self, path: Path, error=WeightsFileError):
        self.path = path
        self._sd = load_pickle_weights_only(path, error)
        self.keys = list(self._sd)

    def shape(self, key: str) -> tuple:
        return tuple(self._sd[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._sd[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._sd[key]

    def metadata(self) -> dict:
        return {}


class ShardedSafetensors:
    """The tensors of a sharded safetensors checkpoint, through its index json (`weight_map`: key -> shard file
    beside the index), with the interface of SafetensorsFile. diffusers and transformers write such folders."""

    def __init__(self, index: Path, error=WeightsFileError):
        self.path = index
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(type(weight_map).__name__)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise error(
                f"{index} is not a readable safetensors index (a JSON object with a weight_map; {err!r}): download "
                f"it again"
            ) from None
        shards: dict[str, SafetensorsFile] = {}
        self._file: dict[str, SafetensorsFile] = {}
        for key, name in weight_map.items():
            if name not in shards:
                shard = index.parent / str(name)
                if not shard.is_file():
                    raise error(f"{index} lists the shard {name}, which is not in {index.parent}: download it")
                shards[name] = SafetensorsFile(shard, error)
            if key not in shards[name].keys:
                raise error(f"{index} places {key!r} in {name}, which does not hold it: the files do not belong "
                            f"together; download the folder again")
            self._file[key] = shards[name]
        self.keys = list(self._file)

    def shape(self, key: str) -> tuple:
        return self._file[key].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self._file[key].dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self._file[key].get(key)

    def read_into(self, key: str, out: torch.Tensor, chunk_bytes: int = 8 << 20) -> torch.Tensor:
        return self._file[key].read_into(key, out, chunk_bytes)

    def metadata(self) -> dict:
        return {}


INDEX_SUFFIX = ".safetensors.index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # the weights of an unsharded diffusers model folder
GGUF_SUFFIX = ".gguf"


def is_gguf(path) -> bool:
    """Whether `path` names a GGUF file (by its extension)."""
    return os.fspath(path).lower().endswith(GGUF_SUFFIX)


def find_index(folder: Path) -> Path | None:
    """The safetensors index json of a folder, or None when it has none (or more than one)."""
    found = sorted(folder.glob("*" + INDEX_SUFFIX))
    return found[0] if len(found) == 1 else None


def open_tensor_file(path: Path, error=WeightsFileError):
    """A SafetensorsFile for .safetensors, a ShardedSafetensors for an index json (or a folder holding one; a
    diffusers model folder), a GGUFFile for .gguf, else a weights-only PickleFile; errors raised as `error`."""
    path = Path(path)
    if path.is_dir():
        index = find_index(path)
        if index is not None:
            return ShardedSafetensors(index, error)
        if (path / DIFFUSERS_WEIGHTS).is_file():
            return SafetensorsFile(path / DIFFUSERS_WEIGHTS, error)
        raise error(
            f"{path} is a folder without a safetensors index (*{INDEX_SUFFIX}) or {DIFFUSERS_WEIGHTS}; choose the "
            f"weights file itself"
        )
    if path.name.endswith(".json"):
        return ShardedSafetensors(path, error)
    if is_gguf(path):
        try:
            from .gguf_file import GGUFFile  # imports the gguf package, needed for these files only
        except ImportError as err:
            raise error(
                f"{path} is a GGUF file, and reading GGUF files needs the `gguf` package, which this Python lacks "
                f"({err}): `pip install gguf` (inside ComfyUI: in ComfyUI's Python, as the pack's requirements.txt "
                f"lists it)"
            ) from None
        return GGUFFile(path, error)
    return SafetensorsFile(path, error) if path.suffix == ".safetensors" else PickleFile(path, error)


def load_pickle_weights_only(path: Path, error=WeightsFileError) -> dict:
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            # Old (non-zip) serialisation cannot be memory-mapped; read it normally, still weights-only.
            if "mmap" not in str(err):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise error(
            f"refused to load {path}: it holds Python objects that would run code when unpickled, so it is not a "
            f"plain weights file ({str(err).splitlines()[0]}). Use a .safetensors copy of the model from a source "
            f"you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise error(
            f"{path} could not be read as a PyTorch checkpoint ({err}). The file is probably truncated or corrupted: "
            f"download it again, or use a .safetensors copy."
        ) from None
    # Training checkpoints nest the weights one level down.
    for wrapper in ("state_dict", "model", "module", "ema"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            if not any(isinstance(v, torch.Tensor) for v in obj.values()):
                obj = obj[wrapper]
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise error(f"{path} holds no tensors (found {type(obj).__name__}); it is not a model checkpoint")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def write_safetensors(path, tensors: Iterator, *, shapes: dict, metadata: dict):
    """Stream tensors into a safetensors file one at a time (the header is computed from the shapes first).

    The file is written beside its destination and renamed at the end, so an interrupted write never leaves a
    half-written file under the final name.
    """
    path = Path(path)
    header = {}
    offset = 0
    for key, (shape, dtype) in shapes.items():
        if dtype not in _ST_DTYPE_NAMES:
            raise WeightsFileError(f"cannot store {key} of dtype {dtype} in safetensors here")
        nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _ST_DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for key, tensor in tensors:
                shape, dtype = shapes[key]
                tensor = tensor.detach().to("cpu", dtype).contiguous()
                if tuple(tensor.shape) != tuple(shape):
                    raise WeightsFileError(f"{key}: shape {tuple(tensor.shape)} differs from the header {shape}")
                f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


