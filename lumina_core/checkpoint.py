"""Reading, checking, writing and converting Flag-DiT checkpoints.

The released Lumina-T2I file is one 20.2 GB fp32 safetensors file. It is read tensor by tensor, each tensor cast to
the target dtype as it is read, into a model built on the meta device (`assign=True`), so loading needs about one
copy of the weights in the target dtype. Pickled checkpoints are read only with
`torch.load(weights_only=True)`: a pickle can otherwise run code.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .casting import CAST_OPERATIONS, DTYPES, fp8_compute_dtype, is_fp8, storage_dtypes
from .config import FlagDiTConfig
from .model import FlagDiT
from .tensor_io import WeightsFileError, open_tensor_file, write_safetensors

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "module.")
_ANCHOR = "x_embedder.weight"

__all__ = ["DTYPES", "CheckpointError", "convert_checkpoint", "load_flag_dit", "read_flag_dit_config", "save_flag_dit"]
# Small tensors (norms, biases, tokens) of an fp8 file are written in bf16: see lumina_core.casting.
FP8_FILE_OTHER_DTYPE = torch.bfloat16


class CheckpointError(WeightsFileError):
    """A checkpoint that cannot be used, with what was found and what to do instead."""


# --------------------------------------------------------------------------------------------------------------
# Reading tensors without unpickling code


def _check_path(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: check the file name and folder")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file: choose the .safetensors file inside it "
            f"(for Lumina-T2I, consolidated.00-of-01.safetensors or its bf16 conversion)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; get the file again")
    if path.suffix not in (".safetensors",) + PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {path.suffix!r}; use .safetensors (or .pth/.pt/.ckpt)"
        )
    return path


# --------------------------------------------------------------------------------------------------------------
# Recognising what a checkpoint is


def _describe_foreign(keys: list[str]) -> Optional[str]:
    """Name the architecture of a checkpoint that is not a Lumina-T2I Flag-DiT, with the loader to use instead."""
    joined = "\n".join(keys)

    def has(pattern: str) -> bool:
        return re.search(pattern, joined, flags=re.MULTILINE) is not None

    if has(r"(^|\.)(noise_refiner|context_refiner)\."):
        return (
            "a Lumina-Image-2.0 (NextDiT) transformer; ComfyUI loads it natively with its Load Diffusion Model "
            "(UNETLoader) node"
        )
    if has(r"(^|\.)layers\.\d+\.attention_norm1\.") or has(r"(^|\.)layers\.\d+\.ffn_norm2\."):
        return (
            "a Lumina-Next (Next-DiT) transformer; load it with the Lumina Load DiT node "
            "(lumina_core.checkpoint.load_dit)"
        )
    if has(r"(^|\.)(input_blocks|output_blocks|middle_block)\.") or has(r"(^|\.)down_blocks\.\d+\.resnets"):
        return (
            "a Stable Diffusion / SDXL UNet; load it with ComfyUI's Load Checkpoint or Load Diffusion Model node"
        )
    if has(r"(^|\.)(double_blocks|single_blocks)\."):
        return "a Flux transformer; load it with ComfyUI's Load Diffusion Model node"
    if has(r"(^|\.)joint_blocks\."):
        return "a Stable Diffusion 3 transformer; load it with ComfyUI's Load Diffusion Model node"
    if has(r"(^|\.)(embed_tokens|self_attn\.q_proj)"):
        return (
            "a language model (LLaMA-style) checkpoint; put the whole Hugging Face folder of LLaMA-2-7B in "
            "models/text_encoders and load it with the Lumina Load LLaMA Text Encoder node"
        )
    if has(r"(^|\.)(encoder\.down|decoder\.up)\.\d+"):
        return "a VAE; load it with ComfyUI's Load VAE node"
    return None


def _find_prefix(keys: Iterable[str]) -> Optional[str]:
    for key in keys:
        if key.endswith(_ANCHOR):
            prefix = key[: -len(_ANCHOR)]
            if prefix == "" or re.fullmatch(r"((model|module|diffusion_model|_orig_mod|net)\.)+", prefix):
                return prefix
    return None


def infer_flag_dit_config(state_dict) -> FlagDiTConfig:
    """The configuration of a Flag-DiT, from the shapes of its (unprefixed) tensors alone.

    Accepts a state dict or any mapping from key to an object with `.shape` (or to a shape tuple).
    """
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in state_dict.items()}
    return _config_from_shapes(shapes, source="state dict")


def _config_from_shapes(shapes: dict, source: str) -> FlagDiTConfig:
    required = ("x_embedder.weight", "final_layer.linear.weight", "cap_embedder.1.weight", "layers.0.attention.gate")
    missing = [k for k in required if k not in shapes]
    if missing:
        foreign = _describe_foreign(list(shapes))
        if foreign:
            raise CheckpointError(f"{source} is {foreign}, not a Lumina-T2I Flag-DiT")
        raise CheckpointError(
            f"{source} is not a Lumina-T2I Flag-DiT: it lacks {', '.join(missing)} "
            f"(first keys found: {', '.join(list(shapes)[:5])})"
        )
    dim, patch_in = shapes["x_embedder.weight"]
    out_rows = shapes["final_layer.linear.weight"][0]
    in_channels = 4  # SDXL-VAE latents; the patch size follows from it
    patch_size = int(round((patch_in / in_channels) ** 0.5))
    if patch_size < 1 or patch_size**2 * in_channels != patch_in:
        raise CheckpointError(f"{source}: x_embedder input width {patch_in} is not 4 channels x a square patch")
    learn_sigma = out_rows == 2 * patch_in
    if not learn_sigma and out_rows != patch_in:
        raise CheckpointError(f"{source}: final_layer.linear has {out_rows} outputs for {patch_in} inputs per patch")
    n_layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k)))
    n_heads = shapes["layers.0.attention.gate"][0]
    head_dim = dim // n_heads
    kv_heads = shapes["layers.0.attention.wk.weight"][0] // head_dim
    cap_feat_dim = shapes["cap_embedder.1.weight"][1]
    hidden = shapes["layers.0.feed_forward.w1.weight"][0]
    multiple_of, multiplier = _ffn_params(dim, hidden)
    try:
        return FlagDiTConfig(
            patch_size=patch_size,
            in_channels=in_channels,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=None if kv_heads == n_heads else kv_heads,
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            learn_sigma=learn_sigma,
            qk_norm="layers.0.attention.q_norm.weight" in shapes,
            cap_feat_dim=cap_feat_dim,
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: inconsistent Flag-DiT shapes ({err})") from None


def _ffn_params(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) that reproduce an FFN width; the released rule (256, None) first."""
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if FlagDiTConfig(dim=dim, n_heads=1, multiple_of=multiple_of).ffn_hidden_dim == hidden:
            return multiple_of, None
    base = int(2 * (4 * dim) / 3)
    for multiplier in (hidden / base, (hidden + 0.5) / base):
        if int(multiplier * base) == hidden:
            return 1, multiplier
    raise CheckpointError(f"cannot express FFN width {hidden} for dim {dim}")


