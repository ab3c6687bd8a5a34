"""Lumina Empty Latent: zeros of an SDXL-VAE latent at a Lumina-friendly resolution."""

from __future__ import annotations

import torch

from lumina_core.image.latent import LATENT_CHANNELS

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
    OUTPUT_TOOLTIPS = ("Empty (zero) SDXL-VAE latents [batch, 4, height/8, width/8].",)
    FUNCTION = "generate"
    CATEGORY = "Lumina/latent"
    DESCRIPTION = "An empty latent for Lumina-T2I, from a preset resolution or a custom multiple of 16 pixels."

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
