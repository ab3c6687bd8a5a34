"""Reading and writing DiT checkpoints of every layout in `lumina_core.weights.layouts`, with one loader.

The configuration comes from the tensor shapes; the model is built on the meta device; every tensor is read on its
own (positioned safetensors reads; a pickle only through `torch.load(weights_only=True)`: a pickle can otherwise
run code), cast to the target dtype as it is read into one packed buffer, and assigned with `assign=True`, so
loading needs about one copy of the weights in the target dtype. An fp8 dtype stores the linear weights in fp8 and
the rest in the compute dtype (`lumina_core.dtypes.compute_dtype_for`), which the model's `compute_dtype` records.
A GGUF file keeps its quantized linear weights as blocks, dequantized per forward (`lumina_core.weights.gguf_dit`).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..dtypes import compute_dtype_for, dtype_name, is_fp8
from .fp8 import CAST_OPERATIONS, storage_dtypes
from .layouts import (
    FLAG_DIT,
    LAYOUTS,
    NEXT_DIT,
    NEXT_DIT_DIFFUSERS,
    CheckpointError,
    describe_foreign,
    find_layout,
    original_to_diffusers,
)
from .tensor_io import (
    DIFFUSERS_WEIGHTS,
    GGUF_SUFFIX,
    INDEX_SUFFIX,
    find_index,
    is_gguf,
    open_tensor_file,
    write_safetensors,
)

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# Small tensors (norms, biases, tokens) of an fp8 file are written in bf16: see lumina_core.weights.fp8.
FP8_FILE_OTHER_DTYPE = torch.bfloat16


def _check_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the file name and folder")
    if path.is_dir():
        if find_index(path) is not None or (path / DIFFUSERS_WEIGHTS).is_file():
            return path  # a sharded checkpoint's folder (diffusers' transformer/), read through its index
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file: choose the .safetensors file inside it (a folder is "
            f"read only when it holds a *{INDEX_SUFFIX} index, as diffusers' transformer/ folder does)"
        )
    if path.name.endswith(INDEX_SUFFIX):
        return path
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; get the file again")
    if path.suffix not in (".safetensors", GGUF_SUFFIX) + PICKLE_SUFFIXES and not is_gguf(path):
        raise CheckpointError(
            f"{path}: unknown checkpoint format {path.suffix!r}; use .safetensors or .gguf (or .pth/.pt/.ckpt, or "
            f"a safetensors index json)"
        )
    return path


class DiTFile:
    """An opened DiT checkpoint: its layout, configuration and which file key holds each module parameter.

    families: the family names the caller accepts (None: any); a file of another family or no DiT at all is refused
    with what it is.
    """

    def __init__(self, path, families: Optional[Iterable[str]] = None):
        self.path = _check_path(path)
        self.src = open_tensor_file(self.path, CheckpointError)
        self.is_gguf = is_gguf(self.path)
        keys = self.src.keys
        wanted = [layout for layout in LAYOUTS if families is None or layout.family in families]
        title = " or ".join(dict.fromkeys(layout.title for layout in wanted))
        if self.is_gguf:
            from .gguf_dit import check_dit_gguf

            check_dit_gguf(self.src, f"a {title}")
        found = find_layout(keys)
        if found is None or found[0] not in wanted:
            foreign = describe_foreign(keys)
            if foreign:
                raise CheckpointError(f"{self.path} is {foreign}, not a {title}")
            raise CheckpointError(
                f"{self.path} is not a {title} checkpoint (first keys: {', '.join(keys[:5])}); load it with the node "
                f"made for its model"
            )
        self.layout, prefix = found
        self.file_key: dict[str, str] = {}  # module key -> file key
        self.copies: dict[str, str] = {}  # file key of a duplicate -> module key
        self.joined: dict[str, list] = {}  # module key -> the file keys of its row blocks, in order
        self.unknown: list[str] = []
        blocks: dict[str, dict] = {}
        for key in keys:
            if not key.startswith(prefix):
                continue  # the other parts of an all-in-one file
            part = self.layout.parts(key[len(prefix):]) if self.layout.parts else None
            if part is not None:
                name, index, count = part
                blocks.setdefault(name, [None] * count)[index] = key
                continue
            name, is_copy = self.layout.rename(key[len(prefix):])
            if name is None:
                self.unknown.append(key[len(prefix):])
            elif is_copy:
                self.copies[key] = name
            else:
                self.file_key[name] = key
        for name, found_blocks in blocks.items():
            if None in found_blocks:
                raise CheckpointError(
                    f"{self.path}: {name} is stored in {len(found_blocks)} row blocks, but only "
                    f"{len(found_blocks) - found_blocks.count(None)} were found ({', '.join(filter(None, found_blocks))})"
                    f"; the file is incomplete: download it again"
                )
            self.joined[name] = found_blocks
            self.file_key[name] = found_blocks[0]
        self.optional = dict(self.layout.optional)
        shapes = {k: self.shape(k) for k in self.file_key}
        self.config = self.layout.config(shapes, str(self.path))

    # The tensors by module key (a joined tensor is read block by block into its rows).

    def shape(self, key: str) -> tuple:
        if key not in self.joined:
            return tuple(self.src.shape(self.file_key[key]))
        shapes = [tuple(self.src.shape(f)) for f in self.joined[key]]
        if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
            raise CheckpointError(f"{self.path}: the blocks of {key} ({', '.join(self.joined[key])}) have shapes "
                                  f"{shapes}, which do not stack into one matrix")
        return (sum(s[0] for s in shapes), shapes[0][1])

    def get(self, key: str) -> torch.Tensor:
        if key not in self.file_key:
            return torch.full(self.expected_shape[key], self.optional[key])
        if key not in self.joined:
            return self.src.get(self.file_key[key])
        return torch.cat([self.src.get(f) for f in self.joined[key]])

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill `out` (the module tensor's shape, any dtype) from the file, cast as read."""
        if key not in self.file_key:
            out.fill_(self.optional[key])
            return
        if key not in self.joined:
            self._read(self.file_key[key], out)
            return
        row = 0
        for f in self.joined[key]:
            rows = self.src.shape(f)[0]
            self._read(f, out[row:row + rows])
            row += rows

    def _read(self, file_key: str, out: torch.Tensor) -> None:
        read_into = getattr(self.src, "read_into", None)
        if read_into is not None:
            read_into(file_key, out)
        else:  # a weights-only pickle, memory-mapped: copy from the mapping
            out.copy_(self.src.get(file_key))

    def check_keys(self, expected: dict) -> None:
        self.expected_shape = expected
        missing = [k for k in expected if k not in self.file_key and k not in self.optional]
        unexpected = sorted(set(self.file_key) - set(expected)) + self.unknown
        if self.layout.copies_of is not None:
            have = set(self.copies.values())
            missing += [d for k in expected for d in self.layout.copies_of(k) if k not in have]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (first: {', '.join(missing[:5])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:5])})")
            raise CheckpointError(
                f"{self.path} looks like a {self.layout.title} ({self.layout.description}) but its keys do not "
                f"match: {'; '.join(parts)}. The file may be incomplete or from a different model version."
            )

    def check_copies(self, state: dict) -> None:
        """Duplicated tensors (diffusers' copies) must equal the ones loaded."""
        for file_key, key in self.copies.items():
            copy = self.src.get(file_key)
            if tuple(copy.shape) != tuple(state[key].shape) or not torch.equal(copy.to(state[key]), state[key]):
                raise CheckpointError(
                    f"{self.path}: {file_key} differs from {self.file_key[key]}. In {self.layout.title} both are "
                    f"the same tensor, so the two must be equal; this file was changed after conversion and "
                    f"cannot be run faithfully."
                )
            del copy

    def build(self, *, dtype=None, operations=None) -> torch.nn.Module:
        with torch.device("meta"):
            return self.layout.model(self.config, operations=operations, dtype=dtype)


