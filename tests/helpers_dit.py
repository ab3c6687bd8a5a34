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


def check_negative_apart(pipe, latent):
    """A pipeline's batch_cfg=False: the transformer's first layer sees 1-row inputs (2-row ones batched) and the
    latent equals the batched one; latent(pipe, **kwargs) generates one model-space latent."""
    rows = []
    hook = pipe.transformer.layers[0].register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        batched = latent(pipe, seed=3, negative_prompt="blurry")
        assert set(rows) == {2}
        rows.clear()
        apart = latent(pipe, seed=3, negative_prompt="blurry", batch_cfg=False)
        assert set(rows) == {1}
    finally:
        hook.remove()
    torch.testing.assert_close(apart, batched, rtol=1e-4, atol=1e-5)
