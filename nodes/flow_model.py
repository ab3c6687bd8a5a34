"""The Lumina DiTs (Flag-DiT, Next-DiT) as ComfyUI's sampling machinery calls them.

ComfyUI's flow models ("FLOW" model type, `CONST` parameterisation) describe the path as x = sigma*noise +
(1-sigma)*data and expect the network to return v_comfy = noise - data, from which they compute
denoised = x - sigma*v_comfy. Lumina-T2I uses t = 1 - sigma (0 = noise, 1 = data) and predicts v = data - noise.
The conversion between the two conventions lives here and nowhere else on the model side (the schedule side is
`lumina_core.sampling.sigmas_from_time_grid`); ComfyUI's own Lumina 2 does the same (SPEC.md §5).

Nothing here imports ComfyUI, so the conversion is tested without it.
"""

from __future__ import annotations

from typing import Optional

import torch

from lumina_core.families import LUMINA_T2I, family_of
from lumina_core.model import FlagDiT
from lumina_core.next_dit import NextDiT
from lumina_core.sampling import EXTRAPOLATIONS

# transformer_options key a workflow may set to choose the resolution extrapolation of the MODEL path.
EXTRAPOLATION_OPTION = "lumina_extrapolation"
# The default of the MODEL path is the family's (Lumina-T2I: "t2i"), the Lumina Sampler's default for it, so both
# samplers compute the same thing.
DEFAULT_EXTRAPOLATION = LUMINA_T2I.defaults.extrapolation


def lumina_t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ComfyUI's sigma (1 = noise, 0 = data) -> Lumina's t (0 = noise, 1 = data)."""
    return 1.0 - sigma


def comfy_output_from_velocity(v: torch.Tensor) -> torch.Tensor:
    """Lumina's velocity data - noise -> ComfyUI's flow output noise - data."""
    return -v


class ComfyFlowMixin:
    """Gives a Lumina DiT ComfyUI's forward; every other method (and the parameter names) stays the core's.

    `lumina_core.sampling.sample` drives the same object through `prepare_text`/`forward_with_text`, which are
    unchanged, so the Lumina Sampler and ComfyUI's samplers share one set of weights. The resolution extrapolation
    of this path is the family's default (its demo's) unless transformer_options sets EXTRAPOLATION_OPTION.
    """

    def __init__(self, config, operations=None, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__(config, operations=operations, device=device, dtype=dtype)
        # ComfyUI's BaseModel.get_dtype() reads diffusion_model.dtype: the storage dtype of the weights.
        self.dtype = dtype

    def forward(self, x, timesteps, context=None, attention_mask=None, transformer_options=None, **kwargs):
        """ComfyUI's call: x [B,4,h,w] model-space latent, timesteps = sigma [B], context = text features [B,L,D],
        attention_mask [B,L] (nonzero on real tokens). Returns noise - data."""
        family = family_of(self)
        if context is None:
            raise ValueError(
                f"No text conditioning reached the {family.title} {family.dit_title}: connect the sampler's positive "
                f"and negative inputs to Lumina Text Encode nodes."
            )
        if attention_mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        else:
            mask = attention_mask != 0
        t = lumina_t_from_sigma(timesteps.float())
        options = transformer_options or {}
        mode = options.get(EXTRAPOLATION_OPTION, family.defaults.extrapolation)
        if mode not in EXTRAPOLATIONS:
            raise ValueError(f"transformer_options[{EXTRAPOLATION_OPTION!r}] = {mode!r}; use one of {EXTRAPOLATIONS}")
        # One sampling step shares one t across the batch; time-aware extrapolation switches on it.
        extra = family.extrapolation_kwargs(
            mode, x.shape[-2], x.shape[-1], float(t.reshape(-1)[0]), family.defaults.watershed
        )
        v = super().forward(x, t, context, mask, **extra)
        return comfy_output_from_velocity(v)


class ComfyFlagDiT(ComfyFlowMixin, FlagDiT):
    """The Lumina-T2I Flag-DiT with ComfyUI's forward."""


class ComfyNextDiT(ComfyFlowMixin, NextDiT):
    """The Lumina-Next Next-DiT with ComfyUI's forward."""


_COMFY_CLASSES = {cls.family: cls for cls in (ComfyFlagDiT, ComfyNextDiT)}


def comfy_dit_class(family) -> type:
    """The ComfyUI-callable DiT class of a family; a new family's DiT gets one made on demand."""
    if family.name not in _COMFY_CLASSES:
        base = family.dit_class()
        _COMFY_CLASSES[family.name] = type(f"Comfy{base.__name__}", (ComfyFlowMixin, base), {})
    return _COMFY_CLASSES[family.name]
