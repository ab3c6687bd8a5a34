"""The Lumina-T2I Flag-DiT: a DiT with LLaMA-style blocks and gated text cross-attention.

Follows `lumina_t2i/models/model.py` of Alpha-VLLM/Lumina-T2X (commit 1c60696), without its fairscale, flash-attn
and apex dependencies. Parameter names equal the released checkpoint's keys, so the released state dict loads with
`strict=True`. Time convention: t = 0 is noise, t = 1 is data; the model predicts the velocity data - noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .casting import is_fp8
from .config import FlagDiTConfig
from .layers import (
    FP32LayerNorm,
    RMSNorm,
    apply_rope,
    modulate,
    proportional_attention_scale,
    repeat_kv,
    rope_cos_sin,
    timestep_embedding,
)


@dataclass
class TextContext:
    """Everything the model derives from the text alone: computed once per generation, reused at every step."""

    cap_emb: torch.Tensor  # [B, adaln_dim] pooled caption embedding
    text_kv: list  # per layer (keys, values), each [B, n_kv_heads, L_text, head_dim]
    text_mask: torch.Tensor  # [B, 1, 1, L_text] bool, True on real tokens
    rope_cache: dict = field(default_factory=dict)  # (seq_len, ntk, scaling, device) -> (cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: FlagDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        kv_dim = self.n_kv_heads * self.head_dim
        kw = dict(bias=False, device=device, dtype=dtype)
        self.wq = operations.Linear(cfg.dim, cfg.dim, **kw)
        self.wk = operations.Linear(cfg.dim, kv_dim, **kw)
        self.wv = operations.Linear(cfg.dim, kv_dim, **kw)
        self.wk_y = operations.Linear(cfg.cap_feat_dim, kv_dim, **kw)
        self.wv_y = operations.Linear(cfg.cap_feat_dim, kv_dim, **kw)
        self.gate = nn.Parameter(torch.zeros(cfg.n_heads, device=device, dtype=dtype))
        self.wo = operations.Linear(cfg.dim, cfg.dim, **kw)
        if cfg.qk_norm:
            # One LayerNorm over the whole projection, before the split into heads (not a per-head norm).
            self.q_norm = FP32LayerNorm(cfg.dim, device=device, dtype=dtype)
            self.k_norm = FP32LayerNorm(kv_dim, device=device, dtype=dtype)
            self.ky_norm = FP32LayerNorm(kv_dim, device=device, dtype=dtype)
        else:
            self.q_norm = self.k_norm = self.ky_norm = nn.Identity()
        # Attention slicing: None computes all queries at once; an int computes the attention in chunks of that
        # many queries (each query's softmax is independent of the others, so the result is the same) to bound the
        # memory of attention kernels that materialise the score matrix. Set through FlagDiT.set_attention_slicing.
        self.query_chunk: Optional[int] = None

    def text_kv(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the (already RMS-normed) text features: [B, n_kv_heads, L_text, head_dim]."""
        b, l, _ = y.shape
        dtype = y.dtype
        yk = self.ky_norm(self.wk_y(y)).to(dtype).view(b, l, self.n_kv_heads, self.head_dim)
        yv = self.wv_y(y).view(b, l, self.n_kv_heads, self.head_dim)
        return yk.transpose(1, 2), yv.transpose(1, 2)

    def forward(self, x, cos, sin, softmax_scale, text_k, text_v, text_mask):
        b, l, _ = x.shape
        dtype = x.dtype
        n_rep = self.n_heads // self.n_kv_heads
        q = self.q_norm(self.wq(x)).view(b, l, self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x)).view(b, l, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, l, self.n_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin).to(dtype).transpose(1, 2)  # [B, H, L, D]
        k = apply_rope(k, cos, sin).to(dtype).transpose(1, 2)
        v = v.transpose(1, 2)

        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        text_k, text_v = repeat_kv(text_k, n_rep), repeat_kv(text_v, n_rep)
        gate = self.gate.to(device=x.device, dtype=dtype).tanh().view(1, -1, 1, 1)
        chunk = self.query_chunk if self.query_chunk is not None and self.query_chunk < l else l
        parts = []
        for start in range(0, l, chunk):
            qc = q[:, :, start : start + chunk]
            # Image tokens attend to each other (same-size batch: no padding, no mask).
            out = F.scaled_dot_product_attention(qc, k, v, scale=softmax_scale)
            # The rotated queries attend to the unrotated text keys, default scale, gated per head by tanh(gate).
            out_y = F.scaled_dot_product_attention(qc, text_k, text_v, attn_mask=text_mask)
            parts.append(out + out_y * gate)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return self.wo(out.transpose(1, 2).reshape(b, l, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: FlagDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        hidden = cfg.ffn_hidden_dim
        self.w1 = operations.Linear(cfg.dim, hidden, **kw)
        self.w2 = operations.Linear(hidden, cfg.dim, **kw)
        self.w3 = operations.Linear(cfg.dim, hidden, **kw)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


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

    def forward(self, x, c, cos, sin, softmax_scale, text_k, text_v, text_mask):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = modulate(self.attention_norm(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * self.attention(h, cos, sin, softmax_scale, text_k, text_v, text_mask)
        h = modulate(self.ffn_norm(x), shift_mlp, scale_mlp)
        x = x + gate_mlp.unsqueeze(1) * self.feed_forward(h)
        return x


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, operations=nn, device=None, dtype=None, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            operations.Linear(freq_dim, hidden, bias=True, device=device, dtype=dtype),
            nn.SiLU(),
            operations.Linear(hidden, hidden, bias=True, device=device, dtype=dtype),
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))


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


class TextConditionedDiT(nn.Module):
    """What the Lumina DiTs share around their text: the compute dtype and the text work done once per generation
    (masked-mean caption pooling into the adaLN embedding, every layer's caption keys and values).

    Subclasses have `config.cap_feat_dim`, `x_embedder`, `cap_embedder`, `layers` (each with `text_kv`) and set
    `dit_title` and `text_hint` for their error messages.
    """

    dit_title = "DiT"
    text_hint = "use the text encoder the model was trained with"
    bos_hint = "BOS counts"

    def get_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        dtype = self.x_embedder.weight.dtype
        return torch.bfloat16 if is_fp8(dtype) else dtype  # fp8 is storage only, never a compute dtype

    def check_inputs(self, x: torch.Tensor, t, text: TextContext) -> torch.Tensor:
        """Refuse a latent of the wrong channels, size or batch; returns t as a [B] tensor on x's device."""
        cfg = self.config
        b, c, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"latent has {c} channels, this {self.dit_title} expects {cfg.in_channels} (an SDXL-VAE latent)"
            )
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"latent size {h}x{w} is not a multiple of the patch size {cfg.patch_size} "
                f"(image sizes must be multiples of {8 * cfg.patch_size} pixels)"
            )
        if text.cap_emb.shape[0] != b:
            raise ValueError(f"batch of {b} latents but {text.cap_emb.shape[0]} text conditions")
        t = torch.as_tensor(t, device=x.device)
        return t.expand(b) if t.ndim == 0 else t

    def prepare_text(self, cap_feats: torch.Tensor, cap_mask: torch.Tensor) -> TextContext:
        """Caption pooling and embedding, and every layer's text keys and values."""
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
        # A data-dependent check: skipped while torch.compile traces (it would break the graph), kept in eager mode.
        if not torch.compiler.is_compiling() and not bool(mask.any(dim=1).all()):
            raise ValueError(f"every prompt needs at least one real token in cap_mask ({self.bos_hint})")
        # Masked mean over the real tokens, in fp32.
        m = mask.unsqueeze(-1).float()
        pooled = (cap_feats.float() * m).sum(dim=1) / m.sum(dim=1)
        cap_emb = self.cap_embedder[1](self.cap_embedder[0](pooled).to(dtype))
        feats = cap_feats.to(dtype)
        text_kv = [layer.text_kv(feats) for layer in self.layers]
        return TextContext(cap_emb=cap_emb, text_kv=text_kv, text_mask=mask[:, None, None, :])


