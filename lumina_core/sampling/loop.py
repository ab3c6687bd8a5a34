"""The whole generation: a family's demo settings, the grid, guidance and a solver around a DiT.

Follows the sampling of `lumina_t2i/demo.py` and `lumina_next_t2i/demo.py` (Alpha-VLLM/Lumina-T2X; SPEC.md §5, §8):
cond and uncond in one batch on the same latent, guidance, then the ODE solver; img2img as the Lumina-Next mini
sampler. Lumina-Image-2.0's `sample.py` (SPEC.md §9) adds CFG truncation (the conditional branch alone once t reaches
cfg_trunc), CFG renormalisation and the "dpm" solver on its own grid. This module knows no family:
`SamplingDefaults` and the extrapolation rule come from the caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .guidance import GUIDANCE_MODES, batch_text, guide, guided_at, normalize_rows, renorm
from .schedule import GRIDS, POWER_RHO, POWER_SHIFT, sampling_grid
from .solvers import SOLVERS, solve

# Resolution extrapolation modes (what each means is the model's rule; see lumina_core.models).
EXTRAPOLATIONS = ("t2i", "time_aware", "off")


@dataclass(frozen=True)
class SamplingDefaults:
    """The settings of a family's original demo. steps counts solver steps (the demos' 30 grid points = 29; for
    "dpm" the original's own count, intervals)."""

    solver: str
    steps: int
    cfg: float
    shift: float
    extrapolation: str
    guidance: str = "faithful"
    watershed: float = 0.3
    negative_prompt: str = ""
    # Guide only while the evaluation's t < cfg_trunc (>= 1: always), and clamp the guided velocity's norm to
    # renorm_cfg times the conditional one's (0: off): Lumina-Image-2.0's options; neutral for the other families.
    cfg_trunc: float = 1.0
    renorm_cfg: float = 0.0


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
    cfg_trunc: Optional[float] = None,
    renorm_cfg: Optional[float] = None,
    cfg_normalization: bool = False,
    times: Optional[Sequence[float]] = None,
    grid: str = "lumina",
    grid_shift: float = POWER_SHIFT,
    grid_rho: float = POWER_RHO,
    defaults: Optional[SamplingDefaults] = None,
    extrapolation_rule: Optional[Callable[..., dict]] = None,
    batch_cfg: bool = True,
) -> torch.Tensor:
    """Generate model-space latents (SDXL-VAE latent * 0.13025) at t = 1.

    model: a DiT with prepare_text/forward_with_text (its text work is then done once per generation), or any
    callable model(x, t, cap_feats, cap_mask, **extrapolation_keywords) -> velocity.
    noise: [B, 4, h, w] Gaussian noise (see make_noise); its device and dtype are the sampler's.
    cond, uncond: (features [1 or B, L, D], mask [1 or B, L]), or a text by region (`lumina_core.models.regions`);
    uncond is unused (may be None) when cfg == 1.
    init_latent: model-space latent for img2img; the start is noise*(1-t0) + init_latent*t0.
    solver "dpm" runs on its own grid (`schedule.dpm_time_grid`: steps >= 2 intervals, one evaluation each; denoise
    cuts it as it cuts the others).
    grid: the solver grid. "lumina" (default): the solver's own Lumina grid at `shift`; "power": sigma_i =
    shift_s((1 - i/steps)^rho) with s = grid_shift and rho = grid_rho, `shift` unused (`schedule.power_time_grid`;
    the few-step settings of SPEC.md §12 and the README).
    cfg_trunc: an evaluation at t is guided while t < cfg_trunc (>= 1: always, t = 1 included); later ones run the
    conditional branch alone, b rows instead of 2b. renorm_cfg > 0: the guided velocity's norm per sample (over
    C, H, W) is clamped to renorm_cfg times the conditional velocity's (`guidance.renorm`), at every guided-phase
    evaluation (at cfg 1 too, as the original); 0 is off.
    cfg_normalization: diffusers' meaning of the words (`guidance.normalize_rows`), at every evaluation that runs the
    negative, after guidance.
    times: the solver's grid itself, increasing t from t0 >= 0 to exactly 1 (diffusers' custom sigmas), instead of
    the one made from steps and shift; denoise must then be 1.
    batch_cfg: a guided evaluation runs the positive and the negative as one batch of 2B rows (True, the originals'
    way and the fastest where memory allows) or as two evaluations of B rows (False): the same velocities (each row
    of a batch is computed on its own), with the activations of half the rows at a time. On the CPU with a GGUF
    DiT this lowers the peak memory by about 0.17 GB for the 5B Flag-DiT at 512x512, for about 20% more time per
    step (the weights are dequantized twice; tests/bench/bench_gguf_pipeline.py).
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
    cfg_trunc = defaults.cfg_trunc if cfg_trunc is None else float(cfg_trunc)
    renorm_cfg = defaults.renorm_cfg if renorm_cfg is None else float(renorm_cfg)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if grid not in GRIDS:
        raise ValueError(f"unknown solver grid {grid!r}; choose one of {', '.join(GRIDS)}")
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"unknown guidance mode {guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}")
    if extrapolation_rule is not None and extrapolation not in EXTRAPOLATIONS:
        raise ValueError(f"unknown extrapolation {extrapolation!r}; choose one of {', '.join(EXTRAPOLATIONS)}")
    if not cfg >= 0:
        raise ValueError(f"cfg must be >= 0, got {cfg!r}")
    if not cfg_trunc >= 0:
        raise ValueError(f"cfg_trunc must be >= 0 (1 or more: always guide), got {cfg_trunc!r}")
    if not renorm_cfg >= 0:
        raise ValueError(f"renorm_cfg must be >= 0 (0: off), got {renorm_cfg!r}")
    if noise.ndim != 4:
        raise ValueError(f"noise must be [batch, channels, height, width], got shape {tuple(noise.shape)}")
    ts = sampling_grid(solver, steps, shift, denoise, grid, grid_shift, grid_rho)
    if times is not None:
        ts = given_time_grid(times, denoise)
    b, _, lh, lw = noise.shape
    device = noise.device

    x = noise
    if init_latent is not None and denoise < 1.0:
        if init_latent.shape != noise.shape:
            raise ValueError(f"init_latent shape {tuple(init_latent.shape)} differs from noise {tuple(noise.shape)}")
        t0 = float(ts[0])
        x = noise * (1 - t0) + init_latent.to(noise) * t0
    if len(ts) < 2:
        return x

    use_cfg = cfg != 1.0
    if use_cfg and uncond is None:
        raise ValueError("cfg != 1 needs a negative (unconditional) text condition")

    prepared = hasattr(model, "prepare_text") and hasattr(model, "forward_with_text")
    # A text by region (lumina_core.models.regions.RegionText) needs a DiT that prepares one.
    by_region = any(getattr(c, "by_region", False) for c in (cond, uncond))
    if by_region and not (prepared and hasattr(model, "prepare_regions")):
        raise ValueError(f"text by region needs a Flag-DiT or Next-DiT; {type(model).__name__} takes one caption")
    texts = {}

    def text(with_uncond):
        # Batched [cond, uncond] text for guided evaluations (True), cond alone for the others (False), uncond alone
        # ("uncond", with batch_cfg off); each made (and with a prepare_text model prepared) once, when first needed.
        if with_uncond not in texts:
            conds = {True: [cond, uncond], False: [cond], "uncond": [uncond]}[with_uncond]
            if any(getattr(c, "by_region", False) for c in conds):
                texts[with_uncond] = model.prepare_regions(conds, b, device)
                return texts[with_uncond]
            feats, mask = batch_text(conds, b, device)
            texts[with_uncond] = model.prepare_text(feats, mask) if prepared else (feats, mask)
        return texts[with_uncond]

    def velocity(xb, tb, with_uncond, kwargs):
        if prepared:
            return model.forward_with_text(xb, tb, text(with_uncond), **kwargs)
        return model(xb, tb, *text(with_uncond), **kwargs)

    def fn(xt: torch.Tensor, t: float) -> torch.Tensor:
        kwargs = {} if extrapolation_rule is None else extrapolation_rule(extrapolation, lh, lw, t, watershed)
        guiding = guided_at(t, cfg_trunc)
        with_uncond = use_cfg and guiding
        apart = with_uncond and not batch_cfg  # the positive, then the negative, each of B rows
        xb = xt.repeat(2, 1, 1, 1) if with_uncond and not apart else xt
        tb = torch.full((xb.shape[0],), t, device=device, dtype=torch.float32)
        if apart:
            v = torch.cat([velocity(xb, tb, key, kwargs).to(xt.dtype) for key in (False, "uncond")])
        else:
            v = velocity(xb, tb, with_uncond, kwargs).to(xt.dtype)
        if not guiding:
            return v
        v_cond = v
        if with_uncond:
            v_cond, v_uncond = v.chunk(2)
            v = guide(v_cond, v_uncond, cfg, guidance)
            if cfg_normalization:
                v = normalize_rows(v, v_cond)
        return renorm(v, v_cond, renorm_cfg)

    with torch.no_grad():
        return solve(fn, x, ts, solver, callback=callback, atol=atol, rtol=rtol, max_evals=max_evals)


def given_time_grid(times: Sequence[float], denoise: float = 1.0) -> torch.Tensor:
    """A caller's solver grid as float32 t: at least two points, increasing, from t0 >= 0 to exactly 1."""
    if denoise != 1.0:
        raise ValueError(f"a given time grid (times=) starts where it starts: denoise must be 1, got {denoise!r}")
    ts = torch.as_tensor(times, dtype=torch.float32).flatten()
    if ts.numel() < 2 or not bool(torch.isfinite(ts).all()) or float(ts[0]) < 0 or float(ts[-1]) != 1.0 or not bool(
            (ts[1:] > ts[:-1]).all()):
        raise ValueError(f"times must increase from t0 >= 0 to exactly 1 (at least two points), got "
                         f"{[round(float(t), 4) for t in ts]}")
    return ts
