"""Tiny Flag-DiT models and text for tests (the model builder lives in lumina_core.tiny, shared with the demo)."""

import torch

from lumina_core import tiny
from lumina_core.models.flag_dit import FlagDiT


def make_tiny_flag_dit(seed: int = 0, dtype=torch.float32, **overrides) -> FlagDiT:
    return tiny.make_tiny_flag_dit(seed, **overrides).to(dtype)


def random_text(batch, length, dim, seed=0, lengths=None):
    """Text features and a right-padded mask; lengths[i] real tokens in row i (default: all real)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, length, dim, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if lengths is not None:
        for i, n in enumerate(lengths):
            mask[i, n:] = False
    return feats, mask
