"""Tiny Lumina-Image-2.0 DiT files in every layout users have, written from the facts of SPEC.md §9 (not with the
package's own key maps, so a mapping mistake there cannot cancel out here).

Layouts: the original `consolidated.00-of-01.pth` (a plain pickled state dict) and its .safetensors; ComfyUI's
`lumina_2_model_bf16.safetensors` (the original names in bf16); ComfyUI's all-in-one `lumina_2.safetensors` (the DiT
under `model.diffusion_model.`, beside Gemma under `text_encoders.gemma2_2b.transformer.model.`, the tokenizer as
`text_encoders.spiece_model` and the VAE under `vae.`); diffusers' `Lumina2Transformer2DModel` as one file and as a
sharded `transformer/` folder with `diffusion_pytorch_model.safetensors.index.json` (qkv split into to_q/to_k/to_v,
no norm_final).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.reference_lumina2 import TINY, random_state_dict

LAYOUTS = ("original_pth", "original", "comfy_bf16", "comfy_all_in_one", "diffusers", "diffusers_sharded")

_TOP = {
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder.0": "time_caption_embed.caption_embedder.0",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",
    "final_layer.linear": "norm_out.linear_2",
    "x_embedder": "x_embedder",
}
_BLOCK = {
    "attention.out": "attn.to_out.0",
    "attention.q_norm": "attn.norm_q",
    "attention.k_norm": "attn.norm_k",
    "feed_forward.w1": "feed_forward.linear_1",
    "feed_forward.w2": "feed_forward.linear_2",
    "feed_forward.w3": "feed_forward.linear_3",
    "adaLN_modulation.1": "norm1.linear",
    "attention_norm2": "norm2",
    "ffn_norm1": "ffn_norm1",
    "ffn_norm2": "ffn_norm2",
}


def to_diffusers(sd: dict, cfg: dict = TINY) -> dict:
    """The diffusers `Lumina2Transformer2DModel` state dict of an original one (SPEC.md §9, Layouts)."""
    hd = cfg["dim"] // cfg["n_heads"]
    q_rows, kv_rows = cfg["n_heads"] * hd, cfg["n_kv_heads"] * hd
    out = {}
    for key, value in sd.items():
        if key == "norm_final.weight":
            continue  # diffusers drops the unused norm
        m = re.fullmatch(r"((?:noise_refiner|context_refiner|layers)\.\d+)\.(.+)\.(weight|bias)", key)
        if m is None:
            module, kind = key.rsplit(".", 1)
            out[f"{_TOP[module]}.{kind}"] = value
            continue
        block, module, kind = m.groups()
        if module == "attention.qkv":
            q, k, v = value.split([q_rows, kv_rows, kv_rows])
            out.update({f"{block}.attn.to_q.weight": q, f"{block}.attn.to_k.weight": k, f"{block}.attn.to_v.weight": v})
        elif module == "attention_norm1":
            name = "norm1" if block.startswith("context_refiner") else "norm1.norm"
            out[f"{block}.{name}.{kind}"] = value
        else:
            out[f"{block}.{_BLOCK[module]}.{kind}"] = value
    return out


def _contiguous(sd: dict) -> dict:
    return {k: v.contiguous() for k, v in sd.items()}


def write_dit(directory, layout: str, sd: dict | None = None, cfg: dict = TINY, seed: int = 0) -> Path:
    """Write the tiny DiT `sd` (default: reference random weights) in `layout`; returns the path to load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = random_state_dict(cfg, seed) if sd is None else sd
    if layout == "original_pth":
        path = directory / "consolidated.00-of-01.pth"
        torch.save(sd, path)
    elif layout == "original":
        path = directory / "consolidated.00-of-01.safetensors"
        save_file(_contiguous(sd), str(path))
    elif layout == "comfy_bf16":
        path = directory / "lumina_2_model_bf16.safetensors"
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(path))
    elif layout == "comfy_all_in_one":
        path = directory / "lumina_2.safetensors"
        g = torch.Generator().manual_seed(1)
        tensors = {f"model.diffusion_model.{k}": v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
        tensors["text_encoders.gemma2_2b.transformer.model.embed_tokens.weight"] = torch.randn(8, 4, generator=g)
        tensors["text_encoders.spiece_model"] = torch.zeros(16, dtype=torch.uint8)
        tensors["vae.decoder.conv_in.weight"] = torch.randn(4, 16, 3, 3, generator=g)
        tensors["vae.encoder.conv_in.weight"] = torch.randn(4, 3, 3, 3, generator=g)
        save_file(tensors, str(path))
    elif layout == "diffusers":
        path = directory / "diffusion_pytorch_model.safetensors"
        save_file(_contiguous(to_diffusers(sd, cfg)), str(path))
    elif layout == "diffusers_sharded":
        path = directory / "transformer"
        path.mkdir(exist_ok=True)
        tensors = _contiguous(to_diffusers(sd, cfg))
        keys = list(tensors)
        shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
        weight_map = {}
        for name, names in shards.items():
            save_file({k: tensors[k] for k in names}, str(path / name))
            weight_map.update(dict.fromkeys(names, name))
        (path / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
        (path / "config.json").write_text(json.dumps({"_class_name": "Lumina2Transformer2DModel"}))
    else:
        raise ValueError(layout)
    return path
