"""Lumina LoRA Loader: a LoRA from models/loras in any key form (PEFT/diffusers, original names, kohya) on a Lumina
MODEL, registered on a clone of its ModelPatcher (see comfy_lora)."""

from __future__ import annotations

import os

from lumina_core.lora import read_lora

from . import comfy_lora, model_files

LORAS = "loras"


def lora_names() -> list[str]:
    return model_files._model_file_names(LORAS)


def lora_path(name: str) -> str:
    path = model_files._find_file(LORAS, name)
    if path is None:
        raise FileNotFoundError(f"LoRA {name!r} not found in {model_files.model_folders(LORAS)}")
    return path


class LuminaLoraLoader:
    def __init__(self):
        self.loaded = None  # (path, size, mtime, state): the last file read, as ComfyUI's LoraLoader keeps it

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Lumina MODEL: from Lumina Load DiT (any family), or ComfyUI's own "
                                               "Lumina 2 model."}),
                "lora_name": (
                    lora_names(),
                    {
                        "tooltip": "A LoRA in models/loras, in any of its usual forms: PEFT/diffusers "
                        "(transformer.… lora_A/lora_B; Lumina-Image-2.0's to_q/to_k/to_v go to the rows of the fused "
                        "qkv), original names (diffusion_model.… lora_down/lora_up/alpha) or kohya (lora_unet_…). A "
                        "LoRA of another family is refused; keys that fit nothing are listed in the log."
                    },
                ),
                "strength_model": (
                    "FLOAT",
                    {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                     "tooltip": "How strongly the LoRA changes the model (it multiplies alpha / rank); 0 leaves the "
                                "model as it is, negative values push the other way."},
                ),
            }
        }

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The MODEL with the LoRA registered as weight patches; the loaded model itself is not changed.",)
    FUNCTION = "load_lora"
    CATEGORY = "Lumina/loaders"
    DESCRIPTION = (
        "Applies a LoRA to a Lumina DiT (Lumina-T2I, Lumina-Next, Lumina-Image-2.0) in every key form LoRAs are shared "
        "in, including the diffusers-format Lumina-Image-2.0 LoRAs ComfyUI's own loader skips. Chain several to stack "
        "them."
    )

    def load_lora(self, model, lora_name, strength_model):
        if strength_model == 0:
            return (model,)
        path = lora_path(lora_name)
        stat = os.stat(path)
        if self.loaded is None or self.loaded[:3] != (path, stat.st_size, stat.st_mtime_ns):
            self.loaded = (path, stat.st_size, stat.st_mtime_ns, read_lora(path)[0])
        return (comfy_lora.lora_model(model, self.loaded[3], strength_model, path),)
