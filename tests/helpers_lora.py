"""Tiny LoRAs for the tests, written down in original terms (original module, rows, up, down, alpha) and spelled in
each file format by this file's own name tables (the diffusers names as SPEC.md §8/§9 state them, the qkv rows of
the tiny configuration), never with the package's key maps; and the truth they are compared with: a copy of the
model with the LoRAs merged into its weights here.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from lumina_core.models.config import UnifiedNextDiTConfig
from lumina_core.models.unified_next_dit import UnifiedNextDiT
from lumina_core.tiny import make_tiny_flag_dit, make_tiny_next_dit
from tests.reference_lumina2 import TINY, random_state_dict

FAMILIES = ("lumina_t2i", "lumina_next", "lumina2")
FORMATS = ("peft", "original", "kohya")
CAP = 32

# ---------------------------------------------------------------------------------------------------------------
# Models and inputs


def make_model(family: str, seed: int = 0) -> nn.Module:
    if family == "lumina_t2i":
        return make_tiny_flag_dit(seed)
    if family == "lumina_next":
        return make_tiny_next_dit(seed)
    model = UnifiedNextDiT(UnifiedNextDiTConfig.tiny())
    model.load_state_dict(random_state_dict(TINY, seed))
    return model.eval().requires_grad_(False)


def inputs(family: str):
    g = torch.Generator().manual_seed(7)
    channels = 16 if family == "lumina2" else 4
    x = torch.randn(2, channels, 8, 6, generator=g)
    t = torch.tensor([0.3, 0.8])
    cap = torch.randn(2, 5, CAP, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return x, t, cap, mask


def run(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs(family)).float()


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------------------------
# LoRAs written down in original terms, then spelled in each format

# The modules each family's test LoRA covers: attention, feed-forward, adaLN, the final layer and the embedders.
CROSS = ["layers.0.attention.wq", "layers.1.attention.wk", "layers.0.attention.wv", "layers.1.attention.wo",
         "layers.0.attention.wk_y", "layers.1.attention.wv_y", "layers.0.feed_forward.w1", "layers.1.feed_forward.w2",
         "layers.0.feed_forward.w3", "layers.1.adaLN_modulation.1", "final_layer.adaLN_modulation.1",
         "final_layer.linear", "t_embedder.mlp.0", "cap_embedder.1", "x_embedder"]
UNIFIED = ["layers.0.attention.qkv", "context_refiner.0.attention.qkv", "noise_refiner.0.attention.out",
           "layers.1.feed_forward.w1", "context_refiner.0.feed_forward.w2", "layers.0.feed_forward.w3",
           "layers.1.adaLN_modulation.1", "noise_refiner.0.adaLN_modulation.1", "final_layer.adaLN_modulation.1",
           "final_layer.linear", "t_embedder.mlp.2", "cap_embedder.1", "x_embedder"]

# diffusers module names (SPEC.md §8 for Lumina-Next, §9 for Lumina-Image-2.0)
NEXT_DIFFUSERS_BLOCK = {"attention.wq": "attn1.to_q", "attention.wk": "attn1.to_k", "attention.wv": "attn1.to_v",
                        "attention.wk_y": "attn2.to_k", "attention.wv_y": "attn2.to_v", "attention.wo": "attn2.to_out.0",
                        "feed_forward.w1": "feed_forward.linear_1", "feed_forward.w2": "feed_forward.linear_2",
                        "feed_forward.w3": "feed_forward.linear_3", "adaLN_modulation.1": "norm1.linear"}
L2_DIFFUSERS_BLOCK = {"attention.out": "attn.to_out.0", "feed_forward.w1": "feed_forward.linear_1",
                      "feed_forward.w2": "feed_forward.linear_2", "feed_forward.w3": "feed_forward.linear_3",
                      "adaLN_modulation.1": "norm1.linear"}
DIFFUSERS_TOP = {"t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
                 "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
                 "cap_embedder.1": "time_caption_embed.caption_embedder.1",
                 "final_layer.adaLN_modulation.1": "norm_out.linear_1", "final_layer.linear": "norm_out.linear_2"}
NEXT_TOP = {**DIFFUSERS_TOP, "x_embedder": "patch_embedder.proj"}
L2_TOP = {**DIFFUSERS_TOP, "x_embedder": "x_embedder"}
# Lumina-Image-2.0 tiny: 4 query heads and 2 kv heads of 16 channels
L2_QKV = {"attn.to_q": (0, 64), "attn.to_k": (64, 96), "attn.to_v": (96, 128)}


def diffusers_name(family: str, module: str) -> str:
    top, block = (NEXT_TOP, NEXT_DIFFUSERS_BLOCK) if family == "lumina_next" else (L2_TOP, L2_DIFFUSERS_BLOCK)
    if module in top:
        return top[module]
    prefix, _, rest = module.partition(".")
    index, _, rest = rest.partition(".")
    return f"{prefix}.{index}.{block[rest]}"


def make_entries(family: str, fmt: str, model: nn.Module, *, seed: int = 0, alpha: bool = True, rank: int = 4,
                 modules=None) -> list[dict]:
    """The LoRA in original terms: [{module, rows, up, down, alpha}], each module's rank, alpha and scale its own.
    Lumina-Image-2.0's qkv is three row blocks (to_q, to_k, to_v) in the diffusers format."""
    g = torch.Generator().manual_seed(seed)
    weights = model.state_dict()
    entries = []
    for i, module in enumerate(modules or (UNIFIED if family == "lumina2" else CROSS)):
        out, inp = weights[module + ".weight"].shape
        blocks = [(None, None)]
        if fmt == "peft" and module.endswith("attention.qkv"):
            blocks = [(name, rows) for name, rows in L2_QKV.items()]
        for j, (block, rows) in enumerate(blocks):
            r = rank + (i + j) % 3
            height = out if rows is None else rows[1] - rows[0]
            entries.append(dict(
                module=module, block=block, rows=rows,
                up=torch.randn(height, r, generator=g) * 0.3,
                down=torch.randn(r, inp, generator=g) / math.sqrt(inp),
                alpha=float(r + 1 + (i % 2)) if alpha else None,
            ))
    return entries


