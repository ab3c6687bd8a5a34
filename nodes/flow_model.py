"""The Lumina DiTs (Flag-DiT, Next-DiT) as ComfyUI's sampling machinery calls them.

ComfyUI's flow models ("FLOW" model type, `CONST` parameterisation) describe the path as x = sigma*noise +
(1-sigma)*data and expect the network to return v_comfy = noise - data, from which they compute
denoised = x - sigma*v_comfy. Lumina-T2I uses t = 1 - sigma (0 = noise, 1 = data) and predicts v = data - noise.
The conversion between the two conventions lives here and nowhere else on the model side (the schedule side is
`lumina_core.sampling.schedule.sigmas_from_time_grid`); ComfyUI's own Lumina 2 does the same (SPEC.md §5).

Per-step work that is not tensor maths (sigma -> t, the resolution extrapolation of the step with the Next-DiT's
time-aware RoPE switch decided at the step's t, finding the text prepared for this generation, the RoPE tables of
the step's size) is done by `apply_model_wrapper`, outside the network's forward, so that `torch.compile` (ComfyUI's
TorchCompileModel) traces every family's forward as one graph: the forward then receives a `LuminaStep` and only
computes, reading its tables from the text's cache.

Nothing here imports ComfyUI, so the conversion, the wrappers and the cache are tested without it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from lumina_core.families import LUMINA_T2I, family_of
from lumina_core.models.blocks import LuminaDiT, TextContext
from lumina_core.models.flag_dit import FlagDiT
from lumina_core.models.next_dit import NextDiT, decide_rope_factors
from lumina_core.models.regions import RegionText
from lumina_core.models.unified_next_dit import UnifiedNextDiT
from lumina_core.sampling.loop import EXTRAPOLATIONS

from .regions import POOLED, POOLED_MASK, REGION_WEIGHTS, region_kwargs

logger = logging.getLogger(__name__)

# transformer_options key a workflow may set to choose the resolution extrapolation of the MODEL path.
EXTRAPOLATION_OPTION = "lumina_extrapolation"
# The default of the MODEL path is the family's (Lumina-T2I: "t2i"), the Lumina Sampler's default for it, so both
# samplers compute the same thing.
DEFAULT_EXTRAPOLATION = LUMINA_T2I.defaults.extrapolation
# transformer_options key holding the per-generation TextCache (set by `outer_sample_wrapper`).
TEXT_CACHE_OPTION = "lumina_text_cache"
# transformer_options key: the sigma the Lumina DiT computes at when ComfyUI's sigma is only a stand-in (see
# nodes/flow_sampler.py: the end point sigma = 0 is evaluated at a floor sigma, the DiT at exactly 0).
NETWORK_SIGMA_OPTION = "lumina_network_sigma"
# The keyword argument that carries a LuminaStep from the wrapper to the forward.
STEP_KWARG = "lumina_step"


def lumina_t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ComfyUI's sigma (1 = noise, 0 = data) -> Lumina's t (0 = noise, 1 = data)."""
    return 1.0 - sigma


def comfy_output_from_velocity(v: torch.Tensor) -> torch.Tensor:
    """Lumina's velocity data - noise -> ComfyUI's flow output noise - data."""
    return -v


def velocity_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """The Lumina velocity of any flow model from ComfyUI's denoised prediction: denoised = x + sigma*v, so
    v = (denoised - x) / sigma (undefined at sigma = 0, where denoised = x)."""
    return (denoised - x) / sigma


@dataclass
class LuminaStep:
    """What one network call needs beyond x: Lumina's t [B], the text prepared for this generation and the
    extrapolation keyword arguments of this step (plain numbers, so torch.compile specialises on them)."""

    t: torch.Tensor
    text: TextContext
    extrapolation: dict = field(default_factory=dict)


