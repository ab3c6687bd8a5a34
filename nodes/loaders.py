"""Loader nodes: family-detecting DiT and text-encoder loaders (Lumina-T2I, Lumina-Next, Lumina-Image-2.0), and the original
LLaMA-2 and Flag-DiT loaders, kept so that saved workflows still load."""

from __future__ import annotations

from . import comfy_model, model_files, text_encoder_handle
from .common import DTYPE_CHOICES, TEXT_ENCODER_TYPE

_FP8_NOTE = "fp8_e4m3fn/fp8_e5m2 keep the linear weights in 8 bits and compute in bf16."


_GGUF_DTYPE_NOTE = " A GGUF file keeps its own types; this picks the dtype it computes in (fp8: bf16 where supported)."


def _text_encoder_dtype_input(note: str = ""):
    return (
        list(DTYPE_CHOICES),
        {
            "default": "auto",
            "tooltip": "Weight dtype. auto: bf16 where the GPU supports it, else fp16, fp32 on the CPU (ComfyUI's "
            "--bf16/--fp16/--fp32/--fp8_*-text-enc flags win). " + _FP8_NOTE + note,
        },
    )


def _dit_dtype_input(note: str = ""):
    return (
        list(DTYPE_CHOICES),
        {
            "default": "auto",
            "tooltip": "Dtype the weights are kept in. auto: bf16 where the GPU supports it, else fp32 (ComfyUI's "
            "--*-unet flags win). fp16 may overflow. " + _FP8_NOTE + note,
        },
    )


class LuminaLlamaLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "llama_folder": (
                    model_files.llama_folder_names(),
                    {
                        "tooltip": "A Hugging Face LLaMA folder (config.json, tokenizer, weights) under "
                        "models/text_encoders; Lumina-T2I needs LLaMA-2-7B (Llama-2-7b-hf). Only folders whose "
                        "config.json describes a LLaMA model are listed."
                    },
                ),
                "dtype": _text_encoder_dtype_input(),
            }
        }

    RETURN_TYPES = (TEXT_ENCODER_TYPE,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The LLaMA text encoder; ComfyUI moves it to the GPU only while it encodes.",)
    FUNCTION = "load"
    CATEGORY = "Lumina/loaders"
    DESCRIPTION = "Loads the LLaMA-2-7B text encoder of Lumina-T2I from a Hugging Face folder."

    def load(self, llama_folder, dtype):
        return (text_encoder_handle.load_text_encoder(model_files.llama_folder_path(llama_folder), dtype),)


class LuminaFlagDiTLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit_name": (
                    model_files.diffusion_model_names(),
                    {
                        "tooltip": "The Lumina-T2I Flag-DiT checkpoint in models/diffusion_models (e.g. "
                        "lumina_t2i_5b_bf16.safetensors, or the released consolidated.00-of-01.safetensors)."
                    },
                ),
                "weight_dtype": _dit_dtype_input(),
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
        return (comfy_model.load_flag_dit_model(model_files.diffusion_model_path(dit_name), weight_dtype),)


class LuminaDiTLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "dit_name": (
                    model_files.diffusion_model_names(),
                    {
                        "tooltip": "A Lumina DiT checkpoint in models/diffusion_models: the Lumina-T2I Flag-DiT; "
                        "the Lumina-Next Next-DiT in its original (consolidated.00-of-01) or diffusers "
                        "(diffusion_pytorch_model.safetensors) layout; the Lumina-Image-2.0 Unified Next-DiT as "
                        "the original consolidated.00-of-01.pth, ComfyUI's lumina_2_model_bf16.safetensors, a "
                        "diffusers transformer file or sharded folder (its index json). ComfyUI's all-in-one "
                        "lumina_2.safetensors in models/checkpoints is listed too (its DiT is loaded). GGUF files "
                        "(city96's ComfyUI-GGUF conventions, e.g. lumina2-q4_0.gguf, or written by `python -m "
                        "lumina_core convert ... --dtype q8_0`) from models/diffusion_models or models/unet stay "
                        "quantized in memory. The family is read from the file."
                    },
                ),
                "weight_dtype": _dit_dtype_input(_GGUF_DTYPE_NOTE),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = (
        "A native ComfyUI MODEL (rectified flow, the family's latents (SDXL, or FLUX for Lumina-Image-2.0) and "
        "shift): use it with the Lumina Sampler, KSampler or SamplerCustomAdvanced.",
    )
    FUNCTION = "load"
    CATEGORY = "Lumina/loaders"
    DESCRIPTION = (
        "Loads a Lumina DiT, Flag-DiT (Lumina-T2I), Next-DiT (Lumina-Next) or Unified Next-DiT (Lumina-Image-2.0), "
        "found out from the file's keys (safetensors, .pth, or GGUF kept quantized), as a ComfyUI MODEL with low-VRAM "
        "offloading and casting."
    )

    def load(self, dit_name, weight_dtype):
        return (comfy_model.load_dit_model(model_files.diffusion_model_path(dit_name), weight_dtype),)


class LuminaTextEncoderLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_folder": (
                    model_files.text_encoder_folder_names(),
                    {
                        "tooltip": "A Hugging Face folder (config.json, tokenizer, weights) under "
                        "models/text_encoders: LLaMA-2-7B (Llama-2-7b-hf) for Lumina-T2I, Gemma-2B (gemma-2b) for "
                        "Lumina-Next, Gemma-2-2B (gemma-2-2b) for Lumina-Image-2.0; or, for Lumina-Image-2.0, "
                        "ComfyUI's gemma_2_2b_fp16.safetensors (models/text_encoders or models/clip) or the "
                        "all-in-one lumina_2.safetensors (models/checkpoints). llama.cpp GGUF files of any of the "
                        "three (e.g. llama-2-7b.Q4_K_M.gguf), kept quantized in memory: a lone LLaMA .gguf carries "
                        "its tokenizer; a Gemma or Gemma-2 .gguf needs the model's tokenizer files beside it (a "
                        "folder holding one .gguf and those files is listed as the folder). The encoder is chosen "
                        "from the folder's config.json, the file's keys or the GGUF's architecture."
                    },
                ),
                "dtype": _text_encoder_dtype_input(_GGUF_DTYPE_NOTE),
            }
        }

    RETURN_TYPES = (TEXT_ENCODER_TYPE,)
    RETURN_NAMES = ("text_encoder",)
    OUTPUT_TOOLTIPS = ("The text encoder; ComfyUI moves it to the GPU only while it encodes.",)
    FUNCTION = "load"
    CATEGORY = "Lumina/loaders"
    DESCRIPTION = (
        "Loads the text encoder of a Lumina family: LLaMA-2-7B (Lumina-T2I), Gemma-2B (Lumina-Next) or Gemma-2-2B "
        "(Lumina-Image-2.0) from a Hugging Face folder, recognised from its config.json, or from a llama.cpp GGUF "
        "(kept quantized), recognised from its architecture, or Gemma-2-2B from ComfyUI's single file or all-in-one "
        "checkpoint, recognised from its keys."
    )

    def load(self, text_encoder_folder, dtype):
        folder = model_files.text_encoder_folder_path(text_encoder_folder)
        return (text_encoder_handle.load_family_text_encoder(folder, dtype),)
