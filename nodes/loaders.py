"""Loader nodes: the LLaMA-2 text encoder and the Flag-DiT (as a native ComfyUI MODEL)."""

from __future__ import annotations

from . import comfy_glue
from .common import DTYPE_CHOICES, TEXT_ENCODER_TYPE


class LuminaLlamaLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llama_folder": (
                    comfy_glue.llama_folder_names(),
                    {
                        "tooltip": "A Hugging Face LLaMA folder (config.json, tokenizer, weights) under "
                        "models/text_encoders; Lumina-T2I needs LLaMA-2-7B (Llama-2-7b-hf). Only folders whose "
                        "config.json describes a LLaMA model are listed."
                    },
                ),
                "dtype": (
                    list(DTYPE_CHOICES),
                    {
                        "default": "auto",
                        "tooltip": "Weight dtype. auto: bf16 where the GPU supports it, else fp16, fp32 on the CPU "
                        "(ComfyUI's --bf16/--fp16/--fp32-text-enc flags win).",
                    },
                ),
            }
        }

    RETURN_TYPES = (TEXT_ENCODER_TYPE,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The LLaMA text encoder; ComfyUI moves it to the GPU only while it encodes.",)
    FUNCTION = "load"
    CATEGORY = "Lumina/loaders"
    DESCRIPTION = "Loads the LLaMA-2-7B text encoder of Lumina-T2I from a Hugging Face folder."

    def load(self, llama_folder, dtype):
        return (comfy_glue.load_text_encoder(comfy_glue.llama_folder_path(llama_folder), dtype),)


class LuminaFlagDiTLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit_name": (
                    comfy_glue.diffusion_model_names(),
                    {
                        "tooltip": "The Lumina-T2I Flag-DiT checkpoint in models/diffusion_models (e.g. "
                        "lumina_t2i_5b_bf16.safetensors, or the released consolidated.00-of-01.safetensors)."
                    },
                ),
                "weight_dtype": (
                    list(DTYPE_CHOICES),
                    {
                        "default": "auto",
                        "tooltip": "Dtype the weights are kept in. auto: bf16 where the GPU supports it, else "
                        "fp32 (ComfyUI's --*-unet flags win). fp16 may overflow.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = (
        "A native ComfyUI MODEL (rectified flow, shift 4.0, SDXL latents): use it with the Lumina Sampler, KSampler "
        "or SamplerCustomAdvanced.",
    )
    FUNCTION = "load"
    CATEGORY = "Lumina/loaders"
    DESCRIPTION = "Loads the Lumina-T2I Flag-DiT (5B) as a ComfyUI MODEL with low-VRAM offloading and casting."

    def load(self, dit_name, weight_dtype):
        return (comfy_glue.load_flag_dit_model(comfy_glue.diffusion_model_path(dit_name), weight_dtype),)
