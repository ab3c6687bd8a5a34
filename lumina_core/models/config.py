"""Configurations of the Lumina DiTs.

Field names follow the original constructors (`DiT_Llama` of `lumina_t2i/models/model.py`, `NextDiT` of
`lumina_next_t2i/models/model.py`, Alpha-VLLM/Lumina-T2X), so a configuration reads the same as the upstream
training arguments. `DiTConfig` holds what the families share; each family's class adds or changes only its own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

TRAINED_SIZE = 1024  # pixels; every Lumina family was trained at 1024x1024
VAE_FACTOR = 8
PATCH = 2
TRAINED_SIDE = TRAINED_SIZE // (VAE_FACTOR * PATCH)  # 64 patches per side at the trained size


@dataclass(frozen=True)
class DiTConfig:
    patch_size: int = 2
    in_channels: int = 4
    dim: int = 3072
    n_layers: int = 32
    n_heads: int = 32
    # None means "as many key/value heads as query heads"; fewer gives grouped-query attention.
    n_kv_heads: Optional[int] = None
    # The SwiGLU hidden width is 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to a multiple of multiple_of.
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    # The released models predict a learned variance too: 2*in_channels outputs, of which only the first half is used.
    learn_sigma: bool = True
    # LayerNorm over the whole projected q and k (and the text keys) before the split into heads.
    qk_norm: bool = True
    # Width of the text features (the text encoder's hidden size).
    cap_feat_dim: int = 4096
    rope_theta: float = 10000.0

    # head_dim must be a multiple of this, for the RoPE variant named: channel pairs of 1-D RoPE, pairs per axis of
    # 2-D RoPE.
    head_dim_multiple = 2
    rope_name = "RoPE"

    def __post_init__(self):
        name = type(self).__name__
        for field in ("patch_size", "in_channels", "dim", "n_layers", "n_heads", "multiple_of", "cap_feat_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{field} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if self.head_dim % self.head_dim_multiple:
            multiple = "even" if self.head_dim_multiple == 2 else f"a multiple of {self.head_dim_multiple}"
            raise ValueError(
                f"head_dim {self.head_dim} (dim {self.dim} / n_heads {self.n_heads}) must be {multiple} for "
                f"{self.rope_name}"
            )
        kv = self.kv_heads
        if not isinstance(kv, int) or kv < 1 or self.n_heads % kv:
            raise ValueError(f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"ffn_dim_multiplier must be positive or None, got {self.ffn_dim_multiplier}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError(f"norm_eps ({self.norm_eps}) and rope_theta ({self.rope_theta}) must be positive")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def adaln_dim(self) -> int:
        """Width of the conditioning vector (timestep + caption embedding)."""
        return min(self.dim, 1024)

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class FlagDiTConfig(DiTConfig):
    """The Lumina-T2I Flag-DiT (defaults: the released 5B model, LLaMA-2-7B features)."""

    # Positions are divided by this factor; 1.0 at training and in the original demo.
    rope_scaling_factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.rope_scaling_factor <= 0:
            raise ValueError(f"rope_scaling_factor ({self.rope_scaling_factor}) must be positive")

    @classmethod
    def lumina_t2i_5b(cls) -> "FlagDiTConfig":
        """The released Lumina-T2I model ("DiT_Llama_5B_patch2", qk_norm, LLaMA-2-7B features)."""
        return FLAG_DIT_5B

    @classmethod
    def tiny(cls, **overrides) -> "FlagDiTConfig":
        """A few-layer model of the same architecture, for tests and the smoke-test demo."""
        return dataclasses.replace(FLAG_DIT_TINY, **overrides)


FLAG_DIT_5B = FlagDiTConfig(dim=3072, n_layers=32, n_heads=32, cap_feat_dim=4096)
FLAG_DIT_TINY = FlagDiTConfig(dim=64, n_layers=2, n_heads=4, multiple_of=16, cap_feat_dim=32)


@dataclass(frozen=True)
class NextDiTConfig(DiTConfig):
    """The Lumina-Next Next-DiT. It differs from the Flag-DiT in what the architecture needs: no end-of-line token,
    2-D RoPE (so head_dim must be a multiple of 4), Gemma-2B's 2048-wide caption features; the released
    Lumina-Next-SFT uses 8 key/value heads (grouped-query)."""

    dim: int = 2304
    n_layers: int = 24
    cap_feat_dim: int = 2048
    head_dim_multiple = 4
    rope_name = "2-D RoPE"

    @classmethod
    def tiny(cls, **overrides) -> "NextDiTConfig":
        """A few-layer model of the same architecture (grouped-query), for tests and workflows on tiny models."""
        return dataclasses.replace(NEXT_DIT_TINY, **overrides)


# "NextDiT_2B_patch2" (qk_norm, Gemma-2B features) and its grouped-query variant "NextDiT_2B_GQA_patch2".
NEXT_DIT_2B = NextDiTConfig(dim=2304, n_layers=24, n_heads=32, cap_feat_dim=2048)
NEXT_DIT_2B_GQA = NextDiTConfig(dim=2304, n_layers=24, n_heads=32, n_kv_heads=8, cap_feat_dim=2048)
NEXT_DIT_TINY = NextDiTConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, cap_feat_dim=32)


@dataclass(frozen=True)
class UnifiedNextDiTConfig(DiTConfig):
    """The Lumina-Image-2.0 Unified Next-DiT ("NextDiT_2B_GQA_patch2_Adaln_Refiner" of Alpha-VLLM/Lumina-Image-2.0).

    Caption and image tokens run in one sequence; before it, `n_refiner_layers` context-refiner blocks work on the
    caption alone and as many noise-refiner blocks on the image alone. 16 FLUX-VAE latent channels, no learned
    variance; per-head RMS q/k norms; 3-D RoPE whose axes (caption index, row, column) own `axes_dims` channels of
    each head and have tables of `axes_lens` positions; the SwiGLU hidden width is 4*dim (no 2/3), rounded up to a
    multiple of `multiple_of`. The adaLN input is the timestep embedding alone.
    """

    in_channels: int = 16
    dim: int = 2304
    n_layers: int = 26
    n_heads: int = 24
    n_kv_heads: Optional[int] = 8
    learn_sigma: bool = False
    cap_feat_dim: int = 2304
    n_refiner_layers: int = 2
    axes_dims: tuple = (32, 32, 32)
    axes_lens: tuple = (300, 512, 512)
    rope_name = "3-D RoPE"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.n_refiner_layers, int) or self.n_refiner_layers < 0:
            raise ValueError(f"n_refiner_layers must be a non-negative integer, got {self.n_refiner_layers!r}")
        dims, lens = tuple(self.axes_dims), tuple(self.axes_lens)
        if len(dims) != 3 or len(lens) != 3 or any(d < 2 or d % 2 for d in dims) or any(n < 1 for n in lens):
            raise ValueError(f"axes_dims {dims} must be 3 positive even widths and axes_lens {lens} 3 lengths")
        if sum(dims) != self.head_dim:
            raise ValueError(f"axes_dims {dims} must add up to head_dim {self.head_dim} (dim {self.dim} / n_heads "
                             f"{self.n_heads}) for {self.rope_name}")

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = 4 * self.dim
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def tiny(cls, **overrides) -> "UnifiedNextDiTConfig":
        """A few-layer model of the same architecture (grouped-query), for tests and workflows on tiny models."""
        return dataclasses.replace(UNIFIED_NEXT_DIT_TINY, **overrides)


# The released Lumina-Image-2.0 DiT (Gemma-2-2B features) and a tiny one of the same architecture.
UNIFIED_NEXT_DIT_2B = UnifiedNextDiTConfig()
UNIFIED_NEXT_DIT_TINY = UnifiedNextDiTConfig(
    dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, cap_feat_dim=32, n_refiner_layers=1,
    axes_dims=(4, 6, 6),
)
