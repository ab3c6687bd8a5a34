"""Stateless maths and the two small norm layers of the Lumina DiTs: norms, modulation, timestep embedding, the RoPE
variants (1-D, 2-D), patches, and the default attention kernel.

Follows Lumina-T2I (`lumina_t2i/models/model.py`, `components.py`): the original runs in bf16 under autocast, where
LayerNorm and RoPE are computed in fp32 and RMSNorm normalises in fp32 before casting back. The norms here do the
same explicitly, so the model behaves identically with or without autocast and with ComfyUI's casting layers.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# On the CPU, per-token work with fp32 temporaries (norms, RoPE) runs this many tokens at a time (`over_token_chunks`).
TOKEN_CHUNK = 256


def over_token_chunks(fn, length: int, device, chunk: Optional[int] = None) -> torch.Tensor:
    """fn(start, end) -> the result [B, end - start, ...] of tokens start:end of a per-token computation; returns
    the result [B, length, ...] of all of them.

    On the CPU a chunk of tokens at a time, each written into the one output: the fp32 temporaries of a norm or
    RoPE over a whole sequence are several times its size (a norm of the 5B Flag-DiT's 2 x 1056 tokens at 512x512
    makes three of 26 MB), and such blocks, freed after every layer between the tensors that live on, are what
    glibc's heap keeps resident. The values are the same, bit for bit: every token is computed alone either way.
    Elsewhere (GPUs: one kernel per op is faster and their allocator reuses blocks) and while torch.compile traces,
    fn(0, length) at once. chunk: tokens at a time (None: TOKEN_CHUNK)."""
    chunk = TOKEN_CHUNK if chunk is None else chunk
    if torch.device(device).type != "cpu" or length <= chunk or torch.compiler.is_compiling():
        return fn(0, length)
    first = fn(0, chunk)
    out = first.new_empty((first.shape[0], length, *first.shape[2:]))
    out[:, :chunk] = first
    del first
    for start in range(chunk, length, chunk):
        out[:, start:start + chunk] = fn(start, min(length, start + chunk))
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3:
            return self._norm(x)
        return over_token_chunks(lambda start, end: self._norm(x[:, start:end]), x.shape[1], x.device)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight.to(device=x.device, dtype=x.dtype)


class FP32LayerNorm(nn.Module):
    """Affine LayerNorm evaluated in fp32 whatever the storage dtype (as autocast does in the original)."""

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(device=x.device, dtype=torch.float32)
        b = self.bias.to(device=x.device, dtype=torch.float32)
        return F.layer_norm(x.float(), w.shape, w, b, self.eps)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None, scale=None) -> torch.Tensor:
    """The default attention kernel: q [B, H, Lq, D], k and v [B, H, Lk, D], mask broadcastable to [B, H, Lq, Lk]
    (bool, True = attend), scale None = 1/sqrt(D)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def to_patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/p, W/p, C*p*p], each patch vector ordered (C, pH, pW) (Lumina-T2I and -Next)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3)


