"""Plain-Python checks and conversions shared by the nodes: CONDITIONING in and out, LATENT and image sizes.

Every refusal says what was received and what to connect or which values to use instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from lumina_core.dtypes import DTYPE_NAMES

# Conditioning made by Lumina Text Encode carries this key (value True) next to its attention mask.
LUMINA_MARKER = "lumina_t2i_llama"
# ... the family name of the text encoder that made it (absent: Lumina-T2I), and the prompt (for Lumina Save
# Conditioning).
FAMILY_KEY = "lumina_family"
PROMPT_KEY = "lumina_prompt"
TEXT_ENCODER_TYPE = "LUMINA_TEXT_ENCODER"

# Weight dtypes of every loader: fp8 stores the weights in 8 bits and computes in bf16 (fp32 on the CPU).
DTYPE_CHOICES = ("auto",) + DTYPE_NAMES
PIXEL_MULTIPLE = 16  # patch size 2 x VAE factor 8
VAE_FACTOR = 8
MIN_SIZE = 32  # smaller images leave the Flag-DiT too few tokens to be of any use
MAX_SIZE = 8192

RESOLUTION_PRESETS = ("1024x1024", "512x2048", "2048x512", "1664x1664", "2048x1024", "1024x2048")
CUSTOM = "custom"

_TEXT_NODE = "a Lumina Text Encode node (fed by Lumina Load LLaMA Text Encoder)"
_TEXT_NODE_ANY = "a Lumina Text Encode node (fed by Lumina Load Text Encoder)"
# Feature widths of text encoders people wire in by mistake.
_KNOWN_WIDTHS = {
    768: "SD1.x CLIP (CLIP Text Encode)",
    1024: "SD2.x CLIP (CLIP Text Encode)",
    1280: "SDXL refiner CLIP (CLIP Text Encode)",
    2048: "SDXL CLIP (CLIP Text Encode)",
    2304: "Gemma-2 2B (Lumina-Image-2.0)",
    4096: "T5-XXL (SD3/Flux) or another 4096-wide encoder",
}


def make_conditioning(
    features: torch.Tensor, mask: torch.Tensor, *, prompt: Optional[str] = None, family: Optional[str] = None
) -> list:
    """Standard ComfyUI CONDITIONING: [[features [B,L,D], {"attention_mask": [B,L] bool, marker, family, prompt}]].

    family: the model family of the text encoder (`lumina_core.families`); conditioning without one (made before
    Lumina-Next was supported) is Lumina-T2I's.
    """
    extras = {"attention_mask": mask.bool(), LUMINA_MARKER: True}
    if family is not None:
        extras[FAMILY_KEY] = family
    if prompt is not None:
        extras[PROMPT_KEY] = prompt
    return [[features, extras]]


def text_from_conditioning(
    conditioning, cap_feat_dim: int, which: str, family: Optional[str] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, mask) of a Lumina conditioning, refusing anything else with a message naming the fix.

    family: the family of the DiT it is for; conditioning made by another family's text encoder is refused with the
    encoder the DiT needs.
    """
    if not conditioning:
        raise ValueError(f"The {which} conditioning is empty: connect {_TEXT_NODE}.")
    if len(conditioning) > 1:
        raise ValueError(
            f"The {which} conditioning holds {len(conditioning)} entries (combined or area conditioning); the Lumina "
            f"Sampler takes one prompt per input. Connect a single Lumina Text Encode, or use KSampler for combined "
            f"conditioning."
        )
    features, extras = conditioning[0][0], conditioning[0][1]
    width = int(features.shape[-1]) if torch.is_tensor(features) and features.ndim == 3 else None
    fam = _family(family)
    if not extras.get(LUMINA_MARKER):
        guess = _KNOWN_WIDTHS.get(width, "another text encoder")
        text_node = _TEXT_NODE if fam.name == "lumina_t2i" else _TEXT_NODE_ANY
        raise ValueError(
            f"The {which} conditioning was not made by Lumina Text Encode: it holds {width}-wide features, which "
            f"looks like {guess}. {fam.title} needs {fam.text_encoder_title} features: connect {text_node}."
        )
    if family is not None:
        check_same_family_conditioning(extras, family, which)
    if width != cap_feat_dim:
        raise ValueError(
            f"The {which} conditioning has {width}-wide features but this {fam.dit_title} expects {cap_feat_dim} "
            f"(its cap_feat_dim). Load the text encoder the DiT was trained with ({fam.text_encoder_title} for "
            f"{fam.title})."
        )
    mask = extras.get("attention_mask")
    if mask is None:
        mask = torch.ones(features.shape[:2], dtype=torch.bool)
    if tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(
            f"The {which} conditioning has a mask of shape {tuple(mask.shape)} for features of shape "
            f"{tuple(features.shape)} (changed by a node that does not know Lumina's mask, such as "
            f"ConditioningConcat). Connect Lumina Text Encode directly."
        )
    return features, mask.bool()


