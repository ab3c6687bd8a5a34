"""Tiny Lumina-T2I models with random weights, written in the released file layouts.

Used by the smoke-test demo and the tests: a Flag-DiT checkpoint in the released key layout and a Hugging Face
LLaMA folder (config, tokenizer, weights), small enough to build, save and load in well under a second.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import save_flag_dit
from .config import FlagDiTConfig
from .model import FlagDiT, init_random_weights


def make_tiny_flag_dit(seed: int = 0, **overrides) -> FlagDiT:
    """A FlagDiTConfig.tiny() model (cap_feat_dim 32, matching the tiny LLaMA) with every parameter random."""
    model = FlagDiT(FlagDiTConfig.tiny(**overrides))
    return init_random_weights(model, seed).eval().requires_grad_(False)


def write_tiny_flag_dit(path, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    save_flag_dit(make_tiny_flag_dit(seed, **overrides), path)
    return path
