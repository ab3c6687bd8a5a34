"""ComfyUI's area and mask conditioning as text by region (`lumina_core.models.regions`): the entries of one
CONDITIONING (ConditioningSetArea / ConditioningSetAreaPercentage / ConditioningSetMask, their strengths,
ConditioningCombine) become region captions of ONE forward per sampling step and CFG branch.

ComfyUI's default for such conditioning is one model call per entry, each on its crop of the latent, blended by
weight maps (`comfy.samplers.calc_cond_batch`, `get_area_and_mult`). The Lumina DiTs can do better, as Lumina-Next's
compositional demo does: every image token sees the whole image and attends only to the captions of its regions.
`calc_cond_batch_wrapper` (ComfyUI's CALC_COND_BATCH wrapper, registered on the Lumina MODEL at load, so it applies
under KSampler, SamplerCustomAdvanced with any guider and the Lumina Sampler) merges each branch's entries into one
entry before ComfyUI's batching sees them, whose model conds carry the regions:

- an entry's weight map at latent resolution is ComfyUI's `mult` without its feathering: 1 inside the area (0
  outside), times the mask (resized to the latent by ComfyUI, as it does for its own use), times mask_strength, times
  strength; a token's weight is the mean over its patch. Tokens mix their regions' caption attention by these weights,
  normalised, as ComfyUI mixes its per-area predictions; a token no entry covers attends to no caption.
- entries of one branch that share their text (ComfyUI copies the negative into every area of the positive) are one
  region whose weight maps add up.
- the adaLN caption of a branch is the global caption LuminaRegionGrid attaches, or else every region caption's tokens
  pooled together (the original pools the region captions joined into one).
- ConditioningSetTimestepRange is honoured per step (an inactive entry is left out of that step's regions).

Conditioning with ControlNets, GLIGEN or hooks keeps ComfyUI's own per-entry handling, as does a DiT without caption
cross-attention (Lumina-Image-2.0). Nothing here imports ComfyUI: its cond class is passed in.
"""

from __future__ import annotations

import logging
import uuid
from typing import Optional

import torch

from lumina_core.models.regions import batch_regions, mask_weights, region_text

from .common import text_from_conditioning

logger = logging.getLogger(__name__)

# Conditioning extras key (set by LuminaRegionGrid): (features [1, L, D], mask [1, L]) of the global caption whose
# pooled features condition adaLN, as the original's global caption does.
GLOBAL_CAPTION_KEY = "lumina_global_caption"
# Model conds of a merged text by region (and keyword arguments of the DiT's forward), besides c_crossattn
# [B, R, L, D] and attention_mask [B, R, L]: the regions' weights [B, R, h, w] and the adaLN caption.
REGION_WEIGHTS = "lumina_region_weights"
POOLED = "lumina_pooled"
POOLED_MASK = "lumina_pooled_mask"
REGION_CONDS = (REGION_WEIGHTS, POOLED, POOLED_MASK)
# What a merged entry no longer holds: its area and weights are in the model conds.
_PER_ENTRY = ("area", "mask", "strength", "mask_strength", "set_area_to_bounds", "timestep_start", "timestep_end")
# Entries with these keep ComfyUI's per-entry handling (they act on the entry's crop or its own weights).
_NOT_MERGED = ("control", "gligen", "hooks", "default")
_UUIDS = uuid.UUID("6b1c3a52-96a4-4a4e-8f0b-4c756d696e61")


def _area_box(area, height: int, width: int) -> tuple[int, int, int, int]:
    """(h, w, y, x) in latent pixels of a ComfyUI area: (h, w, y, x) already, or ("percentage", h, w, y, x) of the
    image, rounded as ComfyUI resolves it."""
    if area[0] == "percentage":
        a = area[1:]
        return max(1, round(a[0] * height)), max(1, round(a[1] * width)), round(a[2] * height), round(a[3] * width)
    return tuple(int(v) for v in area[:4])


def entry_weights(entry: dict, latent_size, device=None) -> torch.Tensor:
    """[n, h, w] weight map of one conditioning entry (its extras dict) over a latent of latent_size = (h, w): area
    indicator x mask (resized to the latent) x mask_strength x strength; 1 everywhere for an entry with none."""
    h, w = int(latent_size[0]), int(latent_size[1])
    weights = torch.ones(1, h, w, device=device)
    if entry.get("area") is not None:
        ah, aw, ay, ax = _area_box(entry["area"], h, w)
        inside = torch.zeros(1, h, w, device=device)
        inside[:, max(ay, 0):max(ay + ah, 0), max(ax, 0):max(ax + aw, 0)] = 1.0
        weights = weights * inside
    if entry.get("mask") is not None:
        mask = mask_weights(entry["mask"].to(device), h, w) * float(entry.get("mask_strength", 1.0))
        weights = weights * mask
    return weights * float(entry.get("strength", 1.0))


def has_regions(extras: dict) -> bool:
    """Whether a conditioning entry asks for more than one caption over the whole image."""
    return any(extras.get(k) is not None for k in ("area", "mask", GLOBAL_CAPTION_KEY))


# ----------------------------------------------------------------------------------------------------------------
# Plain Python: the Lumina Sampler's conditioning as the core's text


