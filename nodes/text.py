"""Lumina Text Encode: a prompt -> standard CONDITIONING carrying LLaMA-2 features and their mask."""

from __future__ import annotations

from . import comfy_glue
from .common import TEXT_ENCODER_TYPE, make_conditioning


class LuminaTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (TEXT_ENCODER_TYPE, {"tooltip": "From Lumina Load LLaMA Text Encoder."}),
                "text": (
                    "STRING",
                    {
                        "multiline": True,
                        "dynamicPrompts": True,
                        "default": "",
                        "tooltip": "The prompt. Leave empty for the negative prompt of the original Lumina-T2I.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("LLaMA-2 features and mask, for the Lumina Sampler or ComfyUI's samplers and guiders.",)
    FUNCTION = "encode"
    CATEGORY = "Lumina/conditioning"
    DESCRIPTION = (
        "Encodes a prompt with the LLaMA text encoder ([BOS] prompt [EOS], no truncation). Use the same node with "
        "an empty text for the negative prompt."
    )

    def encode(self, text_encoder, text):
        return (make_conditioning(*comfy_glue.encode_text(text_encoder, text), prompt=text),)