# --------------------------------------------------------------------------------------------------------------
# Loading and saving


def _open_flag_dit(path):
    path = _check_path(path)
    src = open_tensor_file(path, CheckpointError)
    prefix = _find_prefix(src.keys)
    if prefix is None:
        foreign = _describe_foreign(src.keys)
        if foreign:
            raise CheckpointError(f"{path} is {foreign}, not a Lumina-T2I Flag-DiT")
        raise CheckpointError(
            f"{path} is not a Lumina-T2I Flag-DiT (it has no x_embedder.weight; first keys: "
            f"{', '.join(src.keys[:5])}); load it with the node made for its model"
        )
    shapes = {k[len(prefix):]: src.shape(k) for k in src.keys if k.startswith(prefix)}
    foreign = _describe_foreign(list(shapes))
    if foreign:
        raise CheckpointError(f"{path} is {foreign}, not a Lumina-T2I Flag-DiT")
    config = _config_from_shapes(shapes, source=str(path))
    return src, prefix, config


def _check_keys(path, expected: dict, found: Iterable[str]):
    found = set(found)
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first: {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:5])})")
        raise CheckpointError(
            f"{path} looks like a Flag-DiT but its keys do not match the Lumina-T2I layout: {'; '.join(parts)}. "
            f"The file may be incomplete or from a different model version."
        )


