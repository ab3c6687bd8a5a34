"""The parts the Lumina DiTs are built from: attention (grouped-query heads, q/k norm over all heads, RoPE'd
queries that also attend to the gated caption keys), SwiGLU feed-forward, timestep embedder, and the base classes
holding the compute dtype, input checks, attention kernel and the once-per-generation text work.

Follows `lumina_t2i/models/model.py` and `lumina_next_t2i/models/model.py` of Alpha-VLLM/Lumina-T2X (commit
1c60696; SPEC.md §2, §8), without fairscale, flash-attn or apex. Every attention runs through one injectable
function (`layers.sdpa` by default; inside ComfyUI its optimized attention), as every linear layer is built through
an injectable `operations` namespace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import is_fp8
from .config import DiTConfig
from .layers import FP32LayerNorm, repeat_kv, rotated_heads, sdpa, timestep_embedding
from .regions import batch_regions, region_cross_attention, token_weights


@dataclass
class TextContext:
    """Everything the model derives from the text alone: computed once per generation, reused at every step."""

    cap_emb: torch.Tensor  # [B, adaln_dim] pooled caption embedding
    text_kv: list  # per layer (keys, values), each [B, n_kv_heads, L_text, head_dim]
    text_mask: torch.Tensor  # [B, 1, 1, L_text] bool, True on real tokens
    rope_cache: dict = field(default_factory=dict)  # (seq_len, ntk, scaling, device) -> (cos, sin)
    # Text by region (`prepare_regions`): [B, R, image tokens] weight of each region at each image token; text_kv
    # and text_mask then hold B*R captions, region r of sample b in row b*R + r. None: one caption per sample.
    region_weights: Optional[torch.Tensor] = None


def cached(cache: Optional[dict], key, compute: Callable):
    """cache[key], computed on first use (no cache: computed every time)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig, operations=nn, device=None, dtype=None):
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
        # The attention kernel: [B, H, L, D] q, k, v -> [B, H, L, D] (see layers.sdpa); ComfyUI injects its own.
        self.attention_fn = sdpa
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

    def forward(self, x, cos, sin, softmax_scale, text_k, text_v, text_mask, region_weights=None):
        b, l, _ = x.shape
        dtype = x.dtype
        n_rep = self.n_heads // self.n_kv_heads
        q = rotated_heads(self.wq(x), self.q_norm, self.n_heads, self.head_dim, cos, sin, dtype)  # [B, H, L, D]
        k = rotated_heads(self.wk(x), self.k_norm, self.n_kv_heads, self.head_dim, cos, sin, dtype)
        v = self.wv(x).view(b, l, self.n_kv_heads, self.head_dim).transpose(1, 2)

        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        text_k, text_v = repeat_kv(text_k, n_rep), repeat_kv(text_v, n_rep)
        gate = self.gate.to(device=x.device, dtype=dtype).tanh().view(1, -1, 1, 1)
        chunk = self.query_chunk if self.query_chunk is not None and self.query_chunk < l else l
        parts = []
        for start in range(0, l, chunk):
            qc = q[:, :, start : start + chunk]
            # Image tokens attend to each other (same-size batch: no padding, no mask).
            out = self.attention_fn(qc, k, v, scale=softmax_scale)
            # The rotated queries attend to the unrotated text keys, default scale, gated per head by tanh(gate).
            if region_weights is None:
                out_y = self.attention_fn(qc, text_k, text_v, mask=text_mask)
            else:  # each token to its regions' captions (lumina_core.models.regions)
                out_y = region_cross_attention(self.attention_fn, qc, text_k, text_v, text_mask,
                                               region_weights[:, :, start : start + chunk])
            # At inference in out_y, a fresh tensor (the same sum: out + out_y * gate).
            parts.append(out_y.mul_(gate).add_(out) if not torch.is_grad_enabled() else out + out_y * gate)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        del q, k, v, qc, out_y, parts  # the queries, keys and values are freed before the output projection runs
        return self.wo(out.transpose(1, 2).reshape(b, l, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: DiTConfig, operations=nn, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=False, device=device, dtype=dtype)
        hidden = cfg.ffn_hidden_dim
        self.w1 = operations.Linear(cfg.dim, hidden, **kw)
        self.w2 = operations.Linear(hidden, cfg.dim, **kw)
        self.w3 = operations.Linear(cfg.dim, hidden, **kw)

    def forward(self, x):
        if torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        # Inference: the hidden activations in place (the same values; one hidden-sized tensor fewer at a time). A
        # GGUF layer on the CPU multiplies its blocks of outputs straight into them: no w3(x) tensor at all.
        hidden = F.silu(self.w1(x), inplace=True)
        multiply_into = getattr(self.w3, "multiply_into", None)
        if multiply_into is not None:
            return self.w2(multiply_into(x, hidden))
        return self.w2(hidden.mul_(self.w3(x)))


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


class LuminaDiT(nn.Module):
    """What every Lumina DiT shares: the compute dtype, the input checks, the attention kernel and slicing.

    Subclasses have `config` (a DiTConfig), `x_embedder` and `layers` (each with an `attention`), and set
    `dit_title`, `latent_hint` and `text_hint` for their error messages.
    """

    family = ""
    dit_title = "DiT"
    latent_hint = "an SDXL-VAE latent"
    text_hint = "use the text encoder the model was trained with"

    def get_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        dtype = self.x_embedder.weight.dtype
        return torch.bfloat16 if is_fp8(dtype) else dtype  # fp8 is storage only, never a compute dtype

    def attention_modules(self):
        return [m for m in self.modules() if hasattr(m, "attention_fn")]

    def set_attention_function(self, fn: Optional[Callable] = None) -> None:
        """The kernel every attention of the model runs (q, k, v [B, H, L, D], mask=, scale=); None: torch SDPA."""
        for attention in self.attention_modules():
            attention.attention_fn = sdpa if fn is None else fn

    def set_attention_slicing(self, query_chunk: Optional[int]) -> None:
        """Compute every attention in chunks of `query_chunk` queries (None: all at once); same result, less memory
        for kernels that hold the whole score matrix."""
        if query_chunk is not None and (not isinstance(query_chunk, int) or query_chunk < 1):
            raise ValueError(f"query_chunk must be a positive int or None, got {query_chunk!r}")
        for attention in self.attention_modules():
            attention.query_chunk = query_chunk

    def text_context(self, cap_feats, cap_mask, text):
        """The prepared text of a forward given either features and mask or `text=` (from prepare_text)."""
        if text is None:
            if cap_feats is None or cap_mask is None:
                raise ValueError("give the text as cap_feats and cap_mask, or as text= from prepare_text")
            return self.prepare_text(cap_feats, cap_mask)
        if cap_feats is not None or cap_mask is not None:
            raise ValueError("give the text either as cap_feats/cap_mask or as text=, not both")
        return text

    def check_latent(self, x: torch.Tensor, t, batch: int) -> torch.Tensor:
        """Refuse a latent of the wrong channels, size or batch; returns t as a [B] tensor on x's device."""
        cfg = self.config
        b, c, h, w = x.shape
        if c != cfg.in_channels:
            raise ValueError(
                f"latent has {c} channels, this {self.dit_title} expects {cfg.in_channels} ({self.latent_hint})"
            )
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"latent size {h}x{w} is not a multiple of the patch size {cfg.patch_size} "
                f"(image sizes must be multiples of {8 * cfg.patch_size} pixels)"
            )
        if batch != b:
            raise ValueError(f"batch of {b} latents but {batch} text conditions")
        t = torch.as_tensor(t, device=x.device)
        return t.expand(b) if t.ndim == 0 else t