_ALIGN = 64  # bytes: every tensor of the packed weights starts on a cache line


def read_weights(source: "DiTFile", expected: dict, dtype, device) -> dict:
    """The tensors of `expected` ({key: shape}) read from the file, cast to `dtype` as they are read (one
    torch.dtype for all, or a dict key -> dtype: fp8 storage keeps norms and biases in the compute dtype).

    With a target dtype the tensors are views into one buffer allocated up front and filled chunk by chunk from the
    file, so the process holds the weights and an 8 MB read buffer, nothing else: reading each tensor whole and
    casting it (as this loader once did) peaked at 1.22-1.32 x the bf16 weights of the 2B model, whose tensors
    are small enough to come from the allocator's heap, where the freed fp32 copies leave holes.
    """
    for key, shape in expected.items():
        if key not in source.file_key:
            continue  # an optional tensor the file leaves out
        found = source.shape(key)
        if found != shape:
            raise CheckpointError(f"{source.path}: {source.file_key[key]} has shape {found}, expected {shape}")
    if dtype is None:
        return {key: source.get(key).to(device) for key in expected}
    dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(expected, dtype)
    offsets, totals = {}, {}
    for key, shape in expected.items():
        target = dtypes[key]
        step = max(1, _ALIGN // torch.empty((), dtype=target).element_size())
        offsets[key] = totals.get(target, 0)
        totals[target] = offsets[key] + -(-math.prod(shape) // step) * step
    packed = {target: torch.empty(total, dtype=target) for target, total in totals.items()}
    state = {}
    for key, shape in expected.items():
        out = packed[dtypes[key]][offsets[key]:offsets[key] + math.prod(shape)].view(shape)
        source.read_into(key, out)
        state[key] = out if torch.device(device).type == "cpu" else out.to(device)
    return state


def load_dit_file(
    path,
    *,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    device="cpu",
    operations=None,
    families: Optional[Iterable[str]] = None,
):
    """Load the DiT at `path` in whichever layout it is (of `families` only, when given).

    dtype None keeps the file's dtype. An fp8 dtype stores the linear weights in fp8 (cast straight from the file's
    dtype, never through bf16) and everything else in the compute dtype, which `model.compute_dtype` records: bf16,
    or fp32 on a CPU without bf16. operations: a namespace of layer classes (ComfyUI passes `comfy.ops`); for fp8
    without one, the core's casting layers are used.

    A GGUF file keeps its quantized matrices as blocks in `GGUFLinear` layers (or the `load_quantized` layers of
    `operations`), dequantized per forward; `dtype` is then the compute dtype (see `gguf_compute_dtype`).
    """
    start = time.perf_counter()
    source = DiTFile(path, families)
    if source.is_gguf:
        from .gguf_dit import load_gguf_dit

        return load_gguf_dit(source, dtype=dtype, device=device, operations=operations)
    config = source.config
    if dtype is None:
        probe = next(iter(source.file_key.values()))
        linear_key = next((f for k, f in source.file_key.items() if k.endswith((".wq.weight", ".qkv.weight"))), probe)
        if is_fp8(source.src.dtype(linear_key)):
            dtype = source.src.dtype(linear_key)
    fp8 = is_fp8(dtype)
    compute_dtype = compute_dtype_for(device) if fp8 else None
    if fp8 and operations is None:
        operations = CAST_OPERATIONS  # fp8 linear weights cast to the compute dtype per layer
    model = source.build(dtype=dtype, operations=operations)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source.check_keys(expected)
    state = read_weights(source, expected, storage_dtypes(model, dtype, compute_dtype) if fp8 else dtype, device)
    source.check_copies(state)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    if fp8:
        model.compute_dtype = compute_dtype
    logger.info(
        "Loaded %s (%s) from %s: %.2fB parameters, dim %d, %d layers, %d/%d heads, %s on %s in %.1f s",
        source.layout.title,
        source.layout.description,
        source.path,
        sum(p.numel() for p in model.parameters()) / 1e9,
        config.dim,
        config.n_layers,
        config.n_heads,
        config.kv_heads,
        dtype_name(dtype) + (f" (computed in {dtype_name(compute_dtype)})" if fp8 else ""),
        device,
        time.perf_counter() - start,
    )
    return model


def gguf_compute_dtype(dtype: Optional[torch.dtype], device) -> torch.dtype:
    """The dtype a GGUF DiT computes in (and holds its dequantized small tensors in): `dtype`; fp32 for None (the
    dequantized values exactly); for an fp8 choice, the dtype fp8 storage would compute in (a GGUF keeps its own
    types)."""
    if dtype is None:
        return torch.float32
    return compute_dtype_for(device) if is_fp8(dtype) else dtype


def read_dit_config(path, families: Optional[Iterable[str]] = None):
    """The configuration of a DiT file, read from its tensor shapes (no weights loaded)."""
    return DiTFile(path, families).config


def save_dit(model: torch.nn.Module, path, *, dtype: Optional[torch.dtype] = None, rename=None, metadata=None):
    """Write a DiT as safetensors under its own parameter names (or rename(key) -> list of names).

    An fp8 dtype applies to the linear weights; the other tensors are written in bf16.
    """
    state = model.state_dict()
    targets = storage_dtypes(model, dtype, FP8_FILE_OTHER_DTYPE) if dtype is not None else {}
    named = [(name, key) for key in state for name in (rename(key) if rename else [key])]
    write_safetensors(
        path,
        ((name, state[key]) for name, key in named),
        shapes={name: (tuple(state[key].shape), targets.get(key, state[key].dtype)) for name, key in named},
        metadata={"format": "pt", **(metadata or {})},
    )


# --------------------------------------------------------------------------------------------------------------
# One family's files (the names the loaders and tests of each family use)

T2I, NEXT = ("lumina_t2i",), ("lumina_next",)


def load_flag_dit(path, *, dtype: Optional[torch.dtype] = torch.bfloat16, device="cpu", operations=None):
    """Load a Lumina-T2I Flag-DiT (see load_dit_file); any other file is refused with what it is."""
    return load_dit_file(path, dtype=dtype, device=device, operations=operations, families=T2I)


def load_next_dit(path, *, dtype: Optional[torch.dtype] = torch.bfloat16, device="cpu", operations=None):
    """Load a Lumina-Next Next-DiT from the original or the diffusers layout (see load_dit_file)."""
    return load_dit_file(path, dtype=dtype, device=device, operations=operations, families=NEXT)


def read_flag_dit_config(path):
    return read_dit_config(path, T2I)


def read_next_dit_config(path):
    return read_dit_config(path, NEXT)


def infer_flag_dit_config(state_dict):
    """The configuration of a Flag-DiT, from the shapes of its (unprefixed) tensors alone: a state dict or any
    mapping from key to an object with `.shape` (or to a shape tuple)."""
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in state_dict.items()}
    return FLAG_DIT.config(shapes, "state dict")


def save_flag_dit(model, path, *, dtype: Optional[torch.dtype] = None):
    """Write a Flag-DiT as safetensors in the released key layout (fp8: linear weights fp8, the rest bf16)."""
    save_dit(model, path, dtype=dtype, metadata={"model": FLAG_DIT.name})


def save_next_dit(model, path, *, layout: str = "original", dtype: Optional[torch.dtype] = None):
    """Write a Next-DiT as safetensors in the original or the diffusers key layout."""
    if layout not in ("original", "diffusers"):
        raise ValueError(f"layout must be 'original' or 'diffusers', got {layout!r}")
    rename = original_to_diffusers if layout == "diffusers" else None
    save_dit(model, path, dtype=dtype, rename=rename,
             metadata={"model": NEXT_DIT_DIFFUSERS.name if rename else NEXT_DIT.name})
