"""Classifier-free guidance and the batching of text conditions (SPEC.md §5), with Lumina-Image-2.0's CFG truncation
and renormalisation (SPEC.md §9; `NextDiT.forward_with_cfg` of github:Alpha-VLLM/Lumina-Image-2.0 models/model.py).
"""

from __future__ import annotations

from typing import Sequence

import torch

GUIDANCE_MODES = ("faithful", "all")


# The released Lumina-T2I/Lumina-Next demos guide channels 0..2 of their 4-channel SDXL-VAE latents; Lumina-Image-2.0
# guides all 16 of its FLUX-AE channels.
FAITHFUL_LATENT_CHANNELS = 4
FAITHFUL_GUIDED_CHANNELS = 3


def faithful_guided_channels(channels: int) -> int:
    """How many leading channels "faithful" guidance guides in a latent of `channels` channels: 3 of the 4 SDXL
    channels (the Lumina-T2I and Lumina-Next demos), every channel otherwise (Lumina-Image-2.0's original)."""
    return FAITHFUL_GUIDED_CHANNELS if channels == FAITHFUL_LATENT_CHANNELS else channels


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: float, mode: str = "faithful") -> torch.Tensor:
    """Classifier-free guidance u + cfg*(c - u).

    "faithful" guides as the family's original: latent channels 0..2 of a 4-channel latent, keeping the
    conditional channel 3 (the Lumina-T2I/Next demos), every channel of a 16-channel one (Lumina-Image-2.0);
    "all" guides every channel.
    """
    if mode == "all":
        return v_uncond + cfg * (v_cond - v_uncond)
    if mode == "faithful":
        n = faithful_guided_channels(v_cond.shape[1])
        guided = v_uncond[:, :n] + cfg * (v_cond[:, :n] - v_uncond[:, :n])
        return guided if n == v_cond.shape[1] else torch.cat([guided, v_cond[:, n:]], dim=1)
    raise ValueError(f"unknown guidance mode {mode!r}; choose one of {', '.join(GUIDANCE_MODES)}")


def guided_at(t: float, cfg_trunc: float) -> bool:
    """Whether an evaluation at time t (0 = noise, 1 = data) is guided under CFG truncation: while t < cfg_trunc, the
    time of that evaluation itself (a midpoint half step's own t), as the original tests the model input.
    Afterwards the original evaluates the conditional branch only. cfg_trunc >= 1 guides always, t = 1 included:
    the only difference from the original, whose "always" is its default 100."""
    return cfg_trunc >= 1.0 or t < cfg_trunc


def renorm_factor(guided: torch.Tensor, cond: torch.Tensor, renorm_cfg: float) -> torch.Tensor:
    """Per-sample factor [B, 1, ...] of the CFG renormalisation: renorm_cfg * |cond| / |guided| where
    |guided| >= renorm_cfg * |cond| (norms over all but the batch axis), else 1. renorm_cfg <= 0: all ones.

    Any pair of predictions proportional per sample to the velocities works: ComfyUI's denoised minus x, say.
    """
    shape = (guided.shape[0],) + (1,) * (guided.ndim - 1)
    if not renorm_cfg > 0:
        return torch.ones(shape, dtype=guided.dtype, device=guided.device)
    dims = tuple(range(1, guided.ndim))
    max_norm = torch.linalg.vector_norm(cond.float(), dim=dims, keepdim=True) * float(renorm_cfg)
    norm = torch.linalg.vector_norm(guided.float(), dim=dims, keepdim=True)
    clamp = (norm >= max_norm) & (norm > 0)
    return torch.where(clamp, max_norm / norm.clamp_min(torch.finfo(torch.float32).tiny), 1.0).to(guided.dtype)


def renorm(guided: torch.Tensor, cond: torch.Tensor, renorm_cfg: float) -> torch.Tensor:
    """Lumina-Image-2.0's CFG renormalisation: the guided velocity's norm per sample clamped to renorm_cfg times the
    conditional velocity's, v <- v * renorm_cfg * |c| / |v| where |v| >= renorm_cfg * |c| (a clamp, not a rescale;
    unchanged elsewhere). renorm_cfg <= 0 is off."""
    if not renorm_cfg > 0:
        return guided
    return guided * renorm_factor(guided, cond, renorm_cfg)


def normalize_rows(guided: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """diffusers' CFG normalisation (Lumina2Pipeline's cfg_normalization): the guided velocity rescaled so that each
    row along the last axis (the latent's width) has the conditional velocity's norm, v <- v * |c|_row / |v|_row,
    always (a rescale, not the original's clamp; a zero row is left as it is)."""
    cond_norm = torch.linalg.vector_norm(cond, dim=-1, keepdim=True)
    norm = torch.linalg.vector_norm(guided, dim=-1, keepdim=True)
    return torch.where(norm > 0, guided * (cond_norm / norm), guided)


def _pad_text(feats: torch.Tensor, mask: torch.Tensor, length: int):
    extra = length - feats.shape[1]
    if extra == 0:
        return feats, mask
    feats = torch.cat([feats, feats.new_zeros(feats.shape[0], extra, feats.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return feats, mask


def batch_text(conds: Sequence[tuple], batch: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack text conditions (features [1 or batch, L_i, D], mask [1 or batch, L_i]) into one right-padded batch of
    len(conds)*batch rows, in the order given (cond rows first, then uncond rows)."""
    length = max(f.shape[1] for f, _ in conds)
    feats, masks = [], []
    for f, m in conds:
        if f.shape[0] not in (1, batch):
            raise ValueError(f"text condition has batch {f.shape[0]}, expected 1 or {batch} (the latent batch)")
        f, m = _pad_text(f, m.bool(), length)
        feats.append(f.expand(batch, -1, -1))
        masks.append(m.expand(batch, -1))
    return torch.cat(feats).to(device), torch.cat(masks).to(device)
