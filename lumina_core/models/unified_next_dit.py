"""The Lumina-Image-2.0 Unified Next-DiT: caption and image tokens in one sequence of joint attention blocks.

Follows `models/model.py` of Alpha-VLLM/Lumina-Image-2.0 (`NextDiT_2B_GQA_patch2_Adaln_Refiner`; SPEC.md §9) without
flash-attn or apex. Parameter names equal the original checkpoint's keys (`load_state_dict(strict=True)`); the other
layouts are mapped onto them by `lumina_core.weights.layouts`. Time convention as everywhere in this package:
t = 0 is noise, t = 1 is data; the model predicts the velocity data - noise.

The forward, as the original's: the caption features pass an RMSNorm and a linear layer, then the context-refiner
blocks (no modulation) on the caption alone; the image patches pass `x_embedder` and the noise-refiner blocks on the
image alone; then each sample's sequence is [its real caption tokens] + [its image tokens], padded at the end, and
runs the joint blocks; the final layer's image rows are un-patchified. The context refiner does not depend on t, so
`prepare_text` runs it once per generation and every step reuses it.

Positions are 3-D: caption token j is (j, 0, 0), image patch (row r, column c) is (cap_len, r, c) with cap_len the
sample's real caption length; padding is rotated by angle 0. Each axis owns `axes_dims[k]` channels of a head (pairs
of adjacent channels turned as complex numbers, frequencies theta^(-2i/axes_dims[k])), with a table of
`axes_lens[k]` positions, so a caption may have at most axes_lens[0] - 1 real tokens and an image at most
axes_lens[1] x axes_lens[2] patches. The tables are computed in float64 and rounded to float32 once (the original's
complex64 tables); a forward only indexes them, so it is the same graph for every batch (torch.compile friendly):
the joint sequence has the padded caption length plus the image tokens, its extra rows masked out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .blocks import FeedForward, LuminaDiT, TimestepEmbedder, cached
from .config import UnifiedNextDiTConfig
from .layers import RMSNorm, from_patches, gated, repeat_kv, rotated_heads, sdpa
from .next_dit import NextFinalLayer, _modulate

# q_norm/k_norm are built as RMSNorm(head_dim) with the norm class's default eps in the original.
QK_NORM_EPS = 1e-6


@dataclass
class JointText:
    """The caption after the context refiners, computed once per generation and reused at every step."""

    cap: torch.Tensor  # [B, L, dim] refined caption tokens (padding rows included, never read)
    mask: torch.Tensor  # [B, L] bool, True on real tokens
    lengths: torch.Tensor  # [B] int64, real tokens per sample
    rope_cache: dict = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.cap.shape[0]


def rope_3d_tables(config: UnifiedNextDiTConfig, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per axis k, (cos, sin) [axes_lens[k], axes_dims[k]/2]: angle p * theta^(-2i/d) for position p, pair i."""
    tables = []
    for dim, length in zip(config.axes_dims, config.axes_lens):
        freqs = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles = torch.outer(torch.arange(length, dtype=torch.float64), freqs).float()
        tables.append((torch.cos(angles).to(device), torch.sin(angles).to(device)))
    return tables