def _family(name: Optional[str]):
    from lumina_core.families import get_family

    return get_family(name or "lumina_t2i")


def check_same_family_conditioning(extras: dict, dit_family: str, which: str = "text") -> None:
    """Refuse conditioning of one family's text encoder for another family's DiT, naming the right encoder."""
    from lumina_core.families import check_same_family, get_family

    text_family = get_family(extras.get(FAMILY_KEY) or "lumina_t2i")
    check_same_family(get_family(dit_family), text_family, what=f"{which} conditioning")


def nearest_multiples(pixels: int, multiple: int = PIXEL_MULTIPLE) -> tuple[int, int]:
    """The valid sizes just below and just above `pixels` (equal when it is already valid)."""
    low = max(multiple, pixels // multiple * multiple)
    high = -(-pixels // multiple) * multiple
    return low, max(high, multiple)


def size_problem(width: int, height: int) -> Optional[str]:
    """None for a valid image size, else a message listing the nearest valid sizes."""
    problems = []
    for name, value in (("width", width), ("height", height)):
        if value < MIN_SIZE:
            problems.append(f"{name} {value} is below the minimum {MIN_SIZE} (use {MIN_SIZE})")
        elif value > MAX_SIZE:
            problems.append(f"{name} {value} is above the maximum {MAX_SIZE} (use {MAX_SIZE})")
        elif value % PIXEL_MULTIPLE:
            low, high = nearest_multiples(value)
            problems.append(f"{name} {value} is not a multiple of {PIXEL_MULTIPLE} (use {low} or {high})")
    if not problems:
        return None
    return "Lumina-T2I image sizes must be multiples of 16 pixels: " + "; ".join(problems) + "."


def check_latent(latent: dict) -> torch.Tensor:
    """The raw VAE samples [B,C,h,w] of a LATENT whose size the Lumina DiTs can take, or a ValueError (the channels
    are checked against the model's family by `nodes.latent.latent_for_family`)."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not torch.is_tensor(samples) or samples.ndim != 4 or getattr(samples, "is_nested", False):
        shape = tuple(samples.shape) if torch.is_tensor(samples) else type(samples).__name__
        raise ValueError(
            f"The latent has shape {shape}; the Lumina Sampler needs an image latent [batch, channels, height/8, "
            f"width/8] from Lumina Empty Latent or VAE Encode (the SDXL VAE, or the FLUX AE for Lumina-Image-2.0)."
        )
    h, w = samples.shape[-2] * VAE_FACTOR, samples.shape[-1] * VAE_FACTOR
    problem = size_problem(w, h)
    if problem:
        raise ValueError(f"The latent is for a {w}x{h} image. {problem} Resize the image or use Lumina Empty Latent.")
    if "noise_mask" in latent:
        raise ValueError(
            "The latent carries a noise mask (inpainting); the Lumina Sampler does not inpaint. Use KSampler with the "
            "Lumina MODEL for masked latents."
        )
    return samples


def resolution_size(resolution: str, width: int, height: int) -> tuple[int, int]:
    """(width, height) in pixels of a preset name "WxH", or the custom width and height."""
    if resolution == CUSTOM:
        return int(width), int(height)
    w, h = resolution.split("x")
    return int(w), int(h)