class FlagDiT(TextConditionedDiT):
    family = "lumina_t2i"
    dit_title = "Flag-DiT"
    bos_hint = "BOS and EOS count"

    def __init__(self, config: FlagDiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        if operations is None:
            operations = nn
        self.config = cfg = config
        self.x_embedder = operations.Linear(
            cfg.patch_size**2 * cfg.in_channels, cfg.dim, bias=True, device=device, dtype=dtype
        )
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, operations, device, dtype)
        self.cap_embedder = nn.Sequential(
            FP32LayerNorm(cfg.cap_feat_dim, device=device, dtype=dtype),
            operations.Linear(cfg.cap_feat_dim, cfg.adaln_dim, bias=True, device=device, dtype=dtype),
        )
        self.layers = nn.ModuleList(
            [TransformerBlock(cfg, operations, device, dtype) for _ in range(cfg.n_layers)]
        )
        self.final_layer = FinalLayer(cfg, operations, device, dtype)
        self.eol_token = nn.Parameter(torch.empty(cfg.dim, device=device, dtype=dtype))
        self.pad_token = nn.Parameter(torch.empty(cfg.dim, device=device, dtype=dtype))
        if self.eol_token.device.type != "meta":
            nn.init.normal_(self.eol_token, std=0.02)
            nn.init.normal_(self.pad_token, std=0.02)
        # The dtype activations are computed in. None: the weights' dtype (bf16 for fp8-stored weights).
        self.compute_dtype: Optional[torch.dtype] = None

    def rope(self, seq_len, *, ntk_factor=1.0, rope_scaling_factor=None, device=None, cache=None):
        scaling = self.config.rope_scaling_factor if rope_scaling_factor is None else rope_scaling_factor
        key = (seq_len, float(ntk_factor), float(scaling), str(device))
        if cache is not None and key in cache:
            return cache[key]
        cos_sin = rope_cos_sin(
            seq_len,
            self.config.head_dim,
            theta=self.config.rope_theta,
            ntk_factor=ntk_factor,
            scaling_factor=scaling,
            device=device,
        )
        if cache is not None:
            cache[key] = cos_sin
        return cos_sin

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> tokens [B, (H/p)*(W/p + 1), dim]: patches ordered (C, pH, pW), an eol token per row."""
        p = self.config.patch_size
        b, c, h, w = x.shape
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3)
        x = self.x_embedder(x)
        eol = self.eol_token.to(device=x.device, dtype=x.dtype).view(1, 1, 1, -1).expand(b, h // p, 1, -1)
        return torch.cat([x, eol], dim=2).flatten(1, 2)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Tokens [B, L, p*p*out] ordered (pH, pW, C) -> [B, out, H, W], eol column dropped."""
        p = self.config.patch_size
        b = x.shape[0]
        x = x.view(b, h // p, w // p + 1, p, p, self.config.out_channels)[:, :, :-1]
        return x.permute(0, 5, 1, 3, 2, 4).reshape(b, self.config.out_channels, h, w)

    def set_attention_slicing(self, query_chunk: Optional[int]) -> None:
        """Compute every attention in chunks of `query_chunk` queries (None: all at once); same result, less memory
        for kernels that hold the whole score matrix."""
        if query_chunk is not None and (not isinstance(query_chunk, int) or query_chunk < 1):
            raise ValueError(f"query_chunk must be a positive int or None, got {query_chunk!r}")
        for layer in self.layers:
            layer.attention.query_chunk = query_chunk

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

        c_vec = self.t_embedder(t, dtype) + text.cap_emb.to(dtype)
        for layer, (text_k, text_v) in zip(self.layers, text.text_kv):
            tokens = layer(tokens, c_vec, cos, sin, scale, text_k, text_v, text.text_mask)
        out = self.unpatchify(self.final_layer(tokens, c_vec), h, w)
        return out[:, : cfg.in_channels].to(out_dtype)


@torch.no_grad()
def init_random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with seeded random values of a sensible scale (smoke tests and tiny test models).

    Unlike the training initialisation, nothing is left at zero (adaLN, the final layer and the text gates are
    zero-initialised there), so every path of the model affects the output.
    """
    gen = torch.Generator("cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if param.ndim == 2:
            value = noise / math.sqrt(param.shape[1])
        elif name.endswith("norm.weight") or name.endswith("cap_embedder.0.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith("attention.gate"):
            value = noise
        else:
            value = 0.1 * noise
        param.copy_(value.to(param.dtype))
    return model