def rope_3d_cos_sin(tables, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., head_dim/2] for integer positions [..., 3], read from the per-axis tables."""
    cos = torch.cat([c[positions[..., k]] for k, (c, _) in enumerate(tables)], dim=-1)
    sin = torch.cat([s[positions[..., k]] for k, (_, s) in enumerate(tables)], dim=-1)
    return cos, sin


class JointAttention(nn.Module):
    """Self-attention over one sequence: fused qkv (grouped-query), per-head RMS q/k norms, 3-D RoPE, key-padding
    mask, default softmax scale."""

    def __init__(self, cfg: UnifiedNextDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.qkv = operations.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, **kw)
        self.out = operations.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, **kw)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=QK_NORM_EPS, device=device, dtype=dtype)
            self.k_norm = RMSNorm(cfg.head_dim, eps=QK_NORM_EPS, device=device, dtype=dtype)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        # The attention kernel (see layers.sdpa) and the query chunking, set through the model (LuminaDiT).
        self.attention_fn = sdpa
        self.query_chunk = None

    def forward(self, x: torch.Tensor, mask, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, l, _ = x.shape
        dtype = x.dtype
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = rotated_heads(q, self.q_norm, nh, hd, cos, sin, dtype, per_head=True)
        k = rotated_heads(k, self.k_norm, nkv, hd, cos, sin, dtype, per_head=True)
        v = v.view(b, l, nkv, hd).transpose(1, 2)
        k, v = repeat_kv(k, nh // nkv), repeat_kv(v, nh // nkv)
        chunk = self.query_chunk if self.query_chunk is not None and self.query_chunk < l else l
        parts = []
        for start in range(0, l, chunk):  # a loop, not a comprehension: q, k and v stay plain locals to free below
            parts.append(self.attention_fn(q[:, :, start : start + chunk], k, v, mask=mask))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        del q, k, v, parts  # freed before the output projection runs
        return self.out(out.transpose(1, 2).reshape(b, l, nh * hd))


class JointBlock(nn.Module):
    """Sandwich-normed attention and SwiGLU; `modulated` blocks (noise refiner, joint layers) scale their inputs
    by (1 + scale) and gate their outputs by tanh(gate) from the timestep embedding, context-refiner blocks do
    neither."""

    def __init__(self, cfg: UnifiedNextDiTConfig, modulated: bool, operations=nn, device=None, dtype=None):
        super().__init__()
        norm = dict(eps=cfg.norm_eps, device=device, dtype=dtype)
        self.attention = JointAttention(cfg, operations, device, dtype)
        self.feed_forward = FeedForward(cfg, operations, device, dtype)
        self.attention_norm1 = RMSNorm(cfg.dim, **norm)
        self.ffn_norm1 = RMSNorm(cfg.dim, **norm)
        self.attention_norm2 = RMSNorm(cfg.dim, **norm)
        self.ffn_norm2 = RMSNorm(cfg.dim, **norm)
        self.modulated = modulated
        if modulated:
            self.adaLN_modulation = nn.Sequential(
                nn.SiLU(), operations.Linear(cfg.adaln_dim, 4 * cfg.dim, bias=True, device=device, dtype=dtype)
            )

    def forward(self, x, mask, cos, sin, c=None):
        if not self.modulated:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), mask, cos, sin))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        inplace = not torch.is_grad_enabled()  # at inference the norms' fresh outputs are scaled and gated in place
        h = self.attention(_modulate(self.attention_norm1(x), scale_msa, inplace), mask, cos, sin)
        x = x + gated(self.attention_norm2(h), gate_msa.tanh(), inplace=inplace)
        h = self.feed_forward(_modulate(self.ffn_norm1(x), scale_mlp, inplace))
        return x + gated(self.ffn_norm2(h), gate_mlp.tanh(), inplace=inplace)


def _key_mask(mask: torch.Tensor):
    """[B, L] bool -> the kernel's key-padding mask [B, 1, 1, L]; None when nothing is masked (eager mode only:
    the test reads the data, which torch.compile would have to break the graph for)."""
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask[:, None, None, :]


class UnifiedNextDiT(LuminaDiT):
    family = "lumina2"
    dit_title = "Unified Next-DiT"
    latent_hint = "a FLUX-VAE latent: 16 channels"
    text_hint = "Lumina-Image-2.0 needs Gemma-2-2B features"

    def __init__(self, config: UnifiedNextDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        if operations is None:
            operations = nn
        self.config = cfg = config
        p = cfg.patch_size
        self.x_embedder = operations.Linear(p * p * cfg.in_channels, cfg.dim, bias=True, device=device, dtype=dtype)
        self.noise_refiner = nn.ModuleList(
            [JointBlock(cfg, True, operations, device, dtype) for _ in range(cfg.n_refiner_layers)]
        )
        self.context_refiner = nn.ModuleList(
            [JointBlock(cfg, False, operations, device, dtype) for _ in range(cfg.n_refiner_layers)]
        )
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, operations, device, dtype)
        self.cap_embedder = nn.Sequential(
            RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps, device=device, dtype=dtype),
            operations.Linear(cfg.cap_feat_dim, cfg.dim, bias=True, device=device, dtype=dtype),
        )
        self.layers = nn.ModuleList([JointBlock(cfg, True, operations, device, dtype) for _ in range(cfg.n_layers)])
        # Built by the original but never used in its forward; the released checkpoint holds it.
        self.norm_final = RMSNorm(cfg.dim, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.final_layer = NextFinalLayer(cfg, operations, device, dtype)
        # The dtype activations are computed in. None: the weights' dtype (bf16 for fp8-stored weights).
        self.compute_dtype = None

    # ---------------------------------------------------------------------------------------------- text

    def rope_tables(self, device, cache=None):
        return cached(cache, ("tables", str(device)), lambda: rope_3d_tables(self.config, device))

    def image_grid(self, rows: int, cols: int, device, cache=None) -> torch.Tensor:
        """(row, column) of every image patch, [rows*cols, 2] int64, row by row."""
        return cached(cache, ("grid", rows, cols, str(device)), lambda: torch.stack(
            torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij"),
            dim=-1,
        ).reshape(rows * cols, 2))

    def prepare_text(self, cap_feats: torch.Tensor, cap_mask: torch.Tensor) -> JointText:
        """The caption embedding and the context refiners: everything the model derives from the text alone."""
        cfg = self.config
        if cap_feats.ndim != 3 or cap_feats.shape[-1] != cfg.cap_feat_dim:
            raise ValueError(
                f"text features have shape {tuple(cap_feats.shape)}, expected [batch, tokens, {cfg.cap_feat_dim}] "
                f"(this {self.dit_title}'s cap_feat_dim); {self.text_hint}"
            )
        if cap_mask.shape != cap_feats.shape[:2]:
            raise ValueError(f"cap_mask shape {tuple(cap_mask.shape)} does not match features {tuple(cap_feats.shape)}")
        dtype = self.get_compute_dtype()
        mask = cap_mask.to(device=cap_feats.device, dtype=torch.bool)
        lengths = mask.sum(dim=1)
        if not torch.compiler.is_compiling():
            longest, limit = int(lengths.max()), cfg.axes_lens[0] - 1
            if not bool((lengths > 0).all()):
                raise ValueError("every prompt needs at least one real token in cap_mask (Gemma's BOS counts)")
            if longest > limit:
                raise ValueError(
                    f"a caption of {longest} tokens is longer than this {self.dit_title} can place: its RoPE table "
                    f"has {cfg.axes_lens[0]} caption positions, so at most {limit} tokens. Shorten the prompt (the "
                    f"original text encoder stops at 256 tokens)."
                )
        text = JointText(cap=cap_feats, mask=mask, lengths=lengths)
        tables = self.rope_tables(cap_feats.device, text.rope_cache)
        # Caption token j at (j, 0, 0); padding at (0, 0, 0), as the original.
        positions = torch.zeros(*mask.shape, 3, dtype=torch.long, device=mask.device)
        positions[..., 0] = torch.arange(mask.shape[1], device=mask.device) * mask
        cos, sin = rope_3d_cos_sin(tables, positions)
        cap = self.cap_embedder[1](self.cap_embedder[0](cap_feats.to(dtype)))
        key_mask = _key_mask(mask)
        for layer in self.context_refiner:
            cap = layer(cap, key_mask, cos, sin)
        text.cap = cap
        return text

    # ---------------------------------------------------------------------------------------------- image

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]: patch vectors ordered (pH, pW, C), tokens row by row."""
        b, c, h, w = x.shape
        p = self.config.patch_size
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p = self.config.patch_size
        return from_patches(x.view(x.shape[0], h // p, w // p, -1), p, self.config.out_channels)

    def check_size(self, h: int, w: int) -> None:
        p, (_, rows, cols) = self.config.patch_size, self.config.axes_lens
        if h // p > rows or w // p > cols:
            raise ValueError(
                f"a latent of {h}x{w} ({h * 8}x{w * 8} pixels) has {h // p}x{w // p} patches; this {self.dit_title}'s "
                f"RoPE tables place at most {rows}x{cols} ({rows * p * 8}x{cols * p * 8} pixels). Choose a smaller "
                f"image size (Lumina-Image-2.0 was trained at 1024x1024)."
            )

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, t: torch.Tensor, cap_feats: Optional[torch.Tensor] = None,
                cap_mask: Optional[torch.Tensor] = None, *, text: Optional[JointText] = None) -> torch.Tensor:
        """Velocity (data - noise) [B, 16, H, W] in x's dtype; t [B] in [0, 1], 0 = noise; cap_feats [B, L, 2304]
        Gemma-2-2B features with cap_mask [B, L] (True on real tokens, right-padded), or the text already prepared
        (`text=`, from prepare_text: a wrapper of the module's call such as `torch.compile(model)` then runs the
        per-step work alone)."""
        return self.forward_with_text(x, t, self.text_context(cap_feats, cap_mask, text))

    def forward_with_text(self, x: torch.Tensor, t: torch.Tensor, text: JointText) -> torch.Tensor:
        cfg = self.config
        b, _, h, w = x.shape
        t = self.check_latent(x, t, text.batch)
        self.check_size(h, w)
        out_dtype = x.dtype
        dtype = self.get_compute_dtype()
        device = x.device
        p = cfg.patch_size
        rows, cols = h // p, w // p
        n_img, n_cap = rows * cols, text.cap.shape[1]
        lengths = text.lengths.to(device)
        tables = self.rope_tables(device, text.rope_cache)

        c = self.t_embedder(t, dtype)

        # The image alone: (cap_len, r, c) positions, the noise refiners.
        grid = self.image_grid(rows, cols, device, text.rope_cache)
        img_pos = torch.cat([lengths[:, None, None].expand(b, n_img, 1), grid[None].expand(b, n_img, 2)], dim=-1)
        cos, sin = rope_3d_cos_sin(tables, img_pos)
        img = self.x_embedder(self.patchify(x.to(dtype)))
        for layer in self.noise_refiner:
            img = layer(img, None, cos, sin, c)

        # The joint sequence: row j of sample i is caption token j (j < len_i), image token j - len_i, or padding.
        cap_pos = torch.zeros(b, n_cap, 3, dtype=torch.long, device=device)
        cap_pos[..., 0] = torch.arange(n_cap, device=device)
        joint = torch.arange(n_cap + n_img, device=device)[None].expand(b, -1)
        in_cap = joint < lengths[:, None]
        in_img = ~in_cap & (joint < lengths[:, None] + n_img)
        source = torch.where(in_cap, joint, torch.where(in_img, n_cap + joint - lengths[:, None], n_cap + n_img))
        pad = torch.zeros(b, 1, cfg.dim, dtype=dtype, device=device)
        seq = torch.cat([text.cap.to(dtype), img, pad], dim=1).gather(1, source[..., None].expand(-1, -1, cfg.dim))
        pos = torch.cat([cap_pos, img_pos, torch.zeros(b, 1, 3, dtype=torch.long, device=device)], dim=1)
        pos = pos.gather(1, source[..., None].expand(-1, -1, 3))
        cos, sin = rope_3d_cos_sin(tables, pos)
        key_mask = _key_mask(in_cap | in_img)
        for layer in self.layers:
            seq = layer(seq, key_mask, cos, sin, c)
        out = self.final_layer(seq, c)

        # Sample i's image rows start at its caption length.
        rows_of_image = lengths[:, None] + torch.arange(n_img, device=device)[None]
        out = out.gather(1, rows_of_image[..., None].expand(-1, -1, out.shape[-1]))
        return self.unpatchify(out, h, w)[:, : cfg.in_channels].to(out_dtype)


def unified_next_dit_extrapolation_kwargs(mode: str, latent_h: int, latent_w: int, t: float, watershed: float) -> dict:
    """No keywords: the original parses resolution-extrapolation options but applies none to this model, so every
    mode runs the plain model (sizes are limited by the RoPE tables, 512 patches per side)."""
    return {}


def parameter_count(config: UnifiedNextDiTConfig) -> int:
    with torch.device("meta"):
        return sum(math.prod(p.shape) for p in UnifiedNextDiT(config).parameters())
