"""Text by region: a caption per region of the image, as Lumina-Next's compositional generation draws a grid of
regions, each from its own caption, without retraining.

Follows `lumina_next_compositional_generation/models/model.py` and `demo.py` of Alpha-VLLM/Lumina-T2X: the DiT is
unchanged except for the caption cross-attention, where each image token attends only to the caption of its region
(a region mask over the image tokens), while the adaLN conditioning comes from one pooled caption, the global caption
(the original encodes the region captions joined by " " for it). The image tokens still attend to each other, so the
regions make one picture.

Generalised here to any regions: a region is a caption and a weight map over the latent (a box, a mask, a strength).
An image token's caption attention is the weighted mean over the regions of its attention to each region's caption
alone, with the weight of its patch (the mean of the region's weight map over the patch); a token no region covers
attends to no caption. For disjoint 0/1 regions, the original's grid, this is the original's sum over the region
captions. The global caption defaults to all the region captions' tokens pooled together.

Grids number their cells row-major (`grid_regions`). The original computes a cell's caption index as
(row + 1) * (column + 1) - 1, which is row-major for a single row or column only: in a 2x2 grid its bottom-left cell
takes the second caption (as the top-right one) and the third caption is never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RegionText:
    """A text condition by region, N rows (1 or the latent batch) of R region captions over an h x w latent.

    feats [N, R, L, D] and mask [N, R, L] (bool, True on real tokens): the region captions, right-padded. weights
    [N, R, h, w] (float32): each region's weight at each latent pixel (0 outside it). pooled_feats [N, Lp, D] and
    pooled_mask [N, Lp]: the caption whose masked mean conditions adaLN (the global caption).
    """

    feats: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    pooled_feats: torch.Tensor
    pooled_mask: torch.Tensor

    # The samplers tell a text by region from a (features, mask) pair by this mark.
    by_region = True

    @property
    def latent_size(self) -> tuple[int, int]:
        return int(self.weights.shape[-2]), int(self.weights.shape[-1])


def _as_caption(caption) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [n, L, D], mask [n, L] bool) of a caption given as features or as (features, mask)."""
    if torch.is_tensor(caption):
        feats, mask = caption, None
    else:
        feats, mask = caption
    if feats.ndim == 2:
        feats = feats[None]
    if mask is None:
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
    mask = mask.bool()
    if mask.ndim == 1:
        mask = mask[None]
    if feats.ndim != 3 or mask.shape != feats.shape[:2]:
        raise ValueError(
            f"a region caption must be features [batch, tokens, dim] (and a mask [batch, tokens]); got features "
            f"{tuple(feats.shape)} and mask {tuple(mask.shape)}"
        )
    return feats, mask


def box_weights(box: Sequence[float], height: int, width: int) -> torch.Tensor:
    """[height, width] share of each latent pixel inside box = (left, top, right, bottom), fractions of the image
    (0..1, right > left, bottom > top): 1 inside, 0 outside, the covered fraction on its edges."""
    left, top, right, bottom = (float(v) for v in box)
    if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
        raise ValueError(
            f"a region box is (left, top, right, bottom) as fractions of the image, 0 <= left < right <= 1 and "
            f"0 <= top < bottom <= 1; got {tuple(box)}"
        )

    def cover(lo: float, hi: float, n: int) -> torch.Tensor:
        edges = torch.arange(n + 1, dtype=torch.float64) / n
        share = ((edges[1:].clamp(max=hi) - edges[:-1].clamp(min=lo)) * n).clamp(0, 1)
        # Boxes on pixel edges (a grid that divides the latent) give exact 0s and 1s, not 1e-16 off them.
        return torch.where(share < 1e-9, 0.0, torch.where(share > 1 - 1e-9, 1.0, share))

    return torch.outer(cover(top, bottom, height), cover(left, right, width)).float()


