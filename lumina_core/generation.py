"""`sample` with the settings of the model's family: the registry's demo defaults and extrapolation rule handed to
the family-independent loop of `lumina_core.sampling.loop`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .families import family_of
from .models.regions import region_text
from .sampling import loop


def sample(model, noise: torch.Tensor, cond: Optional[tuple], uncond: Optional[tuple], *,
           regions: Optional[Sequence] = None, **settings) -> torch.Tensor:
    """Generate model-space latents at t = 1 (see `lumina_core.sampling.loop.sample` for the arguments).

    Settings left out take the defaults of the model family's original demo: Lumina-T2I euler, Lumina-Next
    midpoint with time-aware extrapolation; both 29 steps, cfg 4, shift 4. A model that names no family (a plain
    callable) is taken as a Lumina-T2I model.

    regions: a caption per region, [(caption, box_or_mask), ...] or [(caption, box_or_mask, strength), ...], as
    Lumina-Next's compositional generation (`lumina_core.models.regions.region_text`: a caption is features or
    (features, mask); a box is (left, top, right, bottom) in fractions of the image, None the whole image; a mask
    any size). Each image token attends only to its regions' captions; cond is then the global caption that
    conditions adaLN (None: all the region captions' tokens pooled together). Flag-DiT and Next-DiT only.
    """
    if regions is not None:
        cond = region_text(regions, noise.shape[-2:], pooled=cond)
    elif cond is None:
        raise ValueError("sample needs a text condition: cond, or regions")
    family = family_of(model, default="lumina_t2i")
    settings.setdefault("defaults", family.defaults)
    settings.setdefault("extrapolation_rule", family.extrapolation_kwargs)
    return loop.sample(model, noise, cond, uncond, **settings)
