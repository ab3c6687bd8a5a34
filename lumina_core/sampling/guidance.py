"""Classifier-free guidance and the batching of text conditions (SPEC.md §5)."""

from __future__ import annotations

from typing import Sequence

import torch

GUIDANCE_MODES = ("faithful", "all")


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor, cfg: float, mode: str = "faithful") -> torch.Tensor:
    """Classifier-free guidance u + cfg*(c - u).

    "faithful" guides latent channels 0..2 only and keeps the conditional channel 3, as the released demo does;
    "all" guides every channel.
    """
    if mode == "all":
        return v_uncond + cfg * (v_cond - v_uncond)
    if mode == "faithful":
        guided = v_uncond[:, :3] + cfg * (v_cond[:, :3] - v_uncond[:, :3])
        return torch.cat([guided, v_cond[:, 3:]], dim=1)
    raise ValueError(f"unknown guidance mode {mode!r}; choose one of {', '.join(GUIDANCE_MODES)}")


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
