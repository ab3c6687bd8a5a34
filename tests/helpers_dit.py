"""Tiny Flag-DiT models for tests: built on the CPU, seeded, every parameter random."""

import torch

from lumina_core.config import FlagDiTConfig
from lumina_core.model import FlagDiT, init_random_weights


def make_tiny_flag_dit(seed: int = 0, dtype=torch.float32, **overrides) -> FlagDiT:
    model = FlagDiT(FlagDiTConfig.tiny(**overrides))
    init_random_weights(model, seed)
    return model.to(dtype).eval().requires_grad_(False)


def random_text(batch, length, dim, seed=0, lengths=None):
    """Text features and a right-padded mask; lengths[i] real tokens in row i (default: all real)."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, length, dim, generator=gen)
    mask = torch.ones(batch, length, dtype=torch.bool)
    if lengths is not None:
        for i, n in enumerate(lengths):
            mask[i, n:] = False
    return feats, mask
