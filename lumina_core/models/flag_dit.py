"""The Lumina-T2I Flag-DiT: a DiT with LLaMA-style blocks and gated text cross-attention.

Follows `lumina_t2i/models/model.py` of Alpha-VLLM/Lumina-T2X (commit 1c60696; SPEC.md §2, §6), without its
fairscale, flash-attn and apex dependencies. Parameter names equal the released checkpoint's keys, so the released
state dict loads with `strict=True`. Time convention: t = 0 is noise, t = 1 is data; the model predicts the velocity
data - noise. `extrapolation_kwargs` is the family's rule for larger images (its demo's NTK and proportional
attention), which the sampler receives from the registry.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Attention, FeedForward, TextConditionedDiT, TextContext, cached
from .config import PATCH, TRAINED_SIDE, TRAINED_SIZE, VAE_FACTOR, FlagDiTConfig
from .layers import (
    RMSNorm,
    from_patches,
    gated,
    modulate,
    proportional_attention_scale,
    rope_cos_sin,
    to_patches,
)
from .regions import token_weights

EXTRAPOLATIONS = ("t2i", "time_aware", "off")


def extrapolation_kwargs(
    extrapolation: str, latent_h: int, latent_w: int, t: float, *, watershed: float = 0.3
) -> dict:
    """Keyword arguments for the Flag-DiT at latent size (latent_h, latent_w) and time t.

    "t2i" (the Lumina-T2I demo's default): NTK factor = token count / trained token count, proportional attention
    with base (1024/16)^2 + 2*(1024/16) = 4224 (the eol tokens included).
    "time_aware" (Lumina-Next): above the trained area, scale = sqrt(H*W)/1024, with linear position scaling
    before the watershed (t < watershed: the noisy start) and NTK after it; at or below it no RoPE scaling (as
    Lumina-Next, which scales only when extrapolating). Proportional attention with base (1024/16)^2 = 4096.
    "off": the plain model.
    """
    side = TRAINED_SIDE
    if extrapolation == "off":
        return {}
    if extrapolation == "t2i":
        ntk = (latent_h // PATCH) * (latent_w // PATCH) / side**2
        return {"ntk_factor": ntk, "proportional_attn": True, "base_seqlen": side * side + 2 * side}
    if extrapolation == "time_aware":
        scale = max(1.0, math.sqrt(latent_h * VAE_FACTOR * latent_w * VAE_FACTOR) / TRAINED_SIZE)
        kwargs = {"proportional_attn": True, "base_seqlen": side * side}
        if t < watershed:
            kwargs.update(rope_scaling_factor=scale, ntk_factor=1.0)
        else:
            kwargs.update(rope_scaling_factor=1.0, ntk_factor=scale)
        return kwargs
    raise ValueError(f"unknown extrapolation {extrapolation!r}; choose one of {', '.join(EXTRAPOLATIONS)}")


def family_extrapolation(mode: str, latent_h: int, latent_w: int, t: float, watershed: float) -> dict:
    """The registry's form of `extrapolation_kwargs` (all arguments positional)."""
    return extrapolation_kwargs(mode, latent_h, latent_w, t, watershed=watershed)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: FlagDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        self.attention = Attention(cfg, operations, device, dtype)
        self.feed_forward = FeedForward(cfg, operations, device, dtype)
        self.attention_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.ffn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.attention_y_norm = RMSNorm(cfg.cap_feat_dim, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(cfg.adaln_dim, 6 * cfg.dim, bias=True, device=device, dtype=dtype)
        )

    def text_kv(self, cap_feats: torch.Tensor):
        return self.attention.text_kv(self.attention_y_norm(cap_feats))

    def forward(self, x, c, cos, sin, softmax_scale, text_k, text_v, text_mask, region_weights=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # At inference the norms' and branches' outputs, fresh tensors of this block, are modulated and gated in
        # place: the same values, with fewer activation-sized tensors made (and left as holes in the CPU's heap).
        inplace = not torch.is_grad_enabled()
        h = modulate(self.attention_norm(x), shift_msa, scale_msa, inplace=inplace)
        h = self.attention(h, cos, sin, softmax_scale, text_k, text_v, text_mask, region_weights)
        x = x + gated(h, gate_msa, inplace=inplace)
        h = modulate(self.ffn_norm(x), shift_mlp, scale_mlp, inplace=inplace)
        h = self.feed_forward(h)
        return x + gated(h, gate_mlp, inplace=inplace)


class FinalLayer(nn.Module):
    def __init__(self, cfg: FlagDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        self.linear = operations.Linear(
            cfg.dim, cfg.patch_size**2 * cfg.out_channels, bias=True, device=device, dtype=dtype
        )
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), operations.Linear(cfg.adaln_dim, 2 * cfg.dim, bias=True, device=device, dtype=dtype)
        )

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        # norm_final: LayerNorm without affine parameters, eps 1e-6 (it holds no checkpoint keys).
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6).to(x.dtype)
        return self.linear(modulate(normed, shift, scale))


