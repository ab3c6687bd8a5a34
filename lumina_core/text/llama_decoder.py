"""LLaMA's decoder in plain torch, for the GGUF text encoder of Lumina-T2I: the features without importing
transformers.

A llama.cpp LLaMA file is loaded into this module instead of transformers' `LlamaModel` (`gguf_text`): the whole
Lumina-T2I pipeline from GGUF files then never imports transformers (unless tokenizer files sit beside the .gguf),
whose modules alone stay resident at about 0.12 GB for the rest of the process: with the 5B Flag-DiT as Q8_0 at
512x512 on the CPU, the difference between a pipeline above and below 6 GB (tests/bench/bench_gguf_pipeline.py).

It computes what `LlamaModel(...).last_hidden_state` computes for Lumina-T2I's calls (input ids, no attention mask,
no cache, SDPA attention), in the same operations and order: RMSNorm in fp32 cast back before its weight; rotary
factors from fp32 frequencies, `cat(freqs, freqs)`, cast to the compute dtype and applied as `q*cos +
rotate_half(q)*sin`; causal SDPA at head_dim^-0.5 (grouped keys through SDPA's enable_gqa, as transformers passes
them); SiLU-gated MLP; residual sums. The module names are transformers' (`layers.N.self_attn.q_proj`, ...), so the
GGUF name map, LoRA names and the swap to quantized linear layers are those of the transformers model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaDecoderConfig:
    """The part of a LLaMA config.json (`gguf_text.config_dict`) the features depend on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    attention_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, values: dict) -> "LlamaDecoderConfig":
        names = {f.name for f in fields(cls)}
        config = cls(**{k: v for k, v in values.items() if k in names})
        if config.hidden_act != "silu":
            raise ValueError(f"a LLaMA decoder's activation is silu, got {config.hidden_act!r}")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"{config.num_attention_heads} query heads cannot share {config.num_key_value_heads} "
                             f"key/value heads evenly")
        return config


@dataclass
class DecoderOutput:
    last_hidden_state: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaDecoderConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        q_size, kv_size = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        shape = (b, length, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5, is_causal=length > 1,
                                             **({"enable_gqa": True} if self.groups > 1 else {}))
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaDecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaDecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """LLaMA's embedding, decoder layers and final norm; `model(input_ids=ids).last_hidden_state` as LlamaModel's."""

    config_class = LlamaDecoderConfig

    def __init__(self, config: LlamaDecoderConfig):
        super().__init__()
        self.config = config
        # Built without its random initialisation (the loader assigns the weights): on the meta device, normal_ runs
        # through torch's Python decompositions and imports torch._dynamo and sympy (0.05 GB resident, for good).
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def rotary(self, length: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, 1, length, head_dim]: fp32 inverse frequencies made on the CPU (as a model built there makes
        them), the angles on `device`, cast to `dtype`."""
        dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        positions = torch.arange(length, device=device)[None]
        freqs = positions[..., None].float() * inv_freq.to(device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None) -> DecoderOutput:
        if attention_mask is not None:
            raise ValueError("the LLaMA decoder of a GGUF text encoder runs without an attention mask (right "
                             "padding never reaches the real tokens of a causal model)")
        if use_cache:
            raise ValueError("the LLaMA decoder of a GGUF text encoder keeps no cache")
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(input_ids.shape[1], x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return DecoderOutput(self.norm(x))
