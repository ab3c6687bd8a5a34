"""Reading and writing Next-DiT checkpoints in both public layouts.

- The original layout (`consolidated*.00-of-01.pth` / `.safetensors` of Alpha-VLLM/Lumina-Next-SFT and -T2I): keys
  equal the parameter names of `lumina_core.next_dit.NextDiT`.
- The diffusers layout (`transformer/diffusion_pytorch_model*.safetensors` of the -diffusers releases, keys of
  diffusers' `LuminaNextDiT2DModel`): every key maps to one original key; `attn2.to_q` and `attn2.norm_q` are copies
  of `attn1.to_q`/`attn1.norm_q` written by diffusers' converter, checked to be equal and then dropped.

Loading follows the Flag-DiT's (`lumina_core.checkpoint`): the configuration comes from the tensor shapes, the model
is built on the meta device and every tensor is read on its own, cast to the target dtype as it is read.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Iterable, Optional

import torch

from .casting import CAST_OPERATIONS, fp8_compute_dtype, is_fp8, storage_dtypes
from .checkpoint import CheckpointError, _check_path, _ffn_params
from .config import NextDiTConfig
from .next_dit import NextDiT
from .tensor_io import open_tensor_file, write_safetensors

logger = logging.getLogger(__name__)

ORIGINAL, DIFFUSERS = "original", "diffusers"
_ANCHORS = {ORIGINAL: "x_embedder.weight", DIFFUSERS: "patch_embedder.proj.weight"}
_PREFIX = re.compile(r"((model|module|diffusion_model|_orig_mod|net|transformer)\.)+")

# diffusers name -> original name; "N" stands for the layer index.
_DIFFUSERS_TOP = {
    "patch_embedder.proj.weight": "x_embedder.weight",
    "patch_embedder.proj.bias": "x_embedder.bias",
    "time_caption_embed.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "time_caption_embed.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "time_caption_embed.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "time_caption_embed.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "time_caption_embed.caption_embedder.0.weight": "cap_embedder.0.weight",
    "time_caption_embed.caption_embedder.0.bias": "cap_embedder.0.bias",
    "time_caption_embed.caption_embedder.1.weight": "cap_embedder.1.weight",
    "time_caption_embed.caption_embedder.1.bias": "cap_embedder.1.bias",
    "norm_out.linear_1.weight": "final_layer.adaLN_modulation.1.weight",
    "norm_out.linear_1.bias": "final_layer.adaLN_modulation.1.bias",
    "norm_out.linear_2.weight": "final_layer.linear.weight",
    "norm_out.linear_2.bias": "final_layer.linear.bias",
    "pad_token": "pad_token",
}
_DIFFUSERS_LAYER = {
    "gate": "attention.gate",
    "attn1.to_q.weight": "attention.wq.weight",
    "attn1.to_k.weight": "attention.wk.weight",
    "attn1.to_v.weight": "attention.wv.weight",
    "attn1.norm_q.weight": "attention.q_norm.weight",
    "attn1.norm_q.bias": "attention.q_norm.bias",
    "attn1.norm_k.weight": "attention.k_norm.weight",
    "attn1.norm_k.bias": "attention.k_norm.bias",
    "attn2.to_k.weight": "attention.wk_y.weight",
    "attn2.to_v.weight": "attention.wv_y.weight",
    "attn2.norm_k.weight": "attention.ky_norm.weight",
    "attn2.norm_k.bias": "attention.ky_norm.bias",
    "attn2.to_out.0.weight": "attention.wo.weight",
    "feed_forward.linear_1.weight": "feed_forward.w1.weight",
    "feed_forward.linear_2.weight": "feed_forward.w2.weight",
    "feed_forward.linear_3.weight": "feed_forward.w3.weight",
    "norm1.linear.weight": "adaLN_modulation.1.weight",
    "norm1.linear.bias": "adaLN_modulation.1.bias",
    "norm1.norm.weight": "attention_norm1.weight",
    "norm2.weight": "attention_norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
    "norm1_context.weight": "attention_y_norm.weight",
}
# The cross-attention's own query projection and norm in diffusers: copies of the self-attention's.
_DIFFUSERS_COPIES = {
    "attn2.to_q.weight": "attention.wq.weight",
    "attn2.norm_q.weight": "attention.q_norm.weight",
    "attn2.norm_q.bias": "attention.q_norm.bias",
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def diffusers_to_original(key: str) -> tuple[Optional[str], bool]:
    """(original key, is_copy) of a diffusers `LuminaNextDiT2DModel` key; (None, False) for an unknown key."""
    if key in _DIFFUSERS_TOP:
        return _DIFFUSERS_TOP[key], False
    m = _LAYER_KEY.fullmatch(key)
    if m:
        n, rest = m.groups()
        if rest in _DIFFUSERS_LAYER:
            return f"layers.{n}.{_DIFFUSERS_LAYER[rest]}", False
        if rest in _DIFFUSERS_COPIES:
            return f"layers.{n}.{_DIFFUSERS_COPIES[rest]}", True
    return None, False


def original_to_diffusers(key: str) -> list[str]:
    """The diffusers keys holding an original key's tensor (two for wq and q_norm, one otherwise)."""
    for d, o in _DIFFUSERS_TOP.items():
        if o == key:
            return [d]
    m = _LAYER_KEY.fullmatch(key)
    if not m:
        raise KeyError(key)
    n, rest = m.groups()
    out = [f"layers.{n}.{d}" for d, o in _DIFFUSERS_LAYER.items() if o == rest]
    out += [f"layers.{n}.{d}" for d, o in _DIFFUSERS_COPIES.items() if o == rest]
    if not out:
        raise KeyError(key)
    return out


