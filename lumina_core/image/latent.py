"""Latent conventions of the two VAEs the Lumina families use.

Lumina-T2I and Lumina-Next work on scaled SDXL-VAE latents (model space = VAE latent * 0.13025, no shift);
Lumina-Image-2.0 on FLUX-AE latents, model space = (VAE latent - 0.1159) * 0.3611 (ComfyUI's Flux latent format).
ComfyUI's LATENT holds raw VAE latents, which its VAEDecode decodes as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SDXL_SCALING_FACTOR = 0.13025
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class LatentFormat:
    name: str
    vae: str  # what a user loads to decode it
    channels: int
    scale: float
    shift: float = 0.0


LATENT_FORMATS = {
    "sdxl": LatentFormat("sdxl", "the SDXL VAE (sdxl_vae.safetensors)", LATENT_CHANNELS, SDXL_SCALING_FACTOR),
    "flux": LatentFormat("flux", "the FLUX.1 AE (ae.safetensors)", 16, 0.3611, 0.1159),
}


def latent_format(name: str) -> LatentFormat:
    try:
        return LATENT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown latent format {name!r}; known: {', '.join(LATENT_FORMATS)}") from None

# Linear map from model-space SDXL latents to approximate RGB in [-1, 1], for cheap previews: the widely used SDXL
# approximation (the values ComfyUI's latent previewer uses for SDXL, so previews look the same).
SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def to_model_space(raw: torch.Tensor, fmt: str = "sdxl") -> torch.Tensor:
    f = latent_format(fmt)
    return (raw - f.shift) * f.scale if f.shift else raw * f.scale


def to_vae_space(model_latent: torch.Tensor, fmt: str = "sdxl") -> torch.Tensor:
    f = latent_format(fmt)
    return model_latent / f.scale + f.shift if f.shift else model_latent / f.scale


def latent_to_rgb(model_latent: torch.Tensor) -> torch.Tensor:
    """[B, 4, h, w] model-space latent -> [B, h, w, 3] uint8 preview (one pixel per latent cell)."""
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32, device=model_latent.device)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32, device=model_latent.device)
    rgb = torch.einsum("bchw,cr->bhwr", model_latent.float(), factors) + bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
