"""Lumina Text Encode: a prompt -> standard CONDITIONING carrying the text encoder's features (LLaMA-2 for
Lumina-T2I, Gemma-2B for Lumina-Next, Gemma-2-2B with a system prompt for Lumina-Image-2.0), their mask and the
family they belong to."""

from __future__ import annotations

from lumina_core.text.gemma2 import DEFAULT_SYSTEM_PROMPT, NO_SYSTEM_PROMPT, PROMPT_START, SYSTEM_PROMPTS

from . import text_encoder_handle
from .common import CUSTOM, TEXT_ENCODER_TYPE, make_conditioning

SYSTEM_PROMPT_CHOICES = (*SYSTEM_PROMPTS, CUSTOM)


def system_prompt_for(text: str, system_prompt: str, custom_system_prompt: str) -> str:
    """What the encoder gets as its system prompt: none for an empty text (the original's negative prompt is ""
    alone), the custom text for "custom", else the preset's name."""
    if text == "":
        return NO_SYSTEM_PROMPT
    if system_prompt == CUSTOM:
        return custom_system_prompt
    return system_prompt


class LuminaTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (
                    TEXT_ENCODER_TYPE,
                    {"tooltip": "From Lumina Load Text Encoder (or Lumina Load LLaMA Text Encoder)."},
                ),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "default": "",
                        "tooltip": "The prompt. Leave empty for the negative prompt of the original Lumina-T2I, "
                        "Lumina-Next and Lumina-Image-2.0 demos (for Lumina-Image-2.0 an empty text is encoded as "
                        "\"\" alone, without system prompt, as the original's negative).",
                    },
                ),
            },
            "optional": {
                "system_prompt": (
                    list(SYSTEM_PROMPT_CHOICES),
                    {
                        "default": DEFAULT_SYSTEM_PROMPT,
                        "tooltip": "Lumina-Image-2.0 (Gemma-2) only; ignored for Lumina-T2I and Lumina-Next. The "
                        f"text is encoded as system prompt + \"{PROMPT_START.strip()}\" + prompt, as the original. "
                        "superior: the original's default (\"real\"); alignment (\"align\") and base: the prompts "
                        "it was trained with; aesthetics, 4grid (four images in a 2x2 grid); empty: the prompt "
                        "alone; custom: custom_system_prompt. An empty prompt text (the negative) never gets one.",
                    },
                ),
                "custom_system_prompt": (
                    "STRING",
                    {
                        "multiline": True,
                        "default": "",
                        "tooltip": "Used only when system_prompt is custom, and only by Lumina-Image-2.0 "
                        "(ignored otherwise): a sentence like the presets, e.g. \"You are an assistant designed "
                        "to generate high-quality images based on user prompts.\". Left empty: no system prompt.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = (
        "Text features and mask (LLaMA-2, Gemma-2B or Gemma-2-2B), for the Lumina Sampler or ComfyUI's samplers and "
        "guiders.",
    )
    FUNCTION = "encode"
    CATEGORY = "Lumina/conditioning"
    DESCRIPTION = (
        "Encodes a prompt as the original demo of the encoder's family does (LLaMA-2: [BOS] prompt [EOS], no "
        "truncation; Gemma-2B: [BOS] prompt, second-to-last hidden states, at most 256 tokens; Gemma-2-2B: the same "
        "with the system prompt in front). Use the same node with an empty text for the negative prompt."
    )

    def encode(self, text_encoder, text, system_prompt=DEFAULT_SYSTEM_PROMPT, custom_system_prompt=""):
        family = getattr(text_encoder.encoder, "family", None)
        system = system_prompt_for(text, system_prompt, custom_system_prompt)
        features, mask = text_encoder_handle.encode_text(text_encoder, text, system)
        return (make_conditioning(features, mask, prompt=text, family=family),)