def next_dit_layout(keys: Iterable[str]) -> Optional[tuple[str, str]]:
    """(layout, key prefix) when the keys are a Next-DiT's, else None.

    Lumina-Image-2.0 also has `attention_norm1`; its `noise_refiner`/`context_refiner` tell it apart.
    """
    keys = list(keys)
    if any(re.search(r"(^|\.)(noise_refiner|context_refiner)\.", k) for k in keys):
        return None
    for layout, anchor in _ANCHORS.items():
        for key in keys:
            if not key.endswith(anchor):
                continue
            prefix = key[: -len(anchor)]
            if prefix and not _PREFIX.fullmatch(prefix):
                continue
            marker = "layers.0.attention_norm1.weight" if layout == ORIGINAL else "layers.0.norm1_context.weight"
            if prefix + marker in keys:
                return layout, prefix
    return None


def _config_from_shapes(shapes: dict, source: str) -> NextDiTConfig:
    """Configuration from original-layout shapes: head counts from `gate` and `wk`, widths from the embedders."""
    try:
        dim, patch_in = shapes["x_embedder.weight"]
        out_rows = shapes["final_layer.linear.weight"][0]
        n_heads = shapes["layers.0.attention.gate"][0]
        kv_rows = shapes["layers.0.attention.wk.weight"][0]
        cap_feat_dim = shapes["cap_embedder.1.weight"][1]
        hidden = shapes["layers.0.feed_forward.w1.weight"][0]
    except KeyError as err:
        raise CheckpointError(f"{source} looks like a Lumina-Next Next-DiT but lacks {err.args[0]}") from None
    in_channels = 4
    patch_size = int(round((patch_in / in_channels) ** 0.5))
    if patch_size < 1 or patch_size**2 * in_channels != patch_in:
        raise CheckpointError(f"{source}: x_embedder input width {patch_in} is not 4 channels x a square patch")
    learn_sigma = out_rows == 2 * patch_in
    if not learn_sigma and out_rows != patch_in:
        raise CheckpointError(f"{source}: final_layer.linear has {out_rows} outputs for {patch_in} inputs per patch")
    n_layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k)))
    head_dim = dim // n_heads
    multiple_of, multiplier = _ffn_params(dim, hidden)
    try:
        return NextDiTConfig(
            patch_size=patch_size,
            in_channels=in_channels,
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=None if kv_rows == dim else kv_rows // head_dim,
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            learn_sigma=learn_sigma,
            qk_norm="layers.0.attention.q_norm.weight" in shapes,
            cap_feat_dim=cap_feat_dim,
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: inconsistent Next-DiT shapes ({err})") from None


class _NextDiTSource:
    """An opened Next-DiT file: its layout, configuration and which file key holds each parameter."""

    def __init__(self, path):
        self.path = _check_path(path)
        self.src = open_tensor_file(self.path, CheckpointError)
        found = next_dit_layout(self.src.keys)
        if found is None:
            raise CheckpointError(f"{self.path} is not a Lumina-Next Next-DiT checkpoint")
        self.layout, prefix = found
        self.file_key: dict[str, str] = {}  # original key -> file key
        self.copies: dict[str, str] = {}  # file key of a diffusers copy -> original key
        unknown = []
        for key in self.src.keys:
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if self.layout == ORIGINAL:
                self.file_key[name] = key
                continue
            original, is_copy = diffusers_to_original(name)
            if original is None:
                unknown.append(name)
            elif is_copy:
                self.copies[key] = original
            else:
                self.file_key[original] = key
        self.unknown = unknown
        shapes = {k: tuple(self.src.shape(f)) for k, f in self.file_key.items()}
        self.config = _config_from_shapes(shapes, str(self.path))

    def check_keys(self, expected: dict):
        missing = [k for k in expected if k not in self.file_key]
        unexpected = sorted(set(self.file_key) - set(expected)) + self.unknown
        if self.layout == DIFFUSERS:
            have = set(self.copies.values())
            missing += [d for k in expected for d in original_to_diffusers(k)[1:] if k not in have]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing (first: {', '.join(missing[:5])})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:5])})")
            raise CheckpointError(
                f"{self.path} looks like a Lumina-Next Next-DiT ({self.layout} layout) but its keys do not match: "
                f"{'; '.join(parts)}. The file may be incomplete or from a different model version."
            )


_ALIGN = 64  # bytes: every tensor of the packed weights starts on a cache line


