"""ODE solvers over a velocity field fn(x, t) -> v, t a python float, integrating dx/dt = v along a grid of
increasing t.

The fixed-grid solvers of the originals (euler, midpoint, rk4 with the 3/8 rule, torchdiffeq's "rk4"), adaptive
Dormand-Prince 5(4) as torchdiffeq's dopri5, and the multistep solvers of `multistep.py` at one evaluation per step:
Adams-Bashforth 2 and 3 for uneven steps, DPM-Solver++ 2M and 3M and UniPC (bh2) of order 2 and 3 in the flow's data
prediction, and Lumina-Image-2.0's "dpm", the flow DPM-Solver++ of its `transport/dpm_solver.py` (SANA's; multistep,
order 2, lower-order final step): DPM-Solver++ 2M, which it runs on its own grid (`schedule.dpm_time_grid`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from . import multistep

SOLVERS = ("euler", "midpoint", "rk4", "ab2", "dopri5", "dpm", "ab3", "dpmpp_2m", "dpmpp_3m", "unipc_2", "unipc_3")

# Model evaluations per step of the fixed-grid solvers (dopri5 is adaptive).
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4, "ab2": 1, "dpm": 1, "ab3": 1, "dpmpp_2m": 1, "dpmpp_3m": 1,
                  "unipc_2": 1, "unipc_3": 1}

# The multistep solvers: (method of `multistep`, order). "dpm" is DPM-Solver++ 2M.
MULTISTEP = {"ab2": (multistep.adams_bashforth, 2), "ab3": (multistep.adams_bashforth, 3),
             "dpm": (multistep.dpmpp, 2), "dpmpp_2m": (multistep.dpmpp, 2), "dpmpp_3m": (multistep.dpmpp, 3),
             "unipc_2": (multistep.unipc, 2), "unipc_3": (multistep.unipc, 3)}


class SamplingError(RuntimeError):
    """Sampling cannot go on (non-finite values, evaluation budget spent), with what to change."""


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
    if solver in MULTISTEP:
        method, order = MULTISTEP[solver]
        return method(fn, x, ts, order, _reporter(callback))
    if solver not in EVALS_PER_STEP:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    steps = len(ts) - 1
    evals = 0
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
        else:  # rk4: the 3/8 rule (torchdiffeq's "rk4", which the original uses)
            k1 = v
            k2 = fn(x + h * k1 / 3, t0 + h / 3)
            k3 = fn(x + h * (k2 - k1 / 3), t0 + 2 * h / 3)
            k4 = fn(x + h * (k1 - k2 + k3), t1)
            evals += 3
            x_next = x + h * (k1 + 3 * (k2 + k3) + k4) / 8
        _finite_or_raise(x_next, t1)
        if callback is not None:
            callback({"step": i, "steps": steps, "t": t1, "x": x_next, "denoised": x + (1 - t0) * v, "evals": evals})
        x = x_next
    return x


def _reporter(callback):
    """report(step, steps, t, x, denoised, evals) for the loops of `multistep`: the finiteness check, then the
    callback."""

    def report(step, steps, t, x, denoised, evals):
        _finite_or_raise(x, t)
        if callback is not None:
            callback({"step": step, "steps": steps, "t": t, "x": x, "denoised": denoised, "evals": evals})

    return report


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