class TextCache:
    """The text work of one generation (caption pooling, every layer's text keys/values), reused at every step.

    ComfyUI re-concatenates the conds into new tensors at every step, so the entries are keyed on what is stable
    for a generation (the conds' uuids and their cond/uncond order, the device) and confirmed by an equality check
    on the text tensors (cheap next to a forward). `prepared` counts the preparations, for tests and benchmarks.
    """

    def __init__(self):
        self.entries: dict = {}
        self.prepared = 0

    def get(self, dit, key, context: torch.Tensor, mask: torch.Tensor,
            regions: Optional[RegionText] = None) -> TextContext:
        tensors = (context, mask) if regions is None else (
            regions.feats, regions.mask, regions.weights, regions.pooled_feats, regions.pooled_mask)
        entry = self.entries.get(key)
        if entry is not None:
            old, text = entry
            if len(old) == len(tensors) and all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(old, tensors)):
                return text
        text = _prepare(dit, context, mask, regions)
        self.prepared += 1
        self.entries[key] = (tensors, text)
        return text


def _prepare(dit, context, mask, regions: Optional[RegionText]) -> TextContext:
    return dit.prepare_text(context, mask) if regions is None else dit.prepare_regions([regions], context.shape[0])


def _region_text(context: torch.Tensor, mask: torch.Tensor, regions: dict) -> Optional[RegionText]:
    """The text by region of a call whose context is [B, R, L, D] (merged area conditioning, nodes/regions.py)."""
    if context.ndim != 4:
        return None
    missing = [k for k in (REGION_WEIGHTS, POOLED, POOLED_MASK) if regions.get(k) is None]
    if missing:
        raise ValueError(f"region text features {tuple(context.shape)} came without {', '.join(missing)}")
    return RegionText(context, mask, regions[REGION_WEIGHTS].float(), regions[POOLED].to(context),
                      regions[POOLED_MASK].to(context.device) != 0)


