"""Time grids and noise.

Time convention, used everywhere in this package: t = 0 is pure noise, t = 1 is data, x_t = t*data + (1-t)*noise,
and the model predicts the velocity v = data - noise; sampling integrates dx/dt = v from t0 to 1. ComfyUI's
sigma = 1 - t; the conversion lives in `sigmas_from_time_grid` here and in `nodes/flow_model.py` only.

Follows `lumina_t2i/transport` and `demo.py` of Alpha-VLLM/Lumina-T2X (the shifted grid) and
`lumina_next_t2i_mini/transport.py` (img2img strength), with `steps` counting solver steps as in ComfyUI (the
originals count grid points: their 30 is 29 steps here). The grid of the "dpm" solver is Lumina-Image-2.0's
(`transport/dpm_solver.py`, SANA's "time_uniform_flow"), where the original's step count already means intervals.

Solver grids (SPEC.md §12) are separate from the model: "lumina", the grid above at the model's shift (each solver's
own, the default), or "power", sigma_i = shift_s((1 - i/N)^rho) with its own s and rho, which spends fewer steps near
noise and more near data than a shift-4 or shift-6 Lumina grid; with rho = 1 and s = the shift it is the Lumina grid.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

# Solver grids: the Lumina grid at the model's shift, or the power grid with its own shift and rho.
GRIDS = ("lumina", "power")
# The power grid's defaults: the few-step setting the exact-flow benchmark (tests/bench/bench_solvers.py) recommends.
POWER_SHIFT = 4.0
POWER_RHO = 1.5


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


def dpm_time_grid(steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """Float32 grid of t for the "dpm" solver, Lumina-Image-2.0's own: u = linspace(1, 0.001, steps + 1),
    sigma = 1 - u shifted s*sigma / (1 + (s-1)*sigma), t = 1 - sigma. It starts just after pure noise
    (t = 1 - shift(0.999), 1.7e-4 at s = 6) and ends exactly at t = 1; `steps` intervals are `steps` model
    evaluations, as the original's `num_sampling_steps` for dpm.

    steps must be >= 2 (a two-step method; the original asserts steps >= its order). denoise < 1 cuts the grid as
    `time_grid` does: the first int((steps + 1) * (1 - denoise)) points are dropped and the solver starts afresh
    (first order) at the first kept point; the original has no img2img.
    """
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"the dpm solver needs steps >= 2 (it is a two-step method), got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be between 0 and 1, got {denoise!r}")
    sigma = 1.0 - torch.linspace(1.0, 0.001, steps + 1, dtype=torch.float32)
    sigma = (shift * sigma / (1 + (shift - 1) * sigma)).flip(dims=[0])
    t = 1.0 - sigma  # float32, as the original's model input 1 - sigma
    if denoise < 1.0:
        t = t[min(steps, int((steps + 1) * (1 - denoise))):]
    return t


def power_time_grid(steps: int, shift: float = POWER_SHIFT, rho: float = POWER_RHO, denoise: float = 1.0
                    ) -> torch.Tensor:
    """Float32 grid of t from 0 to 1 (both exact): sigma_i = shift_s((1 - i/steps)^rho), t_i = 1 - sigma_i, with
    shift_s(sigma) = s*sigma / (1 + (s-1)*sigma) (computed in float64). rho > 1 puts more of the steps near the data
    end; rho = 1 is `time_grid` at shift s. denoise < 1 cuts it as `time_grid` does."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"the power grid's shift must be > 0, got {shift!r}")
    if not rho > 0:
        raise ValueError(f"the power grid's rho must be > 0, got {rho!r}")
    if not 0.0 <= denoise <= 1.0:
        raise ValueError(f"denoise must be between 0 and 1, got {denoise!r}")
    sigma = (1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps) ** rho
    t = (1.0 - shift * sigma / (1 + (shift - 1) * sigma)).to(torch.float32)
    if denoise < 1.0:
        t = t[min(steps, int((steps + 1) * (1 - denoise))):]
    return t


def sampling_grid(solver: str, steps: int, shift: float, denoise: float = 1.0, grid: str = "lumina",
                  grid_shift: float = POWER_SHIFT, grid_rho: float = POWER_RHO) -> torch.Tensor:
    """The time grid a solver runs on. grid "lumina": the solver's own at the model's shift (`dpm_time_grid` for
    "dpm", `time_grid` for every other solver); "power": `power_time_grid(steps, grid_shift, grid_rho)` for every
    solver, `shift` unused."""
    if grid == "lumina":
        return (dpm_time_grid if solver == "dpm" else time_grid)(steps, shift, denoise)
    if grid == "power":
        return power_time_grid(steps, grid_shift, grid_rho, denoise)
    raise ValueError(f"unknown solver grid {grid!r}; choose one of {', '.join(GRIDS)}")


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
