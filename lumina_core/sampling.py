"""Rectified-flow sampling for Lumina-T2I and Lumina-Next: time grid, ODE solvers, classifier-free guidance,
img2img, extrapolation.

Time convention, used everywhere in this package: t = 0 is pure noise, t = 1 is data, x_t = t*data + (1-t)*noise,
and the model predicts the velocity v = data - noise; sampling integrates dx/dt = v from t0 to 1. (ComfyUI's
sigma = 1 - t; the conversion lives in `sigmas_from_time_grid` only.)

Follows `lumina_t2i/transport` and `demo.py` of Alpha-VLLM/Lumina-T2X (time shift, solvers, the three-channel
guidance), `lumina_next_t2i/demo.py` (the same grid, solvers and guidance; its defaults and time-aware
extrapolation come from `lumina_core.families`) and `lumina_next_t2i_mini/transport.py` (img2img strength),
with `steps` counting solver steps as in ComfyUI (the originals count grid points: their 30 is 29 steps here).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

SOLVERS = ("euler", "midpoint", "rk4", "ab2", "dopri5")
EXTRAPOLATIONS = ("t2i", "time_aware", "off")
GUIDANCE_MODES = ("faithful", "all")

# Model evaluations per step of the fixed-grid solvers (dopri5 is adaptive).
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4, "ab2": 1}

TRAINED_SIZE = 1024  # pixels; Lumina-T2I was trained at 1024x1024
VAE_FACTOR = 8
PATCH = 2


class SamplingError(RuntimeError):
    """Sampling cannot go on (non-finite values, evaluation budget spent), with what to change."""


# --------------------------------------------------------------------------------------------------------------
# Schedule


def time_grid(steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """Float32 grid of t from t0 to 1: t_i = i/steps, time-shifted t' = t / (t + s - s*t).

    With denoise < 1 only the last part is kept, as the original img2img does: it drops the first
    int(points * (1 - denoise)) of its `points` = steps + 1 grid points (at least one point stays, t = 1, which
    means nothing left to do). The result has steps' + 1 points with steps' <= steps.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be between 0 and 1, got {denoise!r}")
    t = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float32)
    t = t / (t + shift - shift * t)
    if denoise < 1.0:
        t = t[min(steps, int((steps + 1) * (1 - denoise))):]
    return t


def sigmas_from_time_grid(t: torch.Tensor) -> torch.Tensor:
    """ComfyUI's SIGMAS for a Lumina time grid: sigma = 1 - t (1 = noise, 0 = data)."""
    return (1.0 - t).to(torch.float32)