def mask_weights(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[n, height, width] of a mask [H, W] or [n, H, W] of any size, resized bilinearly to the latent (as ComfyUI
    resizes its conditioning masks)."""
    mask = mask.float()
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise ValueError(f"a region mask must be [height, width] or [batch, height, width], got {tuple(mask.shape)}")
    if mask.shape[-2:] != (height, width):
        mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear")[:, 0]
    return mask


def region_weights(region, height: int, width: int) -> torch.Tensor:
    """[n, height, width] weights of a region given as None (the whole image), a box (left, top, right, bottom) in
    fractions of the image, or a mask tensor."""
    if region is None:
        return torch.ones(1, height, width)
    if torch.is_tensor(region):
        return mask_weights(region, height, width)
    return box_weights(region, height, width)[None]


def grid_boxes(rows: int, columns: int) -> list[tuple[float, float, float, float]]:
    """The cells of a rows x columns grid as boxes (left, top, right, bottom), row-major: cell (i, j) is entry
    i * columns + j. A latent pixel split between two cells counts for both by its share."""
    if rows < 1 or columns < 1:
        raise ValueError(f"a grid needs at least one row and one column, got {rows} x {columns}")
    return [(j / columns, i / rows, (j + 1) / columns, (i + 1) / rows) for i in range(rows) for j in range(columns)]


def grid_regions(captions: Sequence, rows: int, columns: int) -> list:
    """[(caption, box), ...] of the compositional demo's grid: captions row-major, one per cell."""
    if len(captions) != rows * columns:
        raise ValueError(f"a {rows} x {columns} grid takes {rows * columns} captions (row-major), got {len(captions)}")
    return list(zip(captions, grid_boxes(rows, columns)))


def _pad_tokens(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    extra = length - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _expand_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] not in (1, n):
        raise ValueError(f"a region input has batch {t.shape[0]}, expected 1 or {n}")
    return t.expand(n, *t.shape[1:])


def _concat_captions(captions: list) -> tuple[torch.Tensor, torch.Tensor]:
    """All the captions' tokens as one caption [n, sum L, D] (the default global caption)."""
    n = max(f.shape[0] for f, _ in captions)
    feats = torch.cat([_expand_rows(f, n) for f, _ in captions], dim=1)
    mask = torch.cat([_expand_rows(m, n) for _, m in captions], dim=1)
    return feats, mask


def region_text(regions: Sequence, latent_size: tuple[int, int], pooled=None) -> RegionText:
    """A RegionText from [(caption, region), ...] or [(caption, region, strength), ...] over a latent of
    latent_size = (h, w).

    caption: features [n, L, D] or (features, mask). region: None (the whole image), a box (left, top, right, bottom)
    in fractions of the image, or a mask [H, W] / [n, H, W] of any size (resized to the latent). strength (default 1)
    multiplies the region's weights. pooled: the global caption for adaLN, as features or (features, mask); None
    pools all the region captions' tokens together.
    """
    if not regions:
        raise ValueError("regions must hold at least one (caption, box_or_mask) pair")
    h, w = int(latent_size[0]), int(latent_size[1])
    captions, weights = [], []
    for entry in regions:
        if not isinstance(entry, (tuple, list)) or len(entry) not in (2, 3):
            raise ValueError(f"a region is (caption, box_or_mask) or (caption, box_or_mask, strength), got {entry!r}")
        caption, region = entry[0], entry[1]
        strength = float(entry[2]) if len(entry) == 3 else 1.0
        if not strength >= 0:
            raise ValueError(f"a region's strength must be >= 0, got {strength!r}")
        captions.append(_as_caption(caption))
        weights.append(region_weights(region, h, w) * strength)
    pooled = _concat_captions(captions) if pooled is None else _as_caption(pooled)
    n = max([f.shape[0] for f, _ in captions] + [m.shape[0] for m in weights] + [pooled[0].shape[0]])
    length = max(f.shape[1] for f, _ in captions)
    feats = torch.stack([_pad_tokens(_expand_rows(f, n), length, 1) for f, _ in captions], dim=1)
    mask = torch.stack([_pad_tokens(_expand_rows(m, n), length, 1) for _, m in captions], dim=1)
    weights = torch.stack([_expand_rows(m, n) for m in weights], dim=1)
    pooled_feats, pooled_mask = pooled
    return RegionText(feats, mask, weights.float(), pooled_feats, pooled_mask)


def as_region_text(cond, latent_size: tuple[int, int]) -> RegionText:
    """A text condition as a RegionText: a (features, mask) pair becomes one region over the whole image, pooled as
    itself (what the plain model computes)."""
    if getattr(cond, "by_region", False):
        return cond
    feats, mask = _as_caption(cond)
    h, w = latent_size
    return RegionText(feats[:, None], mask[:, None], torch.ones(1, 1, h, w), feats, mask)


def batch_regions(conds: Sequence, batch: int, device=None) -> RegionText:
    """Stack text conditions (RegionTexts or (features, mask) pairs, each of 1 or `batch` rows) into one RegionText
    of len(conds) * batch rows in the order given, right-padded to common region, token and pooled-token counts.

    Padding regions have weight 0 everywhere and one unmasked zero token (so that their attention is defined).
    """
    sizes = {c.latent_size for c in conds if getattr(c, "by_region", False)}
    if len(sizes) != 1:
        raise ValueError(f"the text conditions by region are laid out for different latent sizes: {sorted(sizes)}")
    (size,) = sizes
    texts = [as_region_text(c, size) for c in conds]
    n_regions = max(t.feats.shape[1] for t in texts)
    length = max(t.feats.shape[2] for t in texts)
    pooled_length = max(t.pooled_feats.shape[1] for t in texts)
    feats, masks, weights, pooled, pooled_masks = [], [], [], [], []
    for t in texts:
        f = _pad_tokens(_pad_tokens(_expand_rows(t.feats, batch), length, 2), n_regions, 1)
        m = _pad_tokens(_pad_tokens(_expand_rows(t.mask, batch), length, 2), n_regions, 1)
        if n_regions > t.feats.shape[1]:
            m = m.clone()
            m[:, t.feats.shape[1]:, 0] = True
        feats.append(f)
        masks.append(m)
        weights.append(_pad_tokens(_expand_rows(t.weights, batch), n_regions, 1))
        pooled.append(_pad_tokens(_expand_rows(t.pooled_feats, batch), pooled_length, 1))
        pooled_masks.append(_pad_tokens(_expand_rows(t.pooled_mask.bool(), batch), pooled_length, 1))
    return RegionText(*(torch.cat(parts).to(device) for parts in (feats, masks, weights, pooled, pooled_masks)))


def token_weights(weights: torch.Tensor, patch_size: int, end_of_line: bool = False) -> torch.Tensor:
    """[N, R, h, w] latent weights -> [N, R, tokens]: the mean over each patch, row-major; end_of_line appends one
    token per row (the Flag-DiT's), weighted by the mean of its row."""
    n, r, h, w = weights.shape
    pooled = F.avg_pool2d(weights.float().reshape(n * r, 1, h, w), patch_size).reshape(n, r, h // patch_size, -1)
    if end_of_line:
        pooled = torch.cat([pooled, pooled.mean(dim=-1, keepdim=True)], dim=-1)
    return pooled.flatten(2)


def region_cross_attention(attention_fn, q, text_k, text_v, text_mask, weights) -> torch.Tensor:
    """The caption attention by region: q [B, H, Lq, D]; text_k, text_v [B*R, H, Lt, D] (row b*R + r: region r of
    sample b) and text_mask [B*R, 1, 1, Lt]; weights [B, R, Lq] the regions' weights at each query token.

    Each query attends to each region's caption alone; the results are mixed by the weights, normalised per token
    (a token no region covers gets zeros). Returns [B, H, Lq, D] in q's dtype.
    """
    b, r = weights.shape[:2]
    qr = q if r == 1 else q.repeat_interleave(r, dim=0)
    out = attention_fn(qr, text_k, text_v, mask=text_mask).unflatten(0, (b, r))  # [B, R, H, Lq, D]
    w = weights.to(device=q.device, dtype=torch.float32)[:, :, None, :, None]
    total = w.sum(dim=1)
    mixed = (out.float() * w).sum(dim=1) / torch.where(total > 0, total, torch.ones_like(total))
    return mixed.to(q.dtype)
