"""Tiny VAEs with random weights in the published key layouts: the SDXL VAE's and the FLUX AE's configurations,
narrower (diffusers' AutoencoderKL, imported when used). Part of `lumina_core.tiny`, which re-exports them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

TINY_VAE_WIDTHS = (32, 32, 64, 64)  # the SDXL VAE has (128, 256, 512, 512): same depth, narrower


def _ldm_vae_key(key: str, levels: int) -> str:
    """A diffusers AutoencoderKL key in the original (LDM) layout that sdxl_vae.safetensors is published in."""
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.upsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", key)
    for new, old in (("attn_1.norm.", "attentions.0.group_norm."), ("attn_1.q.", "attentions.0.to_q."),
                     ("attn_1.k.", "attentions.0.to_k."), ("attn_1.v.", "attentions.0.to_v."),
                     ("attn_1.proj_out.", "attentions.0.to_out.0.")):
        key = key.replace("mid_block." + old, "mid." + new)
    return key.replace("conv_shortcut.", "nin_shortcut.").replace("conv_norm_out.", "norm_out.")


def make_tiny_sdxl_vae(seed: int = 0, widths=TINY_VAE_WIDTHS, fmt: str = "sdxl"):
    """diffusers' AutoencoderKL with the SDXL VAE's configuration (fmt "flux": the FLUX AE's), narrower, every
    parameter seeded."""
    from diffusers import AutoencoderKL

    from .image.vae import packaged_config

    config = {k: v for k, v in packaged_config(fmt).items() if not k.startswith("_")}
    config["block_out_channels"] = list(widths)
    vae = AutoencoderKL(**config)
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in vae.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            elif name.endswith("weight"):  # group norms
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)
    return vae.eval().requires_grad_(False)


def write_tiny_sdxl_vae(path, seed: int = 0, *, ldm_layout: bool = True, widths=TINY_VAE_WIDTHS, fmt: str = "sdxl"):
    """Write make_tiny_sdxl_vae(seed, widths, fmt) as one safetensors file, by default in the released
    sdxl_vae.safetensors / ae.safetensors key layout (attention projections as 1x1 convolutions); returns (path, the
    diffusers model). widths=(128, 256, 512, 512) gives the released shapes."""
    from safetensors.torch import save_file

    vae = make_tiny_sdxl_vae(seed, widths, fmt)
    levels = len(vae.config.block_out_channels)
    tensors = {}
    for key, value in vae.state_dict().items():
        if ldm_layout:
            key = _ldm_vae_key(key, levels)
            if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]
        tensors[key] = value.contiguous()
    path = Path(path)
    save_file(tensors, str(path))
    return path, vae


def write_tiny_flux_ae(path, seed: int = 0, *, ldm_layout: bool = True, widths=TINY_VAE_WIDTHS):
    """A tiny FLUX AE (16 latent channels, no quant convolutions) as ae.safetensors has it; returns (path, the
    diffusers model)."""
    return write_tiny_sdxl_vae(path, seed, ldm_layout=ldm_layout, widths=widths, fmt="flux")