class FlagDiT(TextConditionedDiT):
    family = "lumina_t2i"
    dit_title = "Flag-DiT"
    bos_hint = "BOS and EOS count"

    def __init__(self, config: FlagDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        if operations is None:
            operations = nn
        self.config = cfg = config
        self.build_embedders(cfg, operations, device, dtype)
        self.layers = nn.ModuleList(
            [TransformerBlock(cfg, operations, device, dtype) for _ in range(cfg.n_layers)]
        )
        self.final_layer = FinalLayer(cfg, operations, device, dtype)
        self.eol_token = nn.Parameter(torch.empty(cfg.dim, device=device, dtype=dtype))
        self.pad_token = nn.Parameter(torch.empty(cfg.dim, device=device, dtype=dtype))
        if self.eol_token.device.type != "meta":
            nn.init.normal_(self.eol_token, std=0.02)
            nn.init.normal_(self.pad_token, std=0.02)

    def rope(self, seq_len, *, ntk_factor=1.0, rope_scaling_factor=None, device=None, cache=None):
        scaling = self.config.rope_scaling_factor if rope_scaling_factor is None else rope_scaling_factor
        key = (seq_len, float(ntk_factor), float(scaling), str(device))
        return cached(cache, key, lambda: rope_cos_sin(
            seq_len, self.config.head_dim, theta=self.config.rope_theta, ntk_factor=ntk_factor,
            scaling_factor=scaling, device=device,
        ))

    def region_token_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Region weights per token (text by region, an extension of Lumina-Next's compositional generation to the
        Flag-DiT): each patch's mean weight, and each row's end-of-line token the mean of its row."""
        return token_weights(weights, self.config.patch_size, end_of_line=True)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, (H/p)*(W/p + 1), dim]: patches ordered (C, pH, pW), an eol token per row."""
        b, _, h, w = x.shape
        x = self.x_embedder(to_patches(x, self.config.patch_size))
        eol = self.eol_token.to(device=x.device, dtype=x.dtype).view(1, 1, 1, -1).expand(b, x.shape[1], 1, -1)
        return torch.cat([x, eol], dim=2).flatten(1, 2)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens [B, L, p*p*out] ordered (pH, pW, C) -> [B, out, H, W], eol column dropped."""
        p = self.config.patch_size
        x = x.view(x.shape[0], h // p, w // p + 1, -1)[:, :, :-1]
        return from_patches(x, p, self.config.out_channels)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cap_feats: Optional[torch.Tensor] = None,
        cap_mask: Optional[torch.Tensor] = None,
        *,
        text: Optional[TextContext] = None,
        ntk_factor: float = 1.0,
        proportional_attn: bool = False,
        base_seqlen: Optional[int] = None,
        rope_scaling_factor: Optional[float] = None,
    ) -> torch.Tensor:
        """Velocity (data - noise) of the in_channels latent channels, in x's dtype.

        Takes the text either as features and mask, or already prepared (`text=`, from prepare_text): the second
        form lets a wrapper of the module's call, such as `torch.compile(model)`, run the per-step work while the
        text work stays done once per generation.
        """
        if text is None:
            if cap_feats is None or cap_mask is None:
                raise ValueError("give the text as cap_feats and cap_mask, or as text= from prepare_text")
            text = self.prepare_text(cap_feats, cap_mask)
        elif cap_feats is not None or cap_mask is not None:
            raise ValueError("give the text either as cap_feats/cap_mask or as text=, not both")
        return self.forward_with_text(
            x,
            t,
            text,
            ntk_factor=ntk_factor,
            proportional_attn=proportional_attn,
            base_seqlen=base_seqlen,
            rope_scaling_factor=rope_scaling_factor,
        )

    def forward_with_text(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: TextContext,
        *,
        ntk_factor: float = 1.0,
        proportional_attn: bool = False,
        base_seqlen: Optional[int] = None,
        rope_scaling_factor: Optional[float] = None,
    ) -> torch.Tensor:
        cfg = self.config
        b, _, h, w = x.shape
        t = self.check_inputs(x, t, text)
        out_dtype = x.dtype
        dtype = self.get_compute_dtype()

        tokens = self.patchify(x.to(dtype))
        seq_len = tokens.shape[1]
        cos, sin = self.rope(
            seq_len,
            ntk_factor=ntk_factor,
            rope_scaling_factor=rope_scaling_factor,
            device=x.device,
            cache=text.rope_cache,
        )
        if proportional_attn:
            if base_seqlen is None:
                raise ValueError("proportional_attn needs base_seqlen (4224 for Lumina-T2I at 1024x1024)")
            scale = proportional_attention_scale(seq_len, cfg.head_dim, base_seqlen)
        else:
            scale = 1.0 / math.sqrt(cfg.head_dim)

        # Handed over through a list emptied into the call, the patchified input is freed once the first layer ran.
        tokens = [tokens]
        out = self.unpatchify(self.run_layers(tokens.pop(), t, text, cos, sin, scale, dtype), h, w)
        return out[:, : cfg.in_channels].to(out_dtype)


