"""Lumina-T2I in plain PyTorch: the Flag-DiT, its checkpoints, the LLaMA-2 text encoder and the rectified-flow
sampler. Nothing here imports ComfyUI; the node pack in `nodes/` wraps it."""

from .config import FLAG_DIT_5B, FLAG_DIT_TINY, FlagDiTConfig
from .model import FlagDiT

__all__ = ["FLAG_DIT_5B", "FLAG_DIT_TINY", "FlagDiTConfig", "FlagDiT"]
__version__ = "0.1.0"