def _read_weights(source: _NextDiTSource, expected: dict, dtype, device) -> dict:
    """The tensors of `expected` ({key: shape}) read from the file, cast to `dtype` as they are read (one
    torch.dtype for all, or a dict key -> dtype: fp8 storage keeps norms and biases in the compute dtype).

    With a target dtype the tensors are views into one buffer allocated up front and filled chunk by chunk from the
    file, so the process holds the weights and an 8 MB read buffer, nothing else: reading each tensor whole and
    casting it (as the Flag-DiT loader does) peaked at 1.22-1.32 x the bf16 weights of the 2B model, whose tensors
    are small enough to come from the allocator's heap, where the freed fp32 copies leave holes.
    """
    for key, shape in expected.items():
        found = tuple(source.src.shape(source.file_key[key]))
        if found != shape:
            raise CheckpointError(f"{source.path}: {source.file_key[key]} has shape {found}, expected {shape}")
    if dtype is None:
        return {key: source.src.get(source.file_key[key]).to(device) for key in expected}
    dtypes = dtype if isinstance(dtype, dict) else dict.fromkeys(expected, dtype)
    offsets, totals = {}, {}
    for key, shape in expected.items():
        target = dtypes[key]
        step = max(1, _ALIGN // torch.empty((), dtype=target).element_size())
        offsets[key] = totals.get(target, 0)
        totals[target] = offsets[key] + -(-math.prod(shape) // step) * step
    packed = {target: torch.empty(total, dtype=target) for target, total in totals.items()}
    read_into = getattr(source.src, "read_into", None)
    state = {}
    for key, shape in expected.items():
        out = packed[dtypes[key]][offsets[key]:offsets[key] + math.prod(shape)].view(shape)
        if read_into is not None:
            read_into(source.file_key[key], out)
        else:  # a weights-only pickle, memory-mapped: copy from the mapping
            out.copy_(source.src.get(source.file_key[key]))
        state[key] = out if torch.device(device).type == "cpu" else out.to(device)
    return state


def read_next_dit_config(path) -> NextDiTConfig:
    """The configuration of a Next-DiT file (either layout), from its tensor shapes; no weights are read."""
    return _NextDiTSource(path).config


def load_next_dit(path, *, dtype: Optional[torch.dtype] = torch.bfloat16, device="cpu", operations=None) -> NextDiT:
    """Load a Lumina-Next Next-DiT from the original or the diffusers layout, tensor by tensor in `dtype`."""
    start = time.perf_counter()
    source = _NextDiTSource(path)
    config = source.config
    fp8 = is_fp8(dtype)
    compute_dtype = fp8_compute_dtype(device) if fp8 else None
    if fp8 and operations is None:
        operations = CAST_OPERATIONS  # fp8 linear weights cast to the compute dtype per layer
    with torch.device("meta"):
        model = NextDiT(config, operations=operations, dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    source.check_keys(expected)

    state = _read_weights(source, expected, storage_dtypes(model, dtype, compute_dtype) if fp8 else dtype, device)
    for file_key, key in source.copies.items():
        copy = source.src.get(file_key)
        if tuple(copy.shape) != expected[key] or not torch.equal(copy.to(state[key]), state[key]):
            raise CheckpointError(
                f"{source.path}: {file_key} differs from {source.file_key[key]}. In Lumina-Next the caption "
                f"attention uses the self-attention's query projection, so the two must be equal; this file was "
                f"changed after conversion and cannot be run faithfully."
            )
        del copy
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False).eval()
    if fp8:
        model.compute_dtype = compute_dtype
    logger.info(
        "Loaded Lumina-Next Next-DiT (%s layout) from %s: %.2fB parameters, dim %d, %d layers, %d/%d heads, %s "
        "in %.1f s",
        source.layout,
        source.path,
        sum(p.numel() for p in model.parameters()) / 1e9,
        config.dim,
        config.n_layers,
        config.n_heads,
        config.kv_heads,
        str(dtype).replace("torch.", "") if dtype is not None else "file dtype",
        time.perf_counter() - start,
    )
    return model


def save_next_dit(model: NextDiT, path, *, layout: str = ORIGINAL, dtype: Optional[torch.dtype] = None):
    """Write a Next-DiT as safetensors in the original or the diffusers key layout."""
    if layout not in (ORIGINAL, DIFFUSERS):
        raise ValueError(f"layout must be {ORIGINAL!r} or {DIFFUSERS!r}, got {layout!r}")
    state = model.state_dict()
    named = []
    for key, tensor in state.items():
        for name in [key] if layout == ORIGINAL else original_to_diffusers(key):
            named.append((name, tensor if dtype is None else tensor.to(dtype)))
    write_safetensors(
        path,
        iter(named),
        shapes={k: (tuple(v.shape), v.dtype) for k, v in named},
        metadata={"format": "pt", "model": f"lumina-next-dit-{layout}"},
    )


__all__ = [
    "DIFFUSERS",
    "ORIGINAL",
    "diffusers_to_original",
    "load_next_dit",
    "next_dit_layout",
    "original_to_diffusers",
    "read_next_dit_config",
    "save_next_dit",
]
