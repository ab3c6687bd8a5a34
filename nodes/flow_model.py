"""The Flag-DiT as ComfyUI's sampling machinery calls it.

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

from lumina_core.model import FlagDiT
from lumina_core.sampling import EXTRAPOLATIONS, extrapolation_kwargs

# transformer_options key a workflow may set to choose the resolution extrapolation of the MODEL path.
EXTRAPOLATION_OPTION = "lumina_extrapolation"
# The default of the MODEL path equals the Lumina Sampler's default, so both samplers compute the same thing.
DEFAULT_EXTRAPOLATION = "t2i"


def lumina_t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ComfyUI's sigma (1 = noise, 0 = data) -> Lumina's t (0 = noise, 1 = data)."""
    return 1.0 - sigma


def comfy_output_from_velocity(v: torch.Tensor) -> torch.Tensor:
    """Lumina's velocity data - noise -> ComfyUI's flow output noise - data."""
    return -v


class ComfyFlagDiT(FlagDiT):
    """A FlagDiT whose forward takes ComfyUI's arguments; every other method (and the parameter names) is the core's.

    `lumina_core.sampling.sample` drives it through `prepare_text`/`forward_with_text`, which are unchanged, so the
    Lumina Sampler and ComfyUI's samplers share one set of weights.
    """

    def __init__(self, config, operations=None, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__(config, operations=operations, device=device, dtype=dtype)
        # ComfyUI's BaseModel.get_dtype() reads diffusion_model.dtype: the storage dtype of the weights.
        self.dtype = dtype

    def forward(self, x, timesteps, context=None, attention_mask=None, transformer_options=None, **kwargs):
        """ComfyUI's call: x [B,4,h,w] model-space latent, timesteps = sigma [B], context = text features [B,L,D],
        attention_mask [B,L] (nonzero on real tokens). Returns noise - data."""
        if context is None:
            raise ValueError(
                "No text conditioning reached the Lumina Flag-DiT: connect the sampler's positive and negative "
                "inputs to Lumina Text Encode nodes."
            )
        if attention_mask is None:
            mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        else:
            mask = attention_mask != 0
        t = lumina_t_from_sigma(timesteps.float())
        options = transformer_options or {}
        mode = options.get(EXTRAPOLATION_OPTION, DEFAULT_EXTRAPOLATION)
        if mode not in EXTRAPOLATIONS:
            raise ValueError(f"transformer_options[{EXTRAPOLATION_OPTION!r}] = {mode!r}; use one of {EXTRAPOLATIONS}")
        # One sampling step shares one t across the batch; time-aware extrapolation switches on it.
        extra = extrapolation_kwargs(mode, x.shape[-2], x.shape[-1], float(t.reshape(-1)[0]))
        v = super().forward(x, t, context, mask, **extra)
        return comfy_output_from_velocity(v)