def conditioning_text(conditioning, cap_feat_dim: int, which: str, family: Optional[str], latent_size):
    """The text of a CONDITIONING for `lumina_core.sample`: (features, mask) for one plain entry, else a RegionText
    of its entries (each checked as Lumina text of the DiT's family and width)."""
    if not conditioning:
        return text_from_conditioning(conditioning, cap_feat_dim, which, family=family)
    texts = [text_from_conditioning([entry], cap_feat_dim, which, family=family) for entry in conditioning]
    if len(conditioning) == 1 and not has_regions(conditioning[0][1]):
        return texts[0]
    pooled = None
    regions = []
    for text, (_, extras) in zip(texts, conditioning):
        if any(k in extras for k in ("start_percent", "end_percent")):
            raise ValueError(
                f"The {which} conditioning has a timestep range (ConditioningSetTimestepRange), which only ComfyUI's "
                f"sampling applies: run the workflow in ComfyUI."
            )
        regions.append((text, entry_weights(extras, latent_size)))
        if pooled is None and extras.get(GLOBAL_CAPTION_KEY) is not None:
            pooled = extras[GLOBAL_CAPTION_KEY]
    return region_text(regions, latent_size, pooled=pooled)


# ----------------------------------------------------------------------------------------------------------------
# Inside ComfyUI: one merged entry per CFG branch


def _active(entry: dict, timestep) -> bool:
    """ComfyUI's timestep-range test of `get_area_and_mult`."""
    sigma = timestep[0]
    if "timestep_start" in entry and sigma > entry["timestep_start"]:
        return False
    if "timestep_end" in entry and sigma < entry["timestep_end"]:
        return False
    return True


def _needs_regions(branch) -> bool:
    if not branch:
        return False
    return len(branch) > 1 or any(
        "area" in e or "mask" in e or POOLED in e.get("model_conds", {}) for e in branch
    )


def _fit_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """ComfyUI's repeat_to_batch_size: the first `batch` rows, repeated as needed."""
    if t.shape[0] > batch:
        return t[:batch]
    if t.shape[0] < batch:
        return t.repeat((-(-batch // t.shape[0]),) + (1,) * (t.ndim - 1))[:batch]
    return t


def _branch_regions(entries: list, latent_size, batch: int, device):
    """The RegionText of one branch's active entries (entries that share their text are one region)."""
    groups: dict = {}
    pooled = None
    for entry in entries:
        model_conds = entry["model_conds"]
        text = model_conds["c_crossattn"]
        weights = _fit_batch(entry_weights(entry, latent_size, device), batch)
        if id(text) in groups:
            groups[id(text)][1] = groups[id(text)][1] + weights
        else:
            mask = model_conds["attention_mask"].cond != 0
            groups[id(text)] = [(_fit_batch(text.cond, batch), _fit_batch(mask, batch)), weights]
        if pooled is None and POOLED in model_conds:
            pooled = (model_conds[POOLED].cond, model_conds[POOLED_MASK].cond != 0)
    return region_text([(caption, weights) for caption, weights in groups.values()], latent_size, pooled=pooled)


def merge_branches(conds: list, x_in: torch.Tensor, timestep, cond_class) -> Optional[list]:
    """Each CFG branch's conditioning entries (ComfyUI's processed cond dicts) as one entry holding its text by
    region, all branches padded alike so that ComfyUI batches them into one call; None when no branch has areas,
    masks, a global caption or several entries (nothing to merge), or when an entry needs ComfyUI's own handling.

    cond_class: the class of the merged model conds (ComfyUI's CONDRegular)."""
    if not any(_needs_regions(branch) for branch in conds):
        return None
    if any(k in e for branch in conds if branch for e in branch for k in _NOT_MERGED):
        logger.debug("Lumina regions: conditioning with ControlNet, GLIGEN or hooks keeps ComfyUI's per-area calls")
        return None
    batch, latent_size, device = x_in.shape[0], tuple(x_in.shape[-2:]), x_in.device
    actives = [None if branch is None else [e for e in branch if _active(e, timestep)] for branch in conds]
    texts = [_branch_regions(active, latent_size, batch, device) for active in actives if active]
    if not texts:
        return [None if a is None else [] for a in actives]
    stacked = batch_regions(texts, batch, device)
    merged, row = [], 0
    for active in actives:
        if not active:
            merged.append(None if active is None else [])
            continue
        rows = slice(row, row + batch)
        row += batch
        entry = {k: v for k, v in active[0].items() if k not in _PER_ENTRY}
        entry["model_conds"] = {
            "c_crossattn": cond_class(stacked.feats[rows]),
            "attention_mask": cond_class(stacked.mask[rows].to(torch.int64)),
            REGION_WEIGHTS: cond_class(stacked.weights[rows]),
            POOLED: cond_class(stacked.pooled_feats[rows]),
            POOLED_MASK: cond_class(stacked.pooled_mask[rows].to(torch.int64)),
        }
        # Stable over the steps for the same entries, so the generation's text cache finds the prepared text.
        entry["uuid"] = uuid.uuid5(_UUIDS, ",".join(str(e.get("uuid")) for e in active))
        merged.append([entry])
    return merged


def region_kwargs(kwargs: dict) -> dict:
    """The region model conds among a model call's keyword arguments (empty for one caption per sample)."""
    return {k: kwargs[k] for k in REGION_CONDS if kwargs.get(k) is not None}


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """ComfyUI CALC_COND_BATCH wrapper of the Lumina MODEL (registered at load): each branch's area and mask
    conditioning merged into one text by region, so that ComfyUI evaluates the DiT once per step for all branches
    (its default would be one call per area) with each token attending to its regions' captions."""
    from .comfy_env import comfy

    dit = model.diffusion_model
    dit = getattr(dit, "_orig_mod", dit)  # a torch.compile'd module wraps the DiT
    if hasattr(dit, "prepare_regions"):
        merged = merge_branches(conds, x_in, timestep, comfy.conds.CONDRegular)
        if merged is not None:
            conds = merged
    return executor(model, conds, x_in, timestep, model_options)