def spell(entries: list[dict], family: str, fmt: str, *, suffixes=None) -> dict:
    """A state dict of the LoRA in a file format."""
    state = {}
    for e in entries:
        if fmt == "peft":  # PEFT as diffusers saves it; the Flag-DiT has no diffusers layout: its original names
            if e["block"]:  # layers.N.attention.qkv -> layers.N.attn.to_q / to_k / to_v
                name = e["module"].rsplit(".", 2)[0] + "." + e["block"]
            else:
                name = e["module"] if family == "lumina_t2i" else diffusers_name(family, e["module"])
            stem, (down, up) = "transformer." + name, suffixes or ("lora_A.weight", "lora_B.weight")
        elif fmt == "original":
            stem, (down, up) = "diffusion_model." + e["module"], suffixes or ("lora_down.weight", "lora_up.weight")
        else:
            stem, (down, up) = "lora_unet_" + e["module"].replace(".", "_"), ("lora_down.weight", "lora_up.weight")
        state[f"{stem}.{down}"] = e["down"]
        state[f"{stem}.{up}"] = e["up"]
        if e["alpha"] is not None:
            state[f"{stem}.alpha"] = torch.tensor(e["alpha"])
    return state


def merged(model: nn.Module, *loras) -> nn.Module:
    """A copy of the model with W[rows] += strength * alpha / rank * up @ down for each (entries, strength)."""
    out = copy.deepcopy(model)
    state = {k: v.clone() for k, v in out.state_dict().items()}
    for entries, strength in loras:
        for e in entries:
            scale = strength * (1.0 if e["alpha"] is None else e["alpha"] / e["down"].shape[0])
            weight = state[e["module"] + ".weight"]
            rows = slice(None) if e["rows"] is None else slice(*e["rows"])
            weight[rows] = (weight[rows].double() + scale * (e["up"].double() @ e["down"].double())).to(weight.dtype)
    out.load_state_dict(state)
    return out


def snapshot(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def identical(a: dict, b: dict) -> bool:
    """Every tensor the same bytes (fp8 included)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].contiguous().view(torch.uint8), b[k].contiguous().view(torch.uint8))
        for k in a)
