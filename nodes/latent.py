"""Lumina Empty Latent: zeros of an SDXL-VAE latent at a Lumina-friendly resolution (made 16 FLUX channels by the
samplers for Lumina-Image-2.0, as ComfyUI's samplers do with empty latents)."""

from __future__ import annotations

import torch

from lumina_core.image.latent import LATENT_CHANNELS, latent_format

from . import comfy_env
from .common import (
    CUSTOM,
    MAX_SIZE,
    MIN_SIZE,
    PIXEL_MULTIPLE,
    RESOLUTION_PRESETS,
    VAE_FACTOR,
    resolution_size,
    size_problem,
)

MAX_BATCH = 64


class LuminaEmptyLatent:
    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": MIN_SIZE, "max": MAX_SIZE, "step": PIXEL_MULTIPLE}
        return {
            "required": {
                "resolution": (
                    list(RESOLUTION_PRESETS) + [CUSTOM],
                    {
                        "default": "1024x1024",
                        "tooltip": "width x height in pixels. Lumina-T2I was trained at 1024x1024; larger sizes use "
                        "the sampler's extrapolation. 'custom' uses width and height below.",
                    },
                ),
                "width": (
                    "INT",
                    dict(size, tooltip="Image width in pixels when resolution is 'custom' (multiple of 16)."),
                ),
                "height": (
                    "INT",
                    dict(size, tooltip="Image height in pixels when resolution is 'custom' (multiple of 16)."),
                ),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 1, "max": MAX_BATCH, "step": 1, "tooltip": "Number of images."},
                ),
            }
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = (
        "Empty (zero) latents [batch, 4, height/8, width/8]. For Lumina-Image-2.0 (16 FLUX-AE channels) the Lumina "
        "Sampler and ComfyUI's samplers widen an empty latent to 16 channels themselves.",
    )
    FUNCTION = "generate"
    CATEGORY = "Lumina/latent"
    DESCRIPTION = (
        "An empty latent for every Lumina family, from a preset resolution or a custom multiple of 16 pixels (4 "
        "SDXL-VAE channels; the samplers make it 16 FLUX-AE channels for Lumina-Image-2.0)."
    )

    @classmethod
    def VALIDATE_INPUTS(cls, resolution, width, height):
        # Naming these inputs here turns off ComfyUI's own range and list checks for them, so all are done here.
        if resolution not in RESOLUTION_PRESETS and resolution != CUSTOM:
            return f"resolution {resolution!r} is not one of {', '.join(RESOLUTION_PRESETS)}, {CUSTOM}"
        if resolution == CUSTOM and width is not None and height is not None:
            return size_problem(int(width), int(height)) or True
        return True

    def generate(self, resolution, width, height, batch_size):
        w, h = resolution_size(resolution, width, height)
        problem = size_problem(w, h)
        if problem:
            raise ValueError(problem)
        samples = torch.zeros(
            [batch_size, LATENT_CHANNELS, h // VAE_FACTOR, w // VAE_FACTOR],
            device=comfy_env.intermediate_device(),
            dtype=comfy_env.intermediate_dtype(),
        )
        return ({"samples": samples, "downscale_ratio_spacial": VAE_FACTOR},)


def latent_for_family(raw: torch.Tensor, family) -> torch.Tensor:
    """The LATENT's samples as the family's DiT takes them: an empty (all-zero) latent of another channel count
    becomes zeros of the family's (what ComfyUI's samplers do for empty latents); a non-empty one of the wrong
    channels is refused with the VAE to encode it with."""
    fmt = latent_format(family.latent_format)
    if raw.shape[1] == fmt.channels:
        return raw
    if not bool(raw.any()):
        return raw.new_zeros((raw.shape[0], fmt.channels) + tuple(raw.shape[2:]))
    raise ValueError(
        f"The latent has {raw.shape[1]} channels, but {family.title} works on {fmt.channels}-channel latents of "
        f"{fmt.vae}: encode the image with that VAE (VAE Encode), or start from an empty latent."
    )
