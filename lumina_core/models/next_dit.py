"""The Lumina-Next Next-DiT: Flag-DiT's attention and feed-forward with sandwich norms, 2-D RoPE and tanh gates.

Follows `lumina_next_t2i/models/model.py` of Alpha-VLLM/Lumina-T2X (commit 1c60696; SPEC.md §8) without fairscale
or flash-attn. Parameter names equal the original checkpoint's keys (`load_state_dict(strict=True)`); the diffusers
layout is mapped onto them by `lumina_core.weights.layouts`. Time convention as everywhere in this package:
t = 0 is noise, t = 1 is data; the model predicts the velocity data - noise.

What it shares with the Flag-DiT (`lumina_core.models.blocks`): the attention module (q/k LayerNorm over all heads, RoPE'd
queries that also attend to the gated caption keys, grouped-query heads), the SwiGLU feed-forward, the timestep
embedder and the once-per-generation text context.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Attention, FeedForward, TextConditionedDiT, TextContext, cached
from .config import TRAINED_SIDE, TRAINED_SIZE, NextDiTConfig
from .layers import RMSNorm, from_patches, gated, proportional_attention_scale, rope_2d_cos_sin, to_patches


def time_aware_rope_factors(t: float, scale_factor: float, scale_watershed: float) -> tuple[float, float]:
    """(ntk_factor, linear_factor) of Lumina-Next's time-aware scaling at time t (0 = noise).

    Before the watershed (the noisy start) positions are scaled linearly, from it on theta is scaled (NTK); at
    t == watershed NTK, as the original's `timestep < scale_watershed` test.
    """
    if t < scale_watershed:
        return 1.0, scale_factor
    return scale_factor, 1.0


def decide_rope_factors(kwargs: dict, t: float) -> dict:
    """The keywords of one step with the time-aware switch decided at t: scale_factor and scale_watershed replaced
    by the ntk_factor and linear_factor they give at that t (the rest kept), so that the forward does not read t.

    t is the value the forward would read, the first sample's t as a float (one t per step); keywords without a
    scale_factor (nothing to decide) come back unchanged.
    """
    kwargs = dict(kwargs)
    if "scale_factor" not in kwargs:
        return kwargs
    ntk, linear = time_aware_rope_factors(t, kwargs.pop("scale_factor"), kwargs.pop("scale_watershed", 1.0))
    kwargs.update(ntk_factor=ntk, linear_factor=linear)
    return kwargs


def _modulate(x: torch.Tensor, scale: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """x * (1 + scale) per sample; inplace: in x, a fresh tensor of the caller's (inference)."""
    return x.mul_(1 + scale.unsqueeze(1)) if inplace else x * (1 + scale.unsqueeze(1))


class NextDiTBlock(nn.Module):
    def __init__(self, cfg: NextDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        norm = dict(eps=cfg.norm_eps, device=device, dtype=dtype)
        self.attention = Attention(cfg, operations, device, dtype)
        self.feed_forward = FeedForward(cfg, operations, device, dtype)
        self.attention_norm1 = RMSNorm(cfg.dim, **norm)
        self.ffn_norm1 = RMSNorm(cfg.dim, **norm)
        self.attention_norm2 = RMSNorm(cfg.dim, **norm)
        self.ffn_norm2 = RMSNorm(cfg.dim, **norm)
        self.attention_y_norm = RMSNorm(cfg.cap_feat_dim, **norm)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(cfg.adaln_dim, 4 * cfg.dim, bias=True, device=device, dtype=dtype)
        )

    def text_kv(self, cap_feats: torch.Tensor):
        return self.attention.text_kv(self.attention_y_norm(cap_feats))

    def forward(self, x, c, cos, sin, softmax_scale, text_k, text_v, text_mask, region_weights=None):
        # adaLN without shift; the gates pass through tanh; each branch is normed before and after (sandwich).
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        inplace = not torch.is_grad_enabled()  # at inference the norms' fresh outputs are scaled and gated in place
        h = self.attention(
            _modulate(self.attention_norm1(x), scale_msa, inplace), cos, sin, softmax_scale, text_k, text_v,
            text_mask, region_weights,
        )
        x = x + gated(self.attention_norm2(h), gate_msa.tanh(), inplace=inplace)
        h = self.feed_forward(_modulate(self.ffn_norm1(x), scale_mlp, inplace))
        return x + gated(self.ffn_norm2(h), gate_mlp.tanh(), inplace=inplace)