def load_flag_dit(
    path,
    *,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    device="cpu",
    operations=None,
) -> FlagDiT:
    """Load a Lumina-T2I Flag-DiT from .safetensors (positioned reads) or a weights-only pickle.

    dtype None keeps the file's dtype. An fp8 dtype stores the linear weights in fp8 (cast straight from the file's
    dtype, never through bf16) and everything else in the compute dtype, which `model.compute_dtype` records: bf16,
    or fp32 on a CPU without bf16. operations: a namespace of layer classes (ComfyUI passes `comfy.ops`); for fp8
    without one, the core's casting layers are used.
    """
    start = time.perf_counter()
    src, prefix, config = _open_flag_dit(path)
    if dtype is None and is_fp8(src.dtype(prefix + "layers.0.attention.wq.weight")):
        dtype = src.dtype(prefix + "layers.0.attention.wq.weight")
    fp8 = is_fp8(dtype)
    compute_dtype = fp8_compute_dtype(device) if fp8 else None
    if fp8 and operations is None:
        operations = CAST_OPERATIONS
    with torch.device("meta"):
        model = FlagDiT(config, operations=operations, dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    _check_keys(path, expected, (k[len(prefix):] for k in src.keys if k.startswith(prefix)))
    targets = storage_dtypes(model, dtype, compute_dtype) if dtype is not None else {}

    state = {}
    for key, shape in expected.items():
        tensor = src.get(prefix + key)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {shape}")
        state[key] = tensor.to(device=device, dtype=targets.get(key, tensor.dtype))
        del tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    if fp8:
        model.compute_dtype = compute_dtype
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Loaded Lumina-T2I Flag-DiT from %s: %.2fB parameters, dim %d, %d layers, %s on %s in %.1f s",
        path,
        n_params / 1e9,
        config.dim,
        config.n_layers,
        (str(dtype).replace("torch.", "") if dtype is not None else "file dtype")
        + (f" (computed in {str(compute_dtype).replace('torch.', '')})" if fp8 else ""),
        device,
        time.perf_counter() - start,
    )
    return model


def load_dit(path, *, dtype: Optional[torch.dtype] = torch.bfloat16, device="cpu", operations=None):
    """Load a Lumina DiT of any family: a Flag-DiT (Lumina-T2I) or a Next-DiT (Lumina-Next, original or diffusers
    layout), recognised from the checkpoint's key names by `lumina_core.families`."""
    from .families import load_dit as load_any_dit

    return load_any_dit(path, dtype=dtype, device=device, operations=operations)


def read_flag_dit_config(path) -> FlagDiTConfig:
    """The configuration of a checkpoint file, read from its tensor shapes (no weights loaded)."""
    return _open_flag_dit(path)[2]


def save_flag_dit(model: FlagDiT, path, *, dtype: Optional[torch.dtype] = None):
    """Write a Flag-DiT as safetensors in the released key layout (fp8: linear weights fp8, the rest bf16)."""
    state = model.state_dict()
    targets = storage_dtypes(model, dtype, FP8_FILE_OTHER_DTYPE) if dtype is not None else {}
    write_safetensors(
        path,
        ((k, v) for k, v in state.items()),
        shapes={k: (tuple(v.shape), targets.get(k, v.dtype)) for k, v in state.items()},
        metadata={"format": "pt", "model": "lumina-t2i-flag-dit"},
    )


def convert_checkpoint(
    src_path, dst_path, *, dtype: torch.dtype = torch.bfloat16, progress: Optional[Callable[[int, int], None]] = None
) -> FlagDiTConfig:
    """Rewrite a released Flag-DiT checkpoint (safetensors or .pth) as an unprefixed safetensors file in `dtype`.

    Streams tensor by tensor: memory stays at about one tensor, whatever the file size. An fp8 dtype applies to the
    linear weights; the other tensors (norms, biases, tokens: 0.3% of the 5B) are written in bf16.
    """
    src_path, dst_path = Path(src_path), Path(dst_path)
    if dst_path.exists() and dst_path.resolve() == src_path.resolve():
        raise CheckpointError(f"output {dst_path} is the input file; choose another output name")
    src, prefix, config = _open_flag_dit(src_path)
    with torch.device("meta"):
        meta_model = FlagDiT(config)
    expected = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    targets = storage_dtypes(meta_model, dtype, FP8_FILE_OTHER_DTYPE)
    _check_keys(src_path, expected, (k[len(prefix):] for k in src.keys if k.startswith(prefix)))
    total = len(expected)

    def tensors():
        for i, key in enumerate(expected):
            yield key, src.get(prefix + key)
            if progress is not None:
                progress(i + 1, total)

    write_safetensors(
        dst_path,
        tensors(),
        shapes={k: (s, targets[k]) for k, s in expected.items()},
        metadata={"format": "pt", "model": "lumina-t2i-flag-dit", "converted_from": src_path.name},
    )
    return config
