"""The whole generation: a family's demo settings, the grid, guidance and a solver around a DiT.

Follows the sampling of `lumina_t2i/demo.py` and `lumina_next_t2i/demo.py` (Alpha-VLLM/Lumina-T2X; SPEC.md §5, §8):
cond and uncond in one batch on the same latent, guidance, then the ODE solver; img2img as the Lumina-Next mini
sampler. This module knows no family: `SamplingDefaults` and the extrapolation rule come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .guidance import GUIDANCE_MODES, batch_text, guide
from .schedule import time_grid
from .solvers import SOLVERS, solve

# Resolution extrapolation modes (what each means is the model's rule; see lumina_core.models).
EXTRAPOLATIONS = ("t2i", "time_aware", "off")


@dataclass(frozen=True)
class SamplingDefaults:
    """The settings of a family's original demo. steps counts solver steps (the demos' 30 grid points = 29)."""

    solver: str
    steps: int
    cfg: float
    shift: float
    extrapolation: str
    guidance: str = "faithful"
    watershed: float = 0.3
    negative_prompt: str = ""


def sample(
    model,
    noise: torch.Tensor,
    cond: tuple,
    uncond: Optional[tuple],
    *,
    steps: Optional[int] = None,
    cfg: Optional[float] = None,
    shift: Optional[float] = None,
    solver: Optional[str] = None,
    denoise: float = 1.0,
    init_latent: Optional[torch.Tensor] = None,
    extrapolation: Optional[str] = None,
    guidance: Optional[str] = None,
    callback: Optional[Callable[[dict], None]] = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    max_evals: int = 2000,
    watershed: Optional[float] = None,
    defaults: Optional[SamplingDefaults] = None,
    extrapolation_rule: Optional[Callable[..., dict]] = None,
) -> torch.Tensor:
    """Generate model-space latents (SDXL-VAE latent * 0.13025) at t = 1.

    model: a DiT with prepare_text/forward_with_text (its text work is then done once per generation), or any
    callable model(x, t, cap_feats, cap_mask, **extrapolation_keywords) -> velocity.
    noise: [B, 4, h, w] Gaussian noise (see make_noise); its device and dtype are the sampler's.
    cond, uncond: (features [1 or B, L, D], mask [1 or B, L]); uncond is unused (may be None) when cfg == 1.
    init_latent: model-space latent for img2img; the start is noise*(1-t0) + init_latent*t0.
    Settings left at None take `defaults` (a family's demo settings); extrapolation_rule(mode, latent_h, latent_w,
    t, watershed) -> the model's keywords for that step (None: no keywords, the model's plain forward). The caller
    gives both: `lumina_core.sample` fills them in from the model's family in the registry.
    """
    if defaults is None:
        raise ValueError("sampling.loop.sample needs the sampling defaults: call lumina_core.sample, or pass defaults=")
    steps = defaults.steps if steps is None else steps
    cfg = defaults.cfg if cfg is None else cfg
    shift = defaults.shift if shift is None else shift
    solver = defaults.solver if solver is None else solver
    extrapolation = defaults.extrapolation if extrapolation is None else extrapolation
    guidance = defaults.guidance if guidance is None else guidance
    watershed = defaults.watershed if watershed is None else watershed
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance mode {guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}")
    if extrapolation_rule is not None and extrapolation not in EXTRAPOLATIONS:
        raise ValueError(f"unknown extrapolation {extrapolation!r}; choose one of {', '.join(EXTRAPOLATIONS)}")
    if not cfg >= 0:
        raise ValueError(f"cfg must be >= 0, got {cfg!r}")
    if noise.ndim != 4:
        raise ValueError(f"noise must be [batch, channels, height, width], got shape {tuple(noise.shape)}")
    grid = time_grid(steps, shift, denoise)
    b, _, lh, lw = noise.shape
    device = noise.device

    x = noise
    if init_latent is not None and denoise < 1.0:
        if init_latent.shape != noise.shape:
            raise ValueError(f"init_latent shape {tuple(init_latent.shape)} differs from noise {tuple(noise.shape)}")
        t0 = float(grid[0])
        x = noise * (1 - t0) + init_latent.to(noise) * t0
    if len(grid) < 2:
        return x

    use_cfg = cfg != 1.0
    if use_cfg and uncond is None:
        raise ValueError("cfg != 1 needs a negative (unconditional) text condition")
    feats, mask = batch_text([cond, uncond] if use_cfg else [cond], b, device)
    reps = 2 if use_cfg else 1

    prepared = hasattr(model, "prepare_text") and hasattr(model, "forward_with_text")
    if prepared:
        text = model.prepare_text(feats, mask)

        def velocity(xb, tb, kwargs):
            return model.forward_with_text(xb, tb, text, **kwargs)

    else:

        def velocity(xb, tb, kwargs):
            return model(xb, tb, feats, mask, **kwargs)

    def fn(xt: torch.Tensor, t: float) -> torch.Tensor:
        kwargs = {} if extrapolation_rule is None else extrapolation_rule(extrapolation, lh, lw, t, watershed)
        xb = xt.repeat(reps, 1, 1, 1) if reps > 1 else xt
        tb = torch.full((b * reps,), t, device=device, dtype=torch.float32)
        v = velocity(xb, tb, kwargs).to(xt.dtype)
        if not use_cfg:
            return v
        v_cond, v_uncond = v.chunk(2)
        return guide(v_cond, v_uncond, cfg, guidance)

    with torch.no_grad():
        return solve(fn, x, grid, solver, callback=callback, atol=atol, rtol=rtol, max_evals=max_evals)
