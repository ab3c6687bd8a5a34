"""Checkpoint layouts as data: how each DiT file layout is recognised, how its keys map onto the module's parameter
names (the diffusers key maps: `diffusers_keys`), and how the configuration follows from the tensor shapes.
`lumina_core.weights.dit_files` reads every layout with one loader.

A layout is found from its keys: an anchor key (which also gives the prefix some re-distributions put before every
key, such as `model.diffusion_model.`), a marker key under the same prefix, and keys that rule it out. Layouts:
- `flag_dit`: Lumina-T2I's released `consolidated.00-of-01.safetensors` (SPEC.md §2): the module's own names.
- `next_dit`: Lumina-Next's original `consolidated*.pth/.safetensors` (SPEC.md §8): the module's own names.
- `next_dit_diffusers`: diffusers' `LuminaNextDiT2DModel` (`transformer/diffusion_pytorch_model*.safetensors`):
  every key maps to one original key; `attn2.to_q` and `attn2.norm_q` are copies of `attn1.to_q`/`attn1.norm_q`
  written by diffusers' converter, checked to be equal and then dropped.
- `unified_next_dit`: Lumina-Image-2.0's original `consolidated.00-of-01.pth` (SPEC.md §9), ComfyUI's
  `lumina_2_model_bf16.safetensors` (the same names) and the DiT of ComfyUI's all-in-one `lumina_2.safetensors`
  (under `model.diffusion_model.`).
- `unified_next_dit_diffusers`: diffusers' `Lumina2Transformer2DModel`: the fused `attention.qkv` is stored as
  `attn.to_q`/`to_k`/`to_v` (joined back row-wise: `parts`), and the unused `norm_final` is left out (`optional`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from ..models.config import DiTConfig, FlagDiTConfig, NextDiTConfig, UnifiedNextDiTConfig
from ..models.flag_dit import FlagDiT
from ..models.next_dit import NextDiT
from ..models.unified_next_dit import UnifiedNextDiT
from .diffusers_keys import (  # noqa: F401  (original_to_diffusers and unified_original_to_diffusers: re-exported)
    diffusers_to_original,
    original_to_diffusers,
    unified_diffusers_part,
    unified_diffusers_to_original,
    unified_original_to_diffusers,
)
from .tensor_io import WeightsFileError

PREFIX = re.compile(r"((model|module|diffusion_model|_orig_mod|net|transformer)\.)+")
_LAYER = re.compile(r"layers\.(\d+)\.")


class CheckpointError(WeightsFileError):
    """A checkpoint that cannot be used, with what was found and what to do instead."""


@dataclass(frozen=True)
class Layout:
    name: str
    family: str  # the registry name of the family whose DiT it holds
    title: str  # "Lumina-T2I Flag-DiT"
    description: str  # "original layout"
    anchor: str  # a key every file of the layout has (after the prefix)
    marker: str  # a second key under the same prefix
    rejects: Optional[str]  # a regex over the keys that rules the layout out
    rename: Callable[[str], tuple[Optional[str], bool]]  # file key -> (module key or None, is a copy)
    config: Callable[[dict, str], DiTConfig]  # module-key shapes, source name -> configuration
    model: type  # the module class, built as model(config, operations=, dtype=)
    # module key -> the file keys of the copies a file of this layout must also hold (None: no copies)
    copies_of: Optional[Callable[[str], list]] = None
    # file key -> (module key, index, count) when the file splits a module tensor into `count` row blocks, joined
    # in index order
    parts: Optional[Callable[[str], Optional[tuple[str, int, int]]]] = None
    # module keys a file of this layout may leave out, with the value filling them (unused parameters)
    optional: tuple = ()

    def find_prefix(self, keys: list) -> Optional[str]:
        """The prefix of this layout's keys in `keys`, or None when the keys are not this layout's."""
        if self.rejects and any(re.search(self.rejects, k) for k in keys):
            return None
        present = set(keys)
        for key in keys:
            if not key.endswith(self.anchor):
                continue
            prefix = key[: -len(self.anchor)]
            if (prefix == "" or PREFIX.fullmatch(prefix)) and prefix + self.marker in present:
                return prefix
        return None


def _same(key: str) -> tuple[Optional[str], bool]:
    return key, False


def describe_foreign(keys: list[str]) -> Optional[str]:
    """Name the architecture of a checkpoint that is not a Lumina-T2I Flag-DiT, with the loader to use instead."""
    joined = "\n".join(keys)

    def has(pattern: str) -> bool:
        return re.search(pattern, joined, flags=re.MULTILINE) is not None

    if has(r"(^|\.)(noise_refiner|context_refiner)\."):
        return (
            "a Lumina-Image-2.0 (Unified Next-DiT) transformer; load it with the Lumina Load DiT node "
            "(lumina_core.load_dit)"
        )
    if has(r"(^|\.)layers\.\d+\.attention_norm1\.") or has(r"(^|\.)layers\.\d+\.ffn_norm2\."):
        return (
            "a Lumina-Next (Next-DiT) transformer; load it with the Lumina Load DiT node "
            "(lumina_core.load_dit)"
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


def n_layers_of(shapes: dict) -> int:
    return 1 + max(int(m.group(1)) for k in shapes if (m := _LAYER.match(k)))


def cross_attention_dit_config(config_cls, title: str) -> Callable[[dict, str], DiTConfig]:
    """The configuration of a Flag-DiT or Next-DiT (`config_cls`) from its original-name shapes: widths from the
    embedders, head counts from `gate` and `wk`, FFN width from `w1`, qk_norm from the presence of `q_norm`."""
    required = ("x_embedder.weight", "final_layer.linear.weight", "cap_embedder.1.weight", "layers.0.attention.gate",
                "layers.0.attention.wk.weight", "layers.0.feed_forward.w1.weight")

    def config(shapes: dict, source: str) -> DiTConfig:
        missing = [k for k in required if k not in shapes]
        if missing:
            foreign = describe_foreign(list(shapes))
            if foreign:
                raise CheckpointError(f"{source} is {foreign}, not a {title}")
            raise CheckpointError(
                f"{source} is not a {title}: it lacks {', '.join(missing)} (first keys found: "
                f"{', '.join(list(shapes)[:5])})"
            )
        dim, patch_in = shapes["x_embedder.weight"]
        out_rows = shapes["final_layer.linear.weight"][0]
        in_channels = 4  # SDXL-VAE latents; the patch size follows from it
        patch_size = int(round((patch_in / in_channels) ** 0.5))
        if patch_size < 1 or patch_size**2 * in_channels != patch_in:
            raise CheckpointError(f"{source}: x_embedder input width {patch_in} is not 4 channels x a square patch")
        learn_sigma = out_rows == 2 * patch_in
        if not learn_sigma and out_rows != patch_in:
            raise CheckpointError(
                f"{source}: final_layer.linear has {out_rows} outputs for {patch_in} inputs per patch"
            )
        n_heads = shapes["layers.0.attention.gate"][0]
        kv_heads = shapes["layers.0.attention.wk.weight"][0] // (dim // n_heads)
        multiple_of, multiplier = _ffn_params(dim, shapes["layers.0.feed_forward.w1.weight"][0])
        try:
            return config_cls(
                patch_size=patch_size,
                in_channels=in_channels,
                dim=dim,
                n_layers=n_layers_of(shapes),
                n_heads=n_heads,
                n_kv_heads=None if kv_heads == n_heads else kv_heads,
                multiple_of=multiple_of,
                ffn_dim_multiplier=multiplier,
                learn_sigma=learn_sigma,
                qk_norm="layers.0.attention.q_norm.weight" in shapes,
                cap_feat_dim=shapes["cap_embedder.1.weight"][1],
            )
        except ValueError as err:
            raise CheckpointError(f"{source}: inconsistent {title} shapes ({err})") from None

    return config


# --------------------------------------------------------------------------------------------------------------
# The table

_REFINERS = r"(^|\.)(noise_refiner|context_refiner)\."
_SANDWICH = r"(^|\.)layers\.\d+\.(attention_norm1|ffn_norm2|norm1_context)\."

FLAG_DIT = Layout(
    name="flag_dit", family="lumina_t2i", title="Lumina-T2I Flag-DiT", description="original layout",
    anchor="x_embedder.weight", marker="eol_token", rejects=f"{_REFINERS}|{_SANDWICH}", rename=_same,
    config=cross_attention_dit_config(FlagDiTConfig, "Lumina-T2I Flag-DiT"), model=FlagDiT,
)
NEXT_DIT = Layout(
    name="next_dit", family="lumina_next", title="Lumina-Next Next-DiT", description="original layout",
    anchor="x_embedder.weight", marker="layers.0.attention_norm1.weight", rejects=_REFINERS, rename=_same,
    config=cross_attention_dit_config(NextDiTConfig, "Lumina-Next Next-DiT"), model=NextDiT,
)
NEXT_DIT_DIFFUSERS = Layout(
    name="next_dit_diffusers", family="lumina_next", title="Lumina-Next Next-DiT", description="diffusers layout",
    anchor="patch_embedder.proj.weight", marker="layers.0.norm1_context.weight", rejects=_REFINERS,
    rename=diffusers_to_original, config=NEXT_DIT.config, model=NextDiT,
    copies_of=lambda key: original_to_diffusers(key)[1:],
)


# --------------------------------------------------------------------------------------------------------------
# Lumina-Image-2.0


def _axes_dims(head_dim: int) -> tuple:
    """The RoPE axis widths of a head: the caption axis 2*(head_dim//6), the row and column axes half the rest each
    (96 -> the released (32, 32, 32)); the checkpoint does not store them."""
    caption = 2 * (head_dim // 6)
    side = (head_dim - caption) // 2
    return (caption, side, side)


def unified_dit_config(shapes: dict, source: str) -> UnifiedNextDiTConfig:
    """The configuration of a Unified Next-DiT from its original-name shapes: widths from the embedders, head_dim
    from q_norm, head counts from the fused qkv, FFN width from w1, refiner depth from the noise refiner."""
    title = "Lumina-Image-2.0 Unified Next-DiT"
    required = ("x_embedder.weight", "final_layer.linear.weight", "cap_embedder.1.weight",
                "layers.0.attention.qkv.weight", "layers.0.attention.q_norm.weight", "layers.0.feed_forward.w1.weight")
    missing = [k for k in required if k not in shapes]
    if missing:
        raise CheckpointError(
            f"{source} is not a {title}: it lacks {', '.join(missing)} (first keys found: {', '.join(list(shapes)[:5])})"
        )
    dim, patch_in = shapes["x_embedder.weight"]
    patch_size = 2
    in_channels = patch_in // patch_size**2
    if in_channels * patch_size**2 != patch_in or shapes["final_layer.linear.weight"][0] != patch_in:
        raise CheckpointError(
            f"{source}: x_embedder takes {patch_in} and final_layer.linear gives "
            f"{shapes['final_layer.linear.weight'][0]} values per patch; a {title} has channels x 2 x 2 for both"
        )
    head_dim = shapes["layers.0.attention.q_norm.weight"][0]
    n_heads = dim // head_dim
    kv_heads = (shapes["layers.0.attention.qkv.weight"][0] // head_dim - n_heads) // 2
    hidden = shapes["layers.0.feed_forward.w1.weight"][0]
    multiple_of, multiplier = next(
        ((m, None) for m in (256, 128, 64, 32, 16, 8, 4, 2, 1) if m * -(-4 * dim // m) == hidden), (1, hidden / (4 * dim))
    )
    refiners = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"noise_refiner\.(\d+)\.", k))), default=-1)
    try:
        return UnifiedNextDiTConfig(
            patch_size=patch_size, in_channels=in_channels, dim=dim, n_layers=n_layers_of(shapes), n_heads=n_heads,
            n_kv_heads=kv_heads, multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
            cap_feat_dim=shapes["cap_embedder.1.weight"][1], n_refiner_layers=refiners, axes_dims=_axes_dims(head_dim),
        )
    except ValueError as err:
        raise CheckpointError(f"{source}: inconsistent {title} shapes ({err})") from None


UNIFIED_NEXT_DIT = Layout(
    name="unified_next_dit", family="lumina2", title="Lumina-Image-2.0 Unified Next-DiT",
    description="original layout", anchor="x_embedder.weight", marker="context_refiner.0.attention.qkv.weight",
    rejects=None, rename=_same, config=unified_dit_config, model=UnifiedNextDiT,
    optional=(("norm_final.weight", 1.0),),
)
UNIFIED_NEXT_DIT_DIFFUSERS = Layout(
    name="unified_next_dit_diffusers", family="lumina2", title="Lumina-Image-2.0 Unified Next-DiT",
    description="diffusers layout", anchor="x_embedder.weight", marker="context_refiner.0.attn.to_q.weight",
    rejects=None, rename=unified_diffusers_to_original, config=unified_dit_config, model=UnifiedNextDiT,
    parts=unified_diffusers_part, optional=(("norm_final.weight", 1.0),),
)
LAYOUTS = (FLAG_DIT, NEXT_DIT, NEXT_DIT_DIFFUSERS, UNIFIED_NEXT_DIT, UNIFIED_NEXT_DIT_DIFFUSERS)


def find_layout(keys: Iterable[str]) -> Optional[tuple[Layout, str]]:
    """(layout, key prefix) of the first layout the keys match, or None."""
    keys = list(keys)
    for layout in LAYOUTS:
        prefix = layout.find_prefix(keys)
        if prefix is not None:
            return layout, prefix
    return None
