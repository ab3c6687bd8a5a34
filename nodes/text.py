"""Lumina Text Encode: a prompt -> standard CONDITIONING carrying the text encoder's features (LLaMA-2 for
Lumina-T2I, Gemma-2B for Lumina-Next), their mask and the family they belong to."""

from __future__ import annotations

from . import text_encoder_handle
from .common import TEXT_ENCODER_TYPE, make_conditioning


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
                        "tooltip": "The prompt. Leave empty for the negative prompt of the original Lumina-T2I and "
                        "Lumina-Next demos.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = (
        "Text features and mask (LLaMA-2 or Gemma-2B), for the Lumina Sampler or ComfyUI's samplers and guiders.",
    )
    FUNCTION = "encode"
    CATEGORY = "Lumina/conditioning"
    DESCRIPTION = (
        "Encodes a prompt as the original demo of the encoder's family does (LLaMA-2: [BOS] prompt [EOS], no "
        "truncation; Gemma-2B: [BOS] prompt, second-to-last hidden states, at most 256 tokens). Use the same node "
        "with an empty text for the negative prompt."
    )

    def encode(self, text_encoder, text):
        family = getattr(text_encoder.encoder, "family", None)
        return (make_conditioning(*text_encoder_handle.encode_text(text_encoder, text), prompt=text, family=family),)
