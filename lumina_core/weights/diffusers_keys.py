"""The key maps between the diffusers names of the DiTs and the original ones, as data: Lumina-Next's
`LuminaNextDiT2DModel` and Lumina-Image-2.0's `Lumina2Transformer2DModel` (whose separate to_q/to_k/to_v are the
row blocks of the original's attention.qkv). `lumina_core.weights.layouts` builds the layouts from them."""

from __future__ import annotations

import re
from typing import Optional

# --------------------------------------------------------------------------------------------------------------
# Lumina-Next

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


def _inverse(table: dict, name: str) -> list[str]:
    """The diffusers names a table maps onto the original `name`, in table order."""
    return [d for d, o in table.items() if o == name]


def original_to_diffusers(key: str) -> list[str]:
    """The diffusers keys holding an original key's tensor (two for wq and q_norm, one otherwise)."""
    top = _inverse(_DIFFUSERS_TOP, key)
    if top:
        return top[:1]
    m = _LAYER_KEY.fullmatch(key)
    if not m:
        raise KeyError(key)
    n, rest = m.groups()
    out = [f"layers.{n}.{d}" for d in _inverse(_DIFFUSERS_LAYER, rest) + _inverse(_DIFFUSERS_COPIES, rest)]
    if not out:
        raise KeyError(key)
    return out


# --------------------------------------------------------------------------------------------------------------
# Lumina-Image-2.0

# diffusers name -> original name, outside the blocks
_L2_DIFFUSERS_TOP = {
    "x_embedder.weight": "x_embedder.weight",
    "x_embedder.bias": "x_embedder.bias",
    "time_caption_embed.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "time_caption_embed.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "time_caption_embed.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "time_caption_embed.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "time_caption_embed.caption_embedder.0.weight": "cap_embedder.0.weight",
    "time_caption_embed.caption_embedder.1.weight": "cap_embedder.1.weight",
    "time_caption_embed.caption_embedder.1.bias": "cap_embedder.1.bias",
    "norm_out.linear_1.weight": "final_layer.adaLN_modulation.1.weight",
    "norm_out.linear_1.bias": "final_layer.adaLN_modulation.1.bias",
    "norm_out.linear_2.weight": "final_layer.linear.weight",
    "norm_out.linear_2.bias": "final_layer.linear.bias",
}
# inside a block (noise_refiner.N, context_refiner.N, layers.N); norm1 is a plain RMSNorm in the context refiner and
# the norm of an adaLN pair (norm1.norm, norm1.linear) in the modulated blocks
_L2_DIFFUSERS_BLOCK = {
    "attn.to_out.0.weight": "attention.out.weight",
    "attn.norm_q.weight": "attention.q_norm.weight",
    "attn.norm_k.weight": "attention.k_norm.weight",
    "feed_forward.linear_1.weight": "feed_forward.w1.weight",
    "feed_forward.linear_2.weight": "feed_forward.w2.weight",
    "feed_forward.linear_3.weight": "feed_forward.w3.weight",
    "norm1.weight": "attention_norm1.weight",
    "norm1.norm.weight": "attention_norm1.weight",
    "norm1.linear.weight": "adaLN_modulation.1.weight",
    "norm1.linear.bias": "adaLN_modulation.1.bias",
    "norm2.weight": "attention_norm2.weight",
    "ffn_norm1.weight": "ffn_norm1.weight",
    "ffn_norm2.weight": "ffn_norm2.weight",
}
_L2_QKV = ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight")  # rows of attention.qkv, in this order
_L2_BLOCK_KEY = re.compile(r"((?:noise_refiner|context_refiner|layers)\.\d+)\.(.+)")


def unified_diffusers_to_original(key: str) -> tuple[Optional[str], bool]:
    """(original key, False) of a diffusers `Lumina2Transformer2DModel` key; (None, False) for an unknown key or
    a q/k/v block (see unified_diffusers_part)."""
    if key in _L2_DIFFUSERS_TOP:
        return _L2_DIFFUSERS_TOP[key], False
    m = _L2_BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _L2_DIFFUSERS_BLOCK:
        return f"{m.group(1)}.{_L2_DIFFUSERS_BLOCK[m.group(2)]}", False
    return None, False


def unified_diffusers_part(key: str) -> Optional[tuple[str, int, int]]:
    """(`...attention.qkv.weight`, 0/1/2, 3) for a diffusers to_q/to_k/to_v key, else None."""
    m = _L2_BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _L2_QKV:
        return f"{m.group(1)}.attention.qkv.weight", _L2_QKV.index(m.group(2)), len(_L2_QKV)
    return None


def unified_original_to_diffusers(key: str) -> list[str]:
    """The diffusers keys holding an original key's tensor (three row blocks for qkv; none for norm_final)."""
    if key == "norm_final.weight":
        return []
    top = _inverse(_L2_DIFFUSERS_TOP, key)
    if top:
        return top[:1]
    m = _L2_BLOCK_KEY.fullmatch(key)
    if not m:
        raise KeyError(key)
    block, rest = m.groups()
    if rest == "attention.qkv.weight":
        return [f"{block}.{name}" for name in _L2_QKV]
    if rest == "attention_norm1.weight":
        return [f"{block}.{'norm1.weight' if block.startswith('context_refiner') else 'norm1.norm.weight'}"]
    names = _inverse(_L2_DIFFUSERS_BLOCK, rest)
    if not names:
        raise KeyError(key)
    return [f"{block}.{names[0]}"]
