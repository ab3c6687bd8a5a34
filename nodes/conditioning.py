"""Lumina Save / Load Conditioning: prompt encodings on disk, so sampling needs no text encoder in memory.

Encode once (Lumina Text Encode -> Lumina Save Conditioning), then sample from the files (Lumina Load Conditioning
-> Lumina Sampler) without ever loading the 13 GB LLaMA again. The files are `lumina_core.conditioning` files.
"""

from __future__ import annotations

import hashlib
import logging

from lumina_core import conditioning as cond_files
from lumina_core.conditioning import T2I_FAMILY

from . import comfy_env, model_files
from .common import FAMILY_KEY, LUMINA_MARKER, PROMPT_KEY, make_conditioning

logger = logging.getLogger(__name__)


class LuminaSaveConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": (
                    "CONDITIONING",
                    {"tooltip": "From Lumina Text Encode (positive or negative prompt)."},
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "lumina_cond/prompt",
                        "tooltip": "File name prefix under ComfyUI's output folder; a counter and .safetensors are "
                        "added. Subfolders are allowed.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The same conditioning, passed through, so the node can sit between Text Encode and a sampler.",)
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "Lumina/conditioning"
    DESCRIPTION = (
        "Saves a prompt encoding (LLaMA features, mask, the prompt and the text encoder's family and width) as a "
        ".safetensors file in the output folder. Lumina Load Conditioning lists it, so later runs can sample "
        "without loading the text encoder."
    )

    def save(self, conditioning, filename_prefix):
        if not conditioning or len(conditioning) != 1 or not conditioning[0][1].get(LUMINA_MARKER):
            found = f"{len(conditioning or [])} entries" if not conditioning or len(conditioning) != 1 else (
                "a conditioning from another text encoder"
            )
            raise ValueError(
                f"Lumina Save Conditioning takes one conditioning made by Lumina Text Encode; got {found}. Connect "
                f"Lumina Text Encode directly."
            )
        features, extras = conditioning[0]
        path, name = model_files.conditioning_save_path(filename_prefix)
        meta = {"family": extras.get(FAMILY_KEY, T2I_FAMILY)}
        if extras.get(PROMPT_KEY) is not None:
            meta["prompt"] = extras[PROMPT_KEY]
        cond_files.save(path, features, extras["attention_mask"], **meta)
        logger.info("Saved Lumina conditioning to %s", path)
        return {"ui": {"text": [f"{name} [output]"]}, "result": (conditioning,)}


class LuminaLoadConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning_file": (
                    model_files.conditioning_file_names(),
                    {
                        "file_upload": True,
                        "tooltip": "A saved encoding: files uploaded to the input folder, or those Lumina Save "
                        "Conditioning wrote to the output folder (marked [output]).",
                    },
                ),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The saved prompt encoding, for the Lumina Sampler or ComfyUI's samplers and guiders.",)
    FUNCTION = "load"
    CATEGORY = "Lumina/conditioning"
    DESCRIPTION = (
        "Loads a prompt encoding written by Lumina Save Conditioning, so no text encoder needs to be loaded. The "
        "sampler refuses it if it was made by another model family's text encoder."
    )

    def load(self, conditioning_file):
        saved = cond_files.load(model_files.conditioning_file_path(conditioning_file))
        family = saved.meta.get("family")
        if family not in cond_files.FAMILIES:
            raise ValueError(
                f"{conditioning_file} was saved for text-encoder family {family!r}, which no Lumina DiT takes "
                f"(known: {', '.join(cond_files.FAMILIES)}); encode the prompt again with Lumina Text Encode."
            )
        features = saved.features.to(comfy_env.intermediate_device())
        mask = saved.mask.to(features.device)
        return (make_conditioning(features, mask, prompt=saved.meta.get("prompt"), family=family),)

    @classmethod
    def IS_CHANGED(cls, conditioning_file):
        try:
            with open(model_files.conditioning_file_path(conditioning_file), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        except OSError:
            return ""