def _text_mask(context: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
    return attention_mask.to(context.device) != 0


def _extrapolation_mode(options: dict, default: str) -> str:
    mode = options.get(EXTRAPOLATION_OPTION, default)
    if mode not in EXTRAPOLATIONS:
        raise ValueError(f"transformer_options[{EXTRAPOLATION_OPTION!r}] = {mode!r}; use one of {EXTRAPOLATIONS}")
    return mode


def make_step(dit, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
              attention_mask: Optional[torch.Tensor], transformer_options: dict, **regions) -> LuminaStep:
    """The LuminaStep of one call: t from the network sigma, the text from the generation's cache (or prepared
    now when there is none), and the step's extrapolation (the Next-DiT's time-aware switch decided at t) with the
    RoPE tables of this size computed ahead into the text's cache, so that the forward only reads them.

    regions: the model conds of a text by region (nodes/regions.py), with context [B, R, L, D]."""
    options = transformer_options or {}
    network_sigma = options.get(NETWORK_SIGMA_OPTION)
    if network_sigma is not None:
        sigma = torch.full(sigma.shape, float(network_sigma), dtype=sigma.dtype, device=sigma.device)
    # In sigma's precision, then fp32: a float64 sigma (the Lumina ODE sampler's) gives the solver's t rounded once.
    t = lumina_t_from_sigma(sigma).float().to(x.device)
    mask = _text_mask(context, attention_mask)
    by_region = _region_text(context, mask, regions)
    cache = options.get(TEXT_CACHE_OPTION)
    if cache is None:
        text = _prepare(dit, context, mask, by_region)
    else:
        key = (tuple(options.get("uuids") or ()), tuple(options.get("cond_or_uncond") or ()), str(x.device))
        text = cache.get(dit, key, context, mask, by_region)
    # One sampling step shares one t across the batch; time-aware extrapolation switches on it.
    family = family_of(dit)
    mode = _extrapolation_mode(options, family.defaults.extrapolation)
    step_t = float(t.reshape(-1)[0])
    extra = family.extrapolation_kwargs(mode, x.shape[-2], x.shape[-1], step_t, family.defaults.watershed)
    p = dit.config.patch_size
    rows, cols = x.shape[-2] // p, x.shape[-1] // p
    if isinstance(dit, FlagDiT):
        seq_len = rows * (cols + 1)  # patches plus one end-of-line token per row
        dit.rope(seq_len, ntk_factor=extra.get("ntk_factor", 1.0),
                 rope_scaling_factor=extra.get("rope_scaling_factor"), device=x.device, cache=text.rope_cache)
    elif isinstance(dit, NextDiT):
        # The float the forward would read off t: the factors it would choose, as plain numbers.
        extra = decide_rope_factors(extra, step_t)
        dit.rope(rows, cols, ntk_factor=extra.get("ntk_factor", 1.0), linear_factor=extra.get("linear_factor", 1.0),
                 device=x.device, cache=text.rope_cache)
    elif isinstance(dit, UnifiedNextDiT):
        dit.rope_tables(x.device, text.rope_cache)
        dit.image_grid(rows, cols, x.device, text.rope_cache)
    return LuminaStep(t=t, text=text, extrapolation=extra)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    """ComfyUI APPLY_MODEL wrapper of the Lumina MODEL (registered at load): adds the call's LuminaStep.

    Runs in eager mode around BaseModel._apply_model, outside any compiled diffusion model, with ComfyUI's sigma
    `t` as the samplers pass it (before model_sampling.timestep, so shift/multiplier patches do not matter).
    """
    dit = executor.class_obj.diffusion_model
    dit = getattr(dit, "_orig_mod", dit)  # a torch.compile'd module wraps the DiT
    if c_crossattn is not None and isinstance(dit, LuminaDiT):
        kwargs[STEP_KWARG] = make_step(dit, x, t, c_crossattn.to(x.device), kwargs.get("attention_mask"),
                                       transformer_options, **region_kwargs(kwargs))
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def outer_sample_wrapper(executor, *args, **kwargs):
    """ComfyUI OUTER_SAMPLE wrapper of the Lumina MODEL (registered at load): one TextCache per generation,
    created when sampling starts and dropped when it ends."""
    guider = executor.class_obj
    options = guider.model_options.setdefault("transformer_options", {})
    previous = options.get(TEXT_CACHE_OPTION)
    options[TEXT_CACHE_OPTION] = cache = TextCache()
    try:
        return executor(*args, **kwargs)
    finally:
        logger.debug("Lumina text prepared %d time(s) in this generation", cache.prepared)
        if previous is None:
            options.pop(TEXT_CACHE_OPTION, None)
        else:
            options[TEXT_CACHE_OPTION] = previous


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
        # Read by ComfyUI nodes that split latent channels (RenormCFG).
        self.in_channels = config.in_channels

    def forward(self, x, timesteps, context=None, attention_mask=None, transformer_options=None, lumina_step=None,
                **kwargs):
        """ComfyUI's call: x [B,4,h,w] model-space latent, timesteps = sigma [B], context = text features [B,L,D],
        attention_mask [B,L] (nonzero on real tokens). Returns noise - data.

        With `lumina_step` (added by `apply_model_wrapper`) the call is pure tensor maths; without it (a direct
        call) the text and the extrapolation are worked out here.
        """
        if lumina_step is None:
            if context is None:
                family = family_of(self)
                raise ValueError(
                    f"No text conditioning reached the {family.title} {family.dit_title}: connect the sampler's "
                    f"positive and negative inputs to Lumina Text Encode nodes."
                )
            lumina_step = make_step(self, x, timesteps, context, attention_mask, transformer_options or {},
                                    **region_kwargs(kwargs))
        step = lumina_step
        return comfy_output_from_velocity(self.forward_with_text(x, step.t, step.text, **step.extrapolation))


class ComfyFlagDiT(ComfyFlowMixin, FlagDiT):
    """The Lumina-T2I Flag-DiT with ComfyUI's forward."""


class ComfyNextDiT(ComfyFlowMixin, NextDiT):
    """The Lumina-Next Next-DiT with ComfyUI's forward."""


class ComfyUnifiedNextDiT(ComfyFlowMixin, UnifiedNextDiT):
    """The Lumina-Image-2.0 Unified Next-DiT with ComfyUI's forward."""


_COMFY_CLASSES = {cls.family: cls for cls in (ComfyFlagDiT, ComfyNextDiT, ComfyUnifiedNextDiT)}


def comfy_dit_class(family) -> type:
    """The ComfyUI-callable DiT class of a family; a new family's DiT gets one made on demand."""
    if family.name not in _COMFY_CLASSES:
        base = family.dit_class()
        _COMFY_CLASSES[family.name] = type(f"Comfy{base.__name__}", (ComfyFlowMixin, base), {})
    return _COMFY_CLASSES[family.name]