def make_noise(seed: int, shape: Sequence[int], batch_index: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Gaussian noise in float32 on the CPU, the convention of ComfyUI's KSampler: one CPU generator seeded with
    `seed` fills the whole batch, so image i has the same noise whatever the batch size.

    batch_index (ComfyUI's LATENT "batch_index"): image j gets the noise of position batch_index[j] in such a batch.
    """
    shape = tuple(int(s) for s in shape)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    if batch_index is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    count = max(batch_index) + 1
    per_image = [torch.randn((1,) + shape[1:], generator=generator, dtype=torch.float32) for _ in range(count)]
    return torch.cat([per_image[i] for i in batch_index], dim=0)


# --------------------------------------------------------------------------------------------------------------
# Resolution extrapolation


def extrapolation_kwargs(
    extrapolation: str, latent_h: int, latent_w: int, t: float, *, watershed: float = 0.3
) -> dict:
    """Keyword arguments for the Flag-DiT at latent size (latent_h, latent_w) and time t.

    "t2i" (the Lumina-T2I demo's default): NTK factor = token count / trained token count, proportional attention
    with base (1024/16)^2 + 2*(1024/16) = 4224 (the eol tokens included).
    "time_aware" (Lumina-Next): above the trained area, scale = sqrt(H*W)/1024, with linear position scaling
    before the watershed (t < watershed: the noisy start) and NTK after it; at or below it no RoPE scaling (as
    Lumina-Next, which scales only when extrapolating). Proportional attention with base (1024/16)^2 = 4096.
    "off": the plain model.
    """
    side = TRAINED_SIZE // (VAE_FACTOR * PATCH)  # 64 patches per side at the trained size
    if extrapolation == "off":
        return {}
    if extrapolation == "t2i":
        ntk = (latent_h // PATCH) * (latent_w // PATCH) / side**2
        return {"ntk_factor": ntk, "proportional_attn": True, "base_seqlen": side * side + 2 * side}
    if extrapolation == "time_aware":
        scale = max(1.0, math.sqrt(latent_h * VAE_FACTOR * latent_w * VAE_FACTOR) / TRAINED_SIZE)
        kwargs = {"proportional_attn": True, "base_seqlen": side * side}
        if t < watershed:
            kwargs.update(rope_scaling_factor=scale, ntk_factor=1.0)
        else:
            kwargs.update(rope_scaling_factor=1.0, ntk_factor=scale)
        return kwargs
    raise ValueError(f"unknown extrapolation {extrapolation!r}; choose one of {', '.join(EXTRAPOLATIONS)}")


# --------------------------------------------------------------------------------------------------------------
# Guidance


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


# --------------------------------------------------------------------------------------------------------------
# Solvers: functions of a velocity field fn(x, t) -> v, t a python float


def _finite_or_raise(x: torch.Tensor, t: float):
    if not bool(torch.isfinite(x).all()):
        raise SamplingError(
            f"the sampler produced NaN or infinite values at t={t:.3f}. This usually means fp16 overflow: load the "
            f"Flag-DiT in bf16 or fp32 instead of fp16."
        )


def solve(
    fn: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    grid: torch.Tensor,
    solver: str = "euler",
    *,
    callback: Optional[Callable[[dict], None]] = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    max_evals: int = 2000,
) -> torch.Tensor:
    """Integrate dx/dt = fn(x, t) over the points of `grid` (increasing t); returns x at grid[-1].

    callback(info) runs after every step with keys step, steps, t, x, denoised (= x + (1 - t) * v, the data
    estimate at the last evaluation) and evals; it may raise to cancel.
    """
    ts = [float(v) for v in grid]
    if len(ts) < 2:
        return x
    if solver == "dopri5":
        return _dopri5(fn, x, ts, callback, atol, rtol, max_evals)
    if solver not in EVALS_PER_STEP:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    steps = len(ts) - 1
    evals = 0
    v_prev, h_prev = None, None
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        h = t1 - t0
        v = fn(x, t0)
        evals += 1
        if solver == "euler":
            x_next = x + h * v
        elif solver == "midpoint":
            x_next = x + h * fn(x + (h / 2) * v, t0 + h / 2)
            evals += 1
        elif solver == "rk4":
            # The 3/8 rule (torchdiffeq's "rk4", which the original uses).
            k1 = v
            k2 = fn(x + h * k1 / 3, t0 + h / 3)
            k3 = fn(x + h * (k2 - k1 / 3), t0 + 2 * h / 3)
            k4 = fn(x + h * (k1 - k2 + k3), t1)
            evals += 3
            x_next = x + h * (k1 + 3 * (k2 + k3) + k4) / 8
        else:  # ab2: two-step Adams-Bashforth for uneven steps, one evaluation per step (Euler to start)
            if v_prev is None:
                x_next = x + h * v
            else:
                r = h / h_prev
                x_next = x + h * ((1 + r / 2) * v - (r / 2) * v_prev)
            v_prev, h_prev = v, h
        _finite_or_raise(x_next, t1)
        if callback is not None:
            callback({"step": i, "steps": steps, "t": t1, "x": x_next, "denoised": x + (1 - t0) * v, "evals": evals})
        x = x_next
    return x


# Dormand-Prince 5(4) tableau.
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def _dopri5(fn, x, ts, callback, atol, rtol, max_evals):
    """Adaptive Dormand-Prince 5(4) from ts[0] to ts[-1] with per-element error tolerance atol + rtol*|x|.

    Intermediate grid points do not constrain the steps (only the end matters), as with torchdiffeq's dopri5.
    """
    t, t_end = ts[0], ts[-1]
    span = t_end - t
    nominal = len(ts) - 1
    k = fn(x, t)
    evals = 1
    # Initial step (Hairer, Norsett & Wanner, II.4): from the size of x and of its derivative.
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(k / scale)
    h = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h = min(h, span)
    x1 = x + h * k
    k1 = fn(x1, t + h)
    evals += 1
    d2 = _rms((k1 - k) / scale) / h
    h1 = max(1e-6, h * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
    h = min(100 * h, h1, span)

    while t < t_end - 1e-12 * span:
        h = min(h, t_end - t)
        if evals + 6 > max_evals:
            raise SamplingError(
                f"dopri5 needed more than {max_evals} model evaluations to reach t=1 (stopped at t={t:.3f}); "
                f"raise max_evals, loosen rtol/atol, or use a fixed-step solver such as euler or midpoint"
            )
        ks = [k]
        for i in range(1, 7):
            xi = x + h * sum(a * kj for a, kj in zip(_DP_A[i], ks) if a != 0.0)
            ks.append(fn(xi, t + _DP_C[i] * h))
        evals += 6
        x5 = xi  # the last stage is evaluated at the 5th-order solution (first same as last)
        err_vec = h * sum((b5 - b4) * kj for b5, b4, kj in zip(_DP_B5, _DP_B4, ks) if b5 != b4)
        tol = atol + rtol * torch.maximum(x.abs(), x5.abs())
        err = _rms(err_vec / tol)
        if not math.isfinite(err):
            _finite_or_raise(x5, t + h)
            err = float("inf")
        if err <= 1.0:
            t = t + h
            x, k = x5, ks[6]
            _finite_or_raise(x, t)
            if callback is not None:
                progress = min(nominal - 1, int((t - ts[0]) / span * nominal)) if t < t_end else nominal - 1
                callback({"step": progress, "steps": nominal, "t": t, "x": x, "denoised": x + (1 - t) * k,
                          "evals": evals})
        factor = 10.0 if err == 0 else min(10.0, max(0.2, 0.9 * err ** (-1 / 5)))
        h = h * factor
    return x


# --------------------------------------------------------------------------------------------------------------
# The whole generation


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
) -> torch.Tensor:
    """Generate model-space latents (SDXL-VAE latent * 0.13025) at t = 1.

    model: a FlagDiT or a NextDiT (their text work is then done once per generation), or any callable
    model(x, t, cap_feats, cap_mask, **extrapolation_kwargs) -> velocity (taken as a Lumina-T2I model).
    noise: [B, 4, h, w] Gaussian noise (see make_noise); its device and dtype are the sampler's.
    cond, uncond: (features [1 or B, L, D], mask [1 or B, L]); uncond is unused (may be None) when cfg == 1.
    init_latent: model-space latent for img2img; the start is noise*(1-t0) + init_latent*t0.
    Settings left at None take the defaults of the model family's original demo (`lumina_core.families`):
    Lumina-T2I euler, Lumina-Next midpoint with time-aware extrapolation; both 29 steps, cfg 4, shift 4.
    """
    from .families import family_of

    family = family_of(model, default="lumina_t2i")
    defaults = family.defaults
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
    if extrapolation not in EXTRAPOLATIONS:
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
        kwargs = family.extrapolation_kwargs(extrapolation, lh, lw, t, watershed)
        xb = xt.repeat(reps, 1, 1, 1) if reps > 1 else xt
        tb = torch.full((b * reps,), t, device=device, dtype=torch.float32)
        v = velocity(xb, tb, kwargs).to(xt.dtype)
        if not use_cfg:
            return v
        v_cond, v_uncond = v.chunk(2)
        return guide(v_cond, v_uncond, cfg, guidance)

    with torch.no_grad():
        return solve(fn, x, grid, solver, callback=callback, atol=atol, rtol=rtol, max_evals=max_evals)
