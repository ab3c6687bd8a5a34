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
# The same for model-space FLUX-AE latents (ComfyUI's Flux latent format's previewer values).
FLUX_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)
_LATENT_RGB = {"sdxl": (SDXL_LATENT_RGB_FACTORS, SDXL_LATENT_RGB_BIAS),
               "flux": (FLUX_LATENT_RGB_FACTORS, FLUX_LATENT_RGB_BIAS)}


def to_model_space(raw: torch.Tensor, fmt: str = "sdxl") -> torch.Tensor:
    f = latent_format(fmt)
    return (raw - f.shift) * f.scale if f.shift else raw * f.scale


def to_vae_space(model_latent: torch.Tensor, fmt: str = "sdxl") -> torch.Tensor:
    f = latent_format(fmt)
    return model_latent / f.scale + f.shift if f.shift else model_latent / f.scale


def latent_to_rgb(model_latent: torch.Tensor, fmt: str = "sdxl") -> torch.Tensor:
    """[B, C, h, w] model-space latent of format `fmt` -> [B, h, w, 3] uint8 preview (one pixel per latent cell)."""
    latent_format(fmt)
    rgb_factors, rgb_bias = _LATENT_RGB[fmt]
    factors = torch.tensor(rgb_factors, dtype=torch.float32, device=model_latent.device)
    bias = torch.tensor(rgb_bias, dtype=torch.float32, device=model_latent.device)
    rgb = torch.einsum("bchw,cr->bhwr", model_latent.float(), factors) + bias
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
