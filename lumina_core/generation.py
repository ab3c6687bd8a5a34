"""`sample` with the settings of the model's family: the registry's demo defaults and extrapolation rule handed to
the family-independent loop of `lumina_core.sampling.loop`."""

from __future__ import annotations

from typing import Optional

import torch

from .families import family_of
from .sampling import loop


def sample(model, noise: torch.Tensor, cond: tuple, uncond: Optional[tuple], **settings) -> torch.Tensor:
    """Generate model-space latents at t = 1 (see `lumina_core.sampling.loop.sample` for the arguments).

    Settings left out take the defaults of the model family's original demo: Lumina-T2I euler, Lumina-Next
    midpoint with time-aware extrapolation; both 29 steps, cfg 4, shift 4. A model that names no family (a plain
    callable) is taken as a Lumina-T2I model.
    """
    family = family_of(model, default="lumina_t2i")
    settings.setdefault("defaults", family.defaults)
    settings.setdefault("extrapolation_rule", family.extrapolation_kwargs)
    return loop.sample(model, noise, cond, uncond, **settings)