def from_patches(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """[B, H/p, W/p, p*p*C] ordered (pH, pW, C) -> [B, C, H, W]."""
    b, rows, cols = x.shape[:3]
    x = x.reshape(b, rows, cols, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, rows * p, cols * p)


def gated(h: torch.Tensor, gate: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """gate * h per sample (gate [B, D], h [B, L, D]); inplace: in h, a fresh tensor of the caller's."""
    return h.mul_(gate.unsqueeze(1)) if inplace else gate.unsqueeze(1) * h


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """x * (1 + scale) + shift per sample; inplace: in x itself (a fresh tensor of the caller's, at inference),
    the same two roundings, without a new activation-sized tensor for each."""
    if inplace:
        return x.mul_(1 + scale.unsqueeze(1)).add_(shift.unsqueeze(1))
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of raw t in [0, 1] (no x1000), cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_cos_sin(
    seq_len: int,
    head_dim: int,
    *,
    theta: float = 10000.0,
    ntk_factor: float = 1.0,
    scaling_factor: float = 1.0,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [seq_len, head_dim/2] of 1-D RoPE over the flattened sequence, computed for the length at hand.

    NTK scaling multiplies theta; linear position scaling divides the positions (both as in the original).
    """
    exponents = torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim
    inv_freq = 1.0 / ((theta * ntk_factor) ** exponents)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32) / scaling_factor
    angles = torch.outer(positions, inv_freq).float()
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2k, 2k+1) of x [B, L, heads, head_dim] in fp32 by cos/sin [L, head_dim/2] (the same
    positions for every sample) or [B, L, head_dim/2]; returns fp32.

    This is the complex product (x_2k + i x_2k+1) * e^(i p f_k) written in real arithmetic, which keeps the op
    graph free of complex tensors (torch.compile friendly).
    """
    xf = x.float().unflatten(-1, (-1, 2))
    x_even, x_odd = xf[..., 0], xf[..., 1]
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
    return out.flatten(-2)


def rotated_heads(y: torch.Tensor, norm, heads: int, head_dim: int, cos, sin, dtype, *, per_head: bool = False
                  ) -> torch.Tensor:
    """The queries or keys of an attention, [B, heads, L, head_dim] in `dtype`, from its projection y [B, L,
    heads * head_dim]: normed (`norm` over the whole projection, or over each head with `per_head`), turned by RoPE
    (cos/sin as `apply_rope` takes them) in fp32, and cast; on the CPU a chunk of tokens at a time
    (`over_token_chunks`)."""
    b = y.shape[0]

    def part(start: int, end: int) -> torch.Tensor:
        heads_view = (b, end - start, heads, head_dim)
        p = norm(y[:, start:end].reshape(heads_view)) if per_head else norm(y[:, start:end]).view(heads_view)
        return apply_rope(p, cos[..., start:end, :], sin[..., start:end, :]).to(dtype)

    return over_token_chunks(part, y.shape[1], y.device).transpose(1, 2)


def proportional_attention_scale(seq_len: int, head_dim: int, base_seqlen: int) -> float:
    """Softmax scale sqrt(log_base(L) / head_dim): equals 1/sqrt(head_dim) when L == base_seqlen."""
    return math.sqrt(math.log(seq_len, base_seqlen) / head_dim)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, kv_heads, L, D] -> [B, kv_heads*n_rep, L, D]; kv head j serves query heads j*n_rep .. (j+1)*n_rep-1."""
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)


def rope_2d_cos_sin(
    rows: int,
    cols: int,
    head_dim: int,
    *,
    theta: float = 10000.0,
    ntk_factor: float = 1.0,
    linear_factor: float = 1.0,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [rows*cols, head_dim/2] of Lumina-Next's 2-D RoPE for a row-major grid of patches.

    head_dim/4 frequencies f_i = (theta*ntk)^(-4i/head_dim) / linear; channel pair 2i turns with the row index and
    pair 2i+1 with the column index, both at frequency f_i (the original interleaves the two axes this way). NTK
    scaling multiplies theta, linear scaling divides the frequencies (the same as dividing the positions).
    """
    quarter = head_dim // 4
    exponents = torch.arange(0, head_dim, 4, device=device)[:quarter].float() / head_dim
    inv_freq = 1.0 / ((theta * ntk_factor) ** exponents) / linear_factor
    row_angles = torch.outer(torch.arange(rows, device=device, dtype=torch.float32), inv_freq)  # [rows, quarter]
    col_angles = torch.outer(torch.arange(cols, device=device, dtype=torch.float32), inv_freq)  # [cols, quarter]
    angles = torch.stack(
        (row_angles[:, None, :].expand(rows, cols, quarter), col_angles[None, :, :].expand(rows, cols, quarter)),
        dim=-1,
    ).reshape(rows * cols, 2 * quarter)
    return torch.cos(angles), torch.sin(angles)
