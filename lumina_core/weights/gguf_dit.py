"""DiTs in GGUF files, in city96/ComfyUI-GGUF's conventions (SPEC.md §10): reading them into a model with the linear
weights kept quantized, and writing one from any DiT checkpoint.

Conventions: the original state-dict names (possibly under `model.diffusion_model.`, found like any layout's
prefix); `general.architecture` "lumina2" for Lumina-Image-2.0, or none at all (stable-diffusion.cpp's files) or
"pig" (calcuis' files), the family then told by the keys, as for every other format. Written files: 1-D tensors and
tensors of at most 1024 values in F32; the embedders, the final layer and Lumina 2's context and noise refiners in
F16 (BF16 when the source is bf16), as city96's llama.cpp patch leaves them; every other matrix in the chosen type
(F16 for a row that is not whole blocks). Lumina-T2I and Lumina-Next have no architecture name in that ecosystem and
are written without one.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable, Optional

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from ..dtypes import dtype_name
from .dit_files import DiTFile, gguf_compute_dtype
from .gguf_file import GGUFFile
from .gguf_quants import block_layout, is_quantized, qtype_of
from .gguf_write import write_gguf
from .layouts import CheckpointError
from .quantized import GGUF_OPERATIONS, quantized_bytes, share_workspace

Q = GGMLQuantizationType
# general.architecture values of DiT files this pack reads (None: the key is absent).
DIT_ARCHITECTURES = (None, "lumina2", "pig")
# What other architectures are, for the error message (city96's lists).
_IMAGE_ARCHITECTURES = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "qwen_image"}
_TEXT_ARCHITECTURES = {"llama", "gemma", "gemma2", "gemma3", "t5", "t5encoder", "qwen2vl", "qwen3", "qwen3vl", "clip"}

# What `python -m lumina_core convert ... x.gguf --dtype` writes.
GGUF_WRITE_TYPES = {"q8_0": Q.Q8_0, "q5_1": Q.Q5_1, "q5_0": Q.Q5_0, "q4_1": Q.Q4_1, "q4_0": Q.Q4_0,
                    "bf16": Q.BF16, "fp16": Q.F16, "fp32": Q.F32}
QUANTIZATION_THRESHOLD = 1024  # tensors of at most this many values stay F32
# Module-key prefixes left unquantized (the embedders, the final layer, Lumina 2's refiners).
UNQUANTIZED_PREFIXES = ("t_embedder.", "x_embedder.", "cap_embedder.", "final_layer.", "context_refiner.",
                        "noise_refiner.")
# general.architecture of a written file, by family (absent: none written).
WRITE_ARCHITECTURE = {"lumina2": "lumina2"}

logger = logging.getLogger(__name__)


def check_dit_gguf(src: GGUFFile, wanted: str) -> None:
    """Refuse a GGUF that is not a DiT file this pack reads (another architecture, a tensor type it cannot
    dequantize), naming the file and what it is; `wanted` names the model expected ("a Lumina-T2I Flag-DiT")."""
    arch = src.architecture
    if arch not in DIT_ARCHITECTURES:
        if arch in _TEXT_ARCHITECTURES:
            what = f"a {arch!r} language model (a text encoder), not {wanted}; load it with the text encoder loader"
        elif arch in _IMAGE_ARCHITECTURES:
            what = (f"a {arch!r} diffusion model, not {wanted}; load it with ComfyUI-GGUF's Unet Loader (GGUF) or the "
                    f"loader made for that model")
        else:
            what = f"of the unknown architecture {arch!r}, not {wanted}"
        readable = ", ".join(repr(a) if a else "none" for a in DIT_ARCHITECTURES)
        raise CheckpointError(f"{src.path} is a GGUF {what} (DiT files have general.architecture {readable})")
    src.check_supported()


def describe(src: GGUFFile) -> str:
    """'GGUF lumina2: Q8_0 x 120, F32 x 210, F16 x 32' for the log line."""
    counts = ", ".join(f"{name} x {n}" for name, n in sorted(src.qtype_counts().items(), key=lambda kv: -kv[1]))
    return f"GGUF {src.architecture or 'without architecture'}: {counts}"


def load_gguf_state(model: torch.nn.Module, source, dtype: torch.dtype, device) -> int:
    """Fill `model` (built on the meta device) from the GGUF `source` (a DiTFile over a GGUFFile); returns the number
    of weights kept quantized.

    The weight of a layer that can hold blocks (`load_quantized`: GGUFLinear, or the nodes' ComfyUI layer) keeps its
    file form: quantized blocks as they are, F16/BF16 matrices as stored (the layer casts them per forward), F32 in
    `dtype`. Every other tensor (norms, biases, tokens, the weights of plain layers) is dequantized at load into
    `dtype`. Key checks and messages as for any checkpoint.
    """
    src: GGUFFile = source.src
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source.check_keys(expected)
    for key, shape in expected.items():
        if key in source.file_key and source.shape(key) != shape:
            raise CheckpointError(f"{source.path}: {source.file_key[key]} has shape {source.shape(key)}, expected "
                                  f"{shape}")
    modules = dict(model.named_modules())

    def kept_as_blocks(key: str, shape) -> bool:
        owner, _, name = key.rpartition(".")
        file_key = source.file_key.get(key)
        whole = file_key is not None and key not in source.joined and src.stored_shape(file_key) == shape
        return name == "weight" and whole and hasattr(modules.get(owner), "load_quantized")

    # On the CPU the blocks kept are read into one buffer (GGUFFile.raw_together).
    together = [source.file_key[k] for k, s in expected.items() if kept_as_blocks(k, s)
                and src.is_quantized(source.file_key[k])]
    blocks = src.raw_together(together) if torch.device(device).type == "cpu" else {}
    state, quantized = {}, []
    for key, shape in expected.items():
        owner = key.rpartition(".")[0]
        layer = modules.get(owner)
        file_key = source.file_key.get(key)
        if kept_as_blocks(key, shape):
            if src.is_quantized(file_key):
                raw = blocks[file_key] if file_key in blocks else src.raw(file_key).to(device)
                layer.load_quantized(raw, src.qtype(file_key), shape)
                quantized.append(key)
                continue
            if src.dtype(file_key) in (torch.float16, torch.bfloat16):
                state[key] = src.get(file_key).to(device)
                continue
        state[key] = source.get(key).to(device=device, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != set(quantized) or unexpected:
        raise CheckpointError(f"{source.path}: the model did not take the tensors read (missing "
                              f"{sorted(set(missing) - set(quantized))[:5]}, unexpected {unexpected[:5]})")
    share_workspace(model)
    return len(quantized)


# --------------------------------------------------------------------------------------------------------------
# Writing


def gguf_write_type(name: str) -> GGMLQuantizationType:
    try:
        return GGUF_WRITE_TYPES[name.lower()]
    except KeyError:
        raise ValueError(f"GGUF files are written as {', '.join(GGUF_WRITE_TYPES)}; got {name!r}") from None


def tensor_type(key: str, shape: tuple, qtype: GGMLQuantizationType, float_type: GGMLQuantizationType):
    """The GGUF type a DiT tensor is written in (the conventions in the module docstring)."""
    if len(shape) <= 1 or math.prod(shape) <= QUANTIZATION_THRESHOLD or qtype == Q.F32:
        return Q.F32
    if not is_quantized(qtype):
        return qtype
    if key.startswith(UNQUANTIZED_PREFIXES) or shape[-1] % block_layout(qtype)[0]:
        return float_type
    return qtype


def _encode(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    data = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def write_dit_gguf(source, dst_path, expected: dict, qtype, family: str,
                   progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Write the tensors of `source` (a DiTFile) named by `expected` ({module key: shape}) as a GGUF DiT file of
    `qtype` (a GGMLQuantizationType or a GGUF_WRITE_TYPES name), tensor by tensor; returns {type name: count}."""
    qtype = gguf_write_type(qtype) if isinstance(qtype, str) else qtype_of(qtype)
    src_dtypes = {source.src.dtype(f) for f in source.file_key.values()}
    float_type = Q.BF16 if src_dtypes == {torch.bfloat16} or qtype == Q.BF16 else Q.F16
    infos = {key: (shape, tensor_type(key, shape, qtype, float_type)) for key, shape in expected.items()}
    counts: dict[str, int] = {}
    for _shape, t in infos.values():
        counts[t.name] = counts.get(t.name, 0) + 1
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}", None)
    metadata = [("general.quantization_version", gguf.GGML_QUANT_VERSION)]
    if file_type is not None:
        metadata.append(("general.file_type", int(file_type)))
    write_gguf(dst_path, infos, lambda key: _encode(source.get(key), infos[key][1]),
               arch=WRITE_ARCHITECTURE.get(family), metadata=metadata, progress=progress)
    return counts


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_gguf_weights(model: torch.nn.Module, path, *, dtype: Optional[torch.dtype], device="cpu",
                      families: Optional[Iterable[str]] = None) -> torch.nn.Module:
    """Fill `model`, a DiT built on the meta device with any `operations`, from the GGUF DiT at `path`: the weights
    of layers that can hold GGUF blocks (`load_quantized`) stay quantized, the rest is dequantized into the compute
    dtype (`gguf_compute_dtype`), which `model.compute_dtype` records. ComfyUI's loader builds its MODEL with its
    own layers and fills it with this."""
    start = time.perf_counter()
    source = path if isinstance(path, DiTFile) else DiTFile(path, families)
    compute = gguf_compute_dtype(dtype, device)
    parameters = sum(p.numel() for p in model.parameters())
    kept = load_gguf_state(model, source, compute, device)
    model.requires_grad_(False).eval()
    model.compute_dtype = compute
    config = source.config
    logger.info(
        "Loaded %s (%s, %s) from %s: %.2fB parameters in %.1f MB (%d matrices kept quantized), dim %d, %d layers, "
        "%d/%d heads, computed in %s on %s in %.1f s",
        source.layout.title,
        source.layout.description,
        describe(source.src),
        source.path,
        parameters / 1e9,
        quantized_bytes(model) / 2**20,
        kept,
        config.dim,
        config.n_layers,
        config.n_heads,
        config.kv_heads,
        dtype_name(compute),
        device,
        time.perf_counter() - start,
    )
    return model


def load_gguf_dit(source: DiTFile, *, dtype, device, operations=None) -> torch.nn.Module:
    """The DiT of a GGUF `DiTFile` (`load_dit_file`'s path for GGUF files): built with GGUF-capable linear layers
    (or `operations`) and filled by `load_gguf_weights`."""
    compute = gguf_compute_dtype(dtype, device)
    model = source.build(dtype=compute, operations=GGUF_OPERATIONS if operations is None else operations)
    return load_gguf_weights(model, source, dtype=dtype, device=device)
