"""The ComfyUI nodes of ComfyUI-Lumina (classic node API). Display names are defined here and nowhere else.

Importing this package does not need ComfyUI: the nodes then run on plain Python (see `comfy_env`).
"""

from .conditioning import LuminaLoadConditioning, LuminaSaveConditioning
from .latent import LuminaEmptyLatent
from .loaders import LuminaDiTLoader, LuminaFlagDiTLoader, LuminaLlamaLoader, LuminaTextEncoderLoader
from .lora import LuminaLoraLoader
from .region_grid import LuminaRegionGrid
from .sampling import LuminaCFGGuider, LuminaODESampler, LuminaSampler, LuminaSigmas
from .text import LuminaTextEncode

_NODES = (
    (LuminaDiTLoader, "Lumina Load DiT"),
    (LuminaTextEncoderLoader, "Lumina Load Text Encoder"),
    (LuminaLlamaLoader, "Lumina Load LLaMA Text Encoder"),
    (LuminaFlagDiTLoader, "Lumina Load Flag-DiT"),
    (LuminaLoraLoader, "Lumina LoRA Loader"),
    (LuminaTextEncode, "Lumina Text Encode"),
    (LuminaRegionGrid, "Lumina Region Grid"),
    (LuminaSampler, "Lumina Sampler"),
    (LuminaSigmas, "Lumina Sigmas"),
    (LuminaODESampler, "Lumina ODE Sampler"),
    (LuminaCFGGuider, "Lumina CFG Guider"),
    (LuminaEmptyLatent, "Lumina Empty Latent"),
    (LuminaSaveConditioning, "Lumina Save Conditioning"),
    (LuminaLoadConditioning, "Lumina Load Conditioning"),
)

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls, _ in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: name for cls, name in _NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
