"""Lumina-T2I in plain PyTorch: the Flag-DiT, its checkpoints, the LLaMA-2 text encoder, the rectified-flow
sampler and a script pipeline (`LuminaT2IPipeline`). Nothing here imports ComfyUI; the node pack in `nodes/` wraps
it."""

from .config import FLAG_DIT_5B, FLAG_DIT_TINY, FlagDiTConfig
from .model import FlagDiT


def __getattr__(name):
    # The pipeline pulls in the text encoder (transformers) and the VAE glue: imported on first use only, so that
    # `import lumina_core` stays light for the nodes.
    if name in ("LuminaT2IPipeline", "LuminaT2IPipelineOutput"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FLAG_DIT_5B", "FLAG_DIT_TINY", "FlagDiTConfig", "FlagDiT", "LuminaT2IPipeline", "LuminaT2IPipelineOutput"]
__version__ = "0.1.0"