class NextFinalLayer(nn.Module):
    def __init__(self, cfg: NextDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        self.linear = operations.Linear(
            cfg.dim, cfg.patch_size**2 * cfg.out_channels, bias=True, device=device, dtype=dtype
        )
        # Scale only (no shift), unlike the Flag-DiT's final layer.
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(cfg.adaln_dim, cfg.dim, bias=True, device=device, dtype=dtype)
        )

    def forward(self, x, c):
        scale = self.adaLN_modulation(c)
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)  # norm_final: no affine
        return self.linear(_modulate(normed, scale))


class NextDiT(TextConditionedDiT):
    family = "lumina_next"
    dit_title = "Next-DiT"
    text_hint = "Lumina-Next needs Gemma-2B features"
    bos_hint = "Gemma's BOS counts"

    def __init__(self, config: NextDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        if operations is None:
            operations = nn
        self.config = cfg = config
        self.build_embedders(cfg, operations, device, dtype)
        self.layers = nn.ModuleList([NextDiTBlock(cfg, operations, device, dtype) for _ in range(cfg.n_layers)])
        self.final_layer = NextFinalLayer(cfg, operations, device, dtype)
        # Pads images of different sizes in one training batch; a same-size batch never uses it.
        self.pad_token = nn.Parameter(torch.empty(cfg.dim, device=device, dtype=dtype))
        if self.pad_token.device.type != "meta":
            nn.init.normal_(self.pad_token, std=0.02)

    def rope(self, rows, cols, *, ntk_factor=1.0, linear_factor=1.0, device=None, cache=None):
        key = (rows, cols, float(ntk_factor), float(linear_factor), str(device))
        return cached(cache, key, lambda: rope_2d_cos_sin(
            rows, cols, self.config.head_dim, theta=self.config.rope_theta, ntk_factor=ntk_factor,
            linear_factor=linear_factor, device=device,
        ))

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, (H/p)*(W/p), dim]; each patch vector ordered (C, pH, pW), rows first."""
        return self.x_embedder(to_patches(x, self.config.patch_size)).flatten(1, 2)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens [B, L, p*p*out] ordered (pH, pW, C) -> [B, out, H, W]."""
        p = self.config.patch_size
        return from_patches(x.view(x.shape[0], h // p, w // p, -1), p, self.config.out_channels)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cap_feats: Optional[torch.Tensor] = None,
        cap_mask: Optional[torch.Tensor] = None,
        *,
        text: Optional[TextContext] = None,
        scale_factor: float = 1.0,
        scale_watershed: float = 1.0,
        proportional_attn: bool = False,
        base_seqlen: Optional[int] = None,
        ntk_factor: Optional[float] = None,
        linear_factor: Optional[float] = None,
    ) -> torch.Tensor:
        """Velocity (data - noise) of the in_channels latent channels, in x's dtype.

        The keywords mean what they mean in the original `forward_with_cfg`: RoPE scaling by scale_factor, linear
        while t < scale_watershed and NTK from it on (t of the first sample: one t per step); proportional attention
        scales the self-attention logits by sqrt(log_base_seqlen(N) / head_dim) for N image tokens.

        ntk_factor and linear_factor give the RoPE scaling already decided (`decide_rope_factors`), instead of
        scale_factor and scale_watershed: the forward then does not read t to choose (no graph break under
        torch.compile). Either form, not both.

        The text comes as features and mask, or already prepared (`text=`, from prepare_text), which lets a wrapper
        of the module's call, such as `torch.compile(model)`, run the per-step work while the text work stays done
        once per generation.
        """
        text = self.text_context(cap_feats, cap_mask, text)
        return self.forward_with_text(
            x,
            t,
            text,
            scale_factor=scale_factor,
            scale_watershed=scale_watershed,
            proportional_attn=proportional_attn,
            base_seqlen=base_seqlen,
            ntk_factor=ntk_factor,
            linear_factor=linear_factor,
        )

    def forward_with_text(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: TextContext,
        *,
        scale_factor: float = 1.0,
        scale_watershed: float = 1.0,
        proportional_attn: bool = False,
        base_seqlen: Optional[int] = None,
        ntk_factor: Optional[float] = None,
        linear_factor: Optional[float] = None,
    ) -> torch.Tensor:
        cfg = self.config
        b, _, h, w = x.shape
        t = self.check_inputs(x, t, text)
        out_dtype = x.dtype
        dtype = self.get_compute_dtype()

        if ntk_factor is not None or linear_factor is not None:
            if scale_factor != 1.0:
                raise ValueError(
                    "give the RoPE scaling either as scale_factor/scale_watershed (decided at t) or as "
                    "ntk_factor/linear_factor (already decided), not both"
                )
            ntk = 1.0 if ntk_factor is None else ntk_factor
            linear = 1.0 if linear_factor is None else linear_factor
        elif scale_factor == 1.0:
            ntk, linear = 1.0, 1.0  # no scaling either side of the watershed: t need not be read
        else:
            # Reads t (a tensor -> Python float: a graph break under torch.compile, where the caller decides the
            # switch ahead with decide_rope_factors).
            ntk, linear = time_aware_rope_factors(float(t.reshape(-1)[0]), scale_factor, scale_watershed)
        rows, cols = h // cfg.patch_size, w // cfg.patch_size
        cos, sin = self.rope(rows, cols, ntk_factor=ntk, linear_factor=linear, device=x.device, cache=text.rope_cache)
        if proportional_attn:
            if base_seqlen is None:
                raise ValueError("proportional_attn needs base_seqlen (4096 for Lumina-Next at 1024x1024)")
            softmax_scale = proportional_attention_scale(rows * cols, cfg.head_dim, base_seqlen)
        else:
            softmax_scale = 1.0 / math.sqrt(cfg.head_dim)

        tokens = self.patchify(x.to(dtype))
        out = self.unpatchify(self.run_layers(tokens, t, text, cos, sin, softmax_scale, dtype), h, w)
        return out[:, : cfg.in_channels].to(out_dtype)


def next_dit_extrapolation_kwargs(mode: str, latent_h: int, latent_w: int, t: float, watershed: float) -> dict:
    """Keywords of NextDiT.forward for an image of latent size (latent_h, latent_w), as the Lumina-Next demo sets them.

    "time_aware" (its default): proportional attention with base_seqlen (1024/16)^2 = 4096 image tokens, and, only
    for images larger than the trained 1024x1024 area, scale_factor = sqrt(W*H)/1024 with the given watershed (the
    model switches from linear to NTK RoPE scaling there). "t2i": the same scale as NTK at every step, as Lumina-T2I
    scales (no time-aware switch). "off": the plain model. t is unused: the keywords are the demo's, which the
    Next-DiT's forward decides at its t; `decide_rope_factors(kwargs, t)` decides them ahead (what the ComfyUI MODEL
    path does, so that a compiled forward does not read t).
    """
    if mode == "off":
        return {}
    area_scale = math.sqrt(latent_h * 8 * latent_w * 8) / TRAINED_SIZE
    kwargs = {"proportional_attn": True, "base_seqlen": TRAINED_SIDE * TRAINED_SIDE}
    if area_scale <= 1.0:
        return kwargs
    if mode == "time_aware":
        kwargs.update(scale_factor=area_scale, scale_watershed=watershed)
    elif mode == "t2i":
        kwargs.update(scale_factor=area_scale, scale_watershed=0.0)
    else:
        raise ValueError(f"unknown extrapolation {mode!r}; choose one of t2i, time_aware, off")
    return kwargs
