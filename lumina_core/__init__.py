"""The Lumina diffusion transformers in plain PyTorch: Lumina-T2I (Flag-DiT, LLaMA-2-7B) and Lumina-Next (Next-DiT,
Gemma-2B), their checkpoints and text encoders, the rectified-flow sampler and a script pipeline. Nothing here
imports ComfyUI; the node pack in `nodes/` wraps it.

The names below are the package's contract; they are imported on first use, so `import lumina_core` stays light.
Module paths inside the package (the wings `models`, `text`, `weights`, `sampling`, `image`) may change.
"""

from __future__ import annotations

import importlib

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    "load_dit": "families",
    "load_text_encoder": "families",
    "get_family": "families",
    "FAMILIES": "families",
    "sample": "generation",
    "region_text": "models.regions",
    "grid_regions": "models.regions",
    "RegionText": "models.regions",
    "make_noise": "sampling.schedule",
    "time_grid": "sampling.schedule",
    "solve": "sampling.solvers",
    "save_conditioning": "conditioning",
    "load_conditioning": "conditioning",
    "FlagDiT": "models.flag_dit",
    "NextDiT": "models.next_dit",
    "FlagDiTConfig": "models.config",
    "NextDiTConfig": "models.config",
    "FLAG_DIT_5B": "models.config",
    "FLAG_DIT_TINY": "models.config",
    "dequantize_gguf": "weights.gguf_quants",
    "LlamaTextEncoder": "text.llama",
    "GemmaTextEncoder": "text.gemma",
    "Gemma2TextEncoder": "text.gemma2",
    "SYSTEM_PROMPTS": "text.gemma2",
    "LuminaT2IPipeline": "pipeline",
    "LuminaT2IPipelineOutput": "pipeline",
    "LuminaPipeline": "pipeline_next",
    "Lumina2Pipeline": "pipeline_lumina2",
    "LuminaPipelineOutput": "family_pipeline",
    "apply_lora": "lora",
    "release_memory": "memory",
}
# exported under another name than the module's own
_RENAMED = {"save_conditioning": "save", "load_conditioning": "load"}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