class TextConditionedDiT(LuminaDiT):
    """The Lumina DiTs whose image tokens cross-attend to the caption (Flag-DiT, Next-DiT): the text work done once
    per generation (masked-mean caption pooling into the adaLN embedding, every layer's caption keys and values) and
    the embedders they share.

    Subclasses have `layers` (each with `text_kv`) and set `bos_hint` for their error messages.
    """

    bos_hint = "BOS counts"

    def build_embedders(self, cfg, operations, device, dtype) -> None:
        """x_embedder (patch -> dim), t_embedder and cap_embedder (LayerNorm, Linear) of the original names."""
        self.x_embedder = operations.Linear(
            cfg.patch_size**2 * cfg.in_channels, cfg.dim, bias=True, device=device, dtype=dtype
        )
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim, operations, device, dtype)
        self.cap_embedder = nn.Sequential(
            FP32LayerNorm(cfg.cap_feat_dim, device=device, dtype=dtype),
            operations.Linear(cfg.cap_feat_dim, cfg.adaln_dim, bias=True, device=device, dtype=dtype),
        )
        # The dtype activations are computed in. None: the weights' dtype (bf16 for fp8-stored weights).
        self.compute_dtype: Optional[torch.dtype] = None

    def check_inputs(self, x: torch.Tensor, t, text: TextContext) -> torch.Tensor:
        return self.check_latent(x, t, text.cap_emb.shape[0])

    def run_layers(self, tokens, t, text: TextContext, cos, sin, softmax_scale, dtype) -> torch.Tensor:
        """The adaLN vector (timestep + pooled caption), every block, and the final layer."""
        c_vec = self.t_embedder(t, dtype) + text.cap_emb.to(dtype)
        regions = {}
        if text.region_weights is not None:
            if text.region_weights.shape[-1] != tokens.shape[1]:
                raise ValueError(
                    f"the text by region was laid out for {text.region_weights.shape[-1]} image tokens, this latent "
                    f"has {tokens.shape[1]}: build the regions for this latent's size"
                )
            regions["region_weights"] = text.region_weights
        for layer, (text_k, text_v) in zip(self.layers, text.text_kv):
            tokens = layer(tokens, c_vec, cos, sin, softmax_scale, text_k, text_v, text.text_mask, **regions)
        return self.final_layer(tokens, c_vec)

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
        mask = self._real_tokens(cap_feats, cap_mask)
        feats = cap_feats.to(self.get_compute_dtype())
        text_kv = [layer.text_kv(feats) for layer in self.layers]
        return TextContext(cap_emb=self._caption_embedding(cap_feats, mask), text_kv=text_kv,
                           text_mask=mask[:, None, None, :])

    def _real_tokens(self, cap_feats: torch.Tensor, cap_mask: torch.Tensor) -> torch.Tensor:
        mask = cap_mask.to(device=cap_feats.device, dtype=torch.bool)
        # A data-dependent check: skipped while torch.compile traces (it would break the graph), kept in eager mode.
        if not torch.compiler.is_compiling() and not bool(mask.any(dim=1).all()):
            raise ValueError(f"every prompt needs at least one real token in cap_mask ({self.bos_hint})")
        return mask

    def _caption_embedding(self, cap_feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The adaLN caption embedding: the masked mean over the real tokens (in fp32), embedded."""
        m = mask.unsqueeze(-1).float()
        pooled = (cap_feats.float() * m).sum(dim=1) / m.sum(dim=1)
        return self.cap_embedder[1](self.cap_embedder[0](pooled).to(self.get_compute_dtype()))

    def region_token_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """[N, R, h, w] latent weights of the regions -> [N, R, image tokens] in this DiT's token order."""
        return token_weights(weights, self.config.patch_size)

    def prepare_regions(self, conds, batch: int = 1, device=None) -> TextContext:
        """The text work of a text by region (`lumina_core.models.regions`): conds, a list of RegionTexts and
        (features, mask) pairs (one caption over the whole image), stacked as `batch_regions` does. The adaLN embedding
        pools each row's global caption; the caption keys and values are those of every region's caption."""
        regions = batch_regions(conds, batch, device)
        n, r, length, width = regions.feats.shape
        if width != self.config.cap_feat_dim:
            raise ValueError(
                f"region text features are {width} wide, this {self.dit_title} expects {self.config.cap_feat_dim} "
                f"(its cap_feat_dim); {self.text_hint}"
            )
        mask = regions.mask.reshape(n * r, length)
        if not torch.compiler.is_compiling() and not bool(mask.any(dim=1).all()):
            raise ValueError(f"every region caption needs at least one real token ({self.bos_hint})")
        pooled_mask = self._real_tokens(regions.pooled_feats, regions.pooled_mask)
        feats = regions.feats.reshape(n * r, length, width).to(self.get_compute_dtype())
        text_kv = [layer.text_kv(feats) for layer in self.layers]
        return TextContext(cap_emb=self._caption_embedding(regions.pooled_feats, pooled_mask), text_kv=text_kv,
                           text_mask=mask[:, None, None, :],
                           region_weights=self.region_token_weights(regions.weights.to(feats.device)))


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
