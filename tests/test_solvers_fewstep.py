"""Few-step sampling (SPEC.md §12): the multistep solvers' orders of convergence on an analytic flow, their
lower-order first and last steps, exactness where their order promises it, agreement with diffusers' schedulers,
the power solver grid, and equal settings giving today's results bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from lumina_core import LuminaT2IPipeline
from lumina_core.generation import sample
from lumina_core.sampling.multistep import LOWER_ORDER_SECOND_BELOW, half_log_snr
from lumina_core.sampling.schedule import (
    GRIDS,
    POWER_RHO,
    POWER_SHIFT,
    dpm_time_grid,
    make_noise,
    power_time_grid,
    sampling_grid,
    sigmas_from_time_grid,
    time_grid,
)
from lumina_core.sampling.solvers import EVALS_PER_STEP, SOLVERS, solve
from lumina_core.tiny import make_tiny_flag_dit
from nodes import NODE_CLASS_MAPPINGS as N
from nodes.flow_sampler import lumina_ode
from tests.helpers_dit import random_text
from tests.test_flow_sampler import FlowDenoiser

NEW = ("ab3", "dpmpp_2m", "dpmpp_3m", "unipc_2", "unipc_3")
DATA_MULTISTEP = ("dpm", "dpmpp_2m", "dpmpp_3m", "unipc_2", "unipc_3")

# --------------------------------------------------------------------------------------------------------------
# An analytic flow that is not Gaussian: data ~ 0.4 N(-1, 0.5^2) + 0.6 N(1.5, 0.8^2) in 1-D, its exact velocity in
# closed form (the posterior-weighted velocities of the two Gaussian components).

MU = torch.tensor([-1.0, 1.5], dtype=torch.float64)
S2 = torch.tensor([0.5, 0.8], dtype=torch.float64) ** 2
LOG_W = torch.tensor([0.4, 0.6], dtype=torch.float64).log()


def mixture_velocity(x, t):
    if torch.is_tensor(t):  # per-sample times [B, 1, ...] (ComfyUI's model in tests/test_flow_sampler.py)
        t = t[..., None]
    var = t * t * S2 + (1 - t) ** 2
    diff = x[..., None] - t * MU
    post = torch.softmax(-0.5 * diff * diff / var - 0.5 * var.log() + LOG_W, -1)
    return (post * (MU + (t * S2 - (1 - t)) / var * diff)).sum(-1)


def smooth_grid(steps):
    """t = 3u^2 - 2u^3 on uniform u: steps of order 1/steps^2 at both ends, so the lower-order first and last steps
    contribute O(steps^-4) and each method's own order shows."""
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return u * u * (3 - 2 * u)


@pytest.fixture(scope="module")
def mixture():
    z = torch.linspace(-2.5, 2.5, 201, dtype=torch.float64)
    fine = solve(mixture_velocity, z, smooth_grid(1200), "rk4")
    coarse = solve(mixture_velocity, z, smooth_grid(600), "rk4")
    assert float((fine - coarse).abs().max()) < 1e-9  # the reference: RK4, 1/16 of that off, far below 1e-7
    return z, fine


# Order of convergence. UniPC-p converges at p + 1: its corrector adds one order (Zhao et al. 2023).
ORDERS = {"euler": 1, "midpoint": 2, "rk4": 4, "ab2": 2, "ab3": 3, "dpm": 2, "dpmpp_2m": 2, "dpmpp_3m": 3,
          "unipc_2": 3, "unipc_3": 4}
STEPS = {"rk4": (16, 32, 64), "unipc_3": (128, 256, 512)}  # UniPC-3 nears its order later (3.5 at 32 -> 64)


@pytest.mark.parametrize("solver", list(ORDERS))
def test_measured_order_of_convergence(mixture, solver):
    z, exact = mixture
    steps = STEPS.get(solver, (64, 128, 256))
    errors = [float((solve(mixture_velocity, z, smooth_grid(n), solver) - exact).abs().max()) for n in steps]
    logs = [(math.log(n), math.log(e)) for n, e in zip(steps, errors)]
    mx, my = sum(a for a, _ in logs) / 3, sum(b for _, b in logs) / 3
    slope = -sum((a - mx) * (b - my) for a, b in logs) / sum((a - mx) ** 2 for a, _ in logs)
    assert abs(slope - ORDERS[solver]) <= 0.3, (solver, slope, errors)


def test_every_solver_has_an_order_and_a_cost():
    assert set(ORDERS) == set(SOLVERS) - {"dopri5"}
    assert all(EVALS_PER_STEP[s] == 1 for s in NEW)


# --------------------------------------------------------------------------------------------------------------
# Lower-order start and end


def _steps(solver, grid, fn=mixture_velocity, x=None):
    infos = []
    x = torch.linspace(-2.0, 2.0, 33, dtype=torch.float64) if x is None else x
    out = solve(fn, x, grid, solver, callback=infos.append)
    return out, [i["x"] for i in infos], [i["denoised"] for i in infos]


def test_first_steps_are_those_of_the_lower_order_methods():
    """From t0 > 0: AB3 starts with Euler and AB2, DPM-Solver++ 3M with 2M's first-order and second-order steps,
    UniPC-3 with UniPC-2's steps; from the third step on they differ."""
    grid = torch.tensor([0.05, 0.12, 0.2, 0.3, 0.45, 0.6, 0.8, 0.9], dtype=torch.float64)
    for high, low in (("ab3", "ab2"), ("dpmpp_3m", "dpmpp_2m"), ("unipc_3", "unipc_2")):
        _, xs_high, _ = _steps(high, grid)
        _, xs_low, _ = _steps(low, grid)
        assert torch.equal(xs_high[0], xs_low[0]) and torch.equal(xs_high[1], xs_low[1]), high
        assert float((xs_high[2] - xs_low[2]).abs().max()) > 1e-6, high
    _, xs, _ = _steps("ab3", grid)
    _, euler, _ = _steps("euler", grid)
    assert torch.equal(xs[0], euler[0])


@pytest.mark.parametrize("solver", DATA_MULTISTEP)
def test_from_pure_noise_the_first_two_steps_are_first_order(solver):
    """lambda(0) = -inf: the first step is x1 = (1 - t1) x0 + t1 m0, and the point t = 0 never enters a difference,
    so the second step is DPM-Solver-1 too (UniPC's corrector of order 1 averages m0 and m1 first)."""
    grid = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.8, 1.0], dtype=torch.float64)
    x0 = torch.linspace(-2.0, 2.0, 33, dtype=torch.float64)
    _, xs, ms = _steps(solver, grid, x=x0)
    torch.testing.assert_close(xs[0], 0.9 * x0 + 0.1 * ms[0], rtol=0, atol=1e-15)
    h = half_log_snr(0.25) - half_log_snr(0.1)
    x1 = xs[0] if solver.startswith("dpm") else 0.9 * x0 + 0.1 * (ms[0] + ms[1]) / 2  # UniC-1 from t = 0
    torch.testing.assert_close(xs[1], (0.75 / 0.9) * x1 - 0.25 * math.expm1(-h) * ms[1], rtol=0, atol=1e-14)


@pytest.mark.parametrize("solver", DATA_MULTISTEP)
@pytest.mark.parametrize("steps", [3, 8, 20])
def test_last_step_to_t1_is_the_last_data_prediction(solver, steps):
    out, _, ms = _steps(solver, time_grid(steps, 3.0).double())
    assert torch.equal(out, ms[-1])


@pytest.mark.parametrize("steps", [8, LOWER_ORDER_SECOND_BELOW])
def test_dpmpp_3m_takes_the_step_before_the_last_at_second_order_below_15_steps(steps):
    grid = power_time_grid(steps, 2.0, 1.2).double()
    _, xs, ms = _steps("dpmpp_3m", grid)
    ts, i = grid.tolist(), steps - 2
    lam = [half_log_snr(t) for t in ts]
    h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
    two_m = ((1 - ts[i + 1]) / (1 - ts[i])) * xs[i - 1] - ts[i + 1] * math.expm1(-h) * (
        ms[i] + (0.5 * h / h_prev) * (ms[i] - ms[i - 1]))
    if steps < LOWER_ORDER_SECOND_BELOW:
        torch.testing.assert_close(xs[i], two_m, rtol=0, atol=1e-14)
    else:
        assert float((xs[i] - two_m).abs().max()) > 1e-8


def test_ab3_integrates_a_quadratic_velocity_exactly_from_its_third_step():
    a, b, c = 0.3, -1.2, 2.5
    grid = torch.tensor([0.0, 0.07, 0.2, 0.26, 0.45, 0.7, 0.74, 1.0], dtype=torch.float64)
    _, xs, _ = _steps("ab3", grid, fn=lambda x, t: torch.full_like(x, a + b * t + c * t * t))
    ts = grid.tolist()
    for i in range(2, len(ts) - 1):
        t0, t1 = ts[i], ts[i + 1]
        exact = a * (t1 - t0) + b * (t1**2 - t0**2) / 2 + c * (t1**3 - t0**3) / 3
        torch.testing.assert_close(xs[i] - xs[i - 1], torch.full_like(xs[i], exact), rtol=0, atol=1e-14)


def test_dpmpp_3m_is_exact_for_a_data_prediction_quadratic_in_lambda():
    """v = (g(lambda) - x) / (1 - t) has the data prediction g whatever x: from the third step on, each step of
    DPM-Solver++(3M) adds exactly alpha_1 * integral of e^(lambda - lambda_1) g(lambda) d lambda (the half weight
    of diffusers' 3M on the second difference fails this)."""
    c0, c1, c2 = 0.4, -0.3, 0.15

    def velocity(x, t):
        lam = half_log_snr(t)
        return (c0 + c1 * lam + c2 * lam * lam - x) / (1 - t)

    def integral(l0, l1):  # of e^(l - l1) (c0 + c1 l + c2 l^2) over [l0, l1]
        def anti(l):
            return math.exp(l - l1) * (c0 + c1 * (l - 1) + c2 * (l * l - 2 * l + 2))
        return anti(l1) - anti(l0)

    grid = torch.tensor([0.1, 0.15, 0.3, 0.36, 0.5, 0.62, 0.8, 0.86, 0.9, 0.97, 0.99], dtype=torch.float64)
    _, xs, _ = _steps("dpmpp_3m", grid, fn=velocity)
    ts = grid.tolist()
    for i in range(2, len(ts) - 3):  # the last two steps are of lower order (fewer than 15 steps)
        t0, t1 = ts[i], ts[i + 1]
        increment = xs[i] - ((1 - t1) / (1 - t0)) * xs[i - 1]
        exact = t1 * integral(half_log_snr(t0), half_log_snr(t1))
        torch.testing.assert_close(increment, torch.full_like(increment, exact), rtol=0, atol=1e-13)


# --------------------------------------------------------------------------------------------------------------
# Against diffusers' schedulers (an independent implementation; the pipeline extra installs diffusers)


def _run_diffusers(scheduler, fn, x):
    x = x.clone()
    for i, step in enumerate(scheduler.timesteps):
        v = fn(x, 1.0 - float(scheduler.sigmas[i]))
        x = scheduler.step(-v, step, x).prev_sample  # diffusers' flow_prediction is noise - data = -v
    return x


@pytest.mark.parametrize("steps", [5, 12, 20])
def test_dpmpp_2m_and_unipc_equal_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    import numpy as np

    x = torch.linspace(-2.5, 2.5, 64, dtype=torch.float64).reshape(4, 16)  # diffusers' UniPC wants [B, C, ...]
    dpm = diffusers.DPMSolverMultistepScheduler(solver_order=2, use_flow_sigmas=True, flow_shift=3.0,
                                                prediction_type="flow_prediction", algorithm_type="dpmsolver++")
    dpm.set_timesteps(steps)
    grid = 1.0 - dpm.sigmas.double()  # the dpm grid: u from 1 to 0.001, shifted (computed in float64 there)
    torch.testing.assert_close(grid.float(), dpm_time_grid(steps, 3.0), rtol=0, atol=2e-7)
    theirs = _run_diffusers(dpm, mixture_velocity, x)
    for solver in ("dpmpp_2m", "dpm"):
        torch.testing.assert_close(solve(mixture_velocity, x, grid, solver), theirs, rtol=0, atol=5e-6)
    for order in (2, 3):
        unipc = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type="bh2", use_flow_sigmas=True,
                                                  prediction_type="flow_prediction")
        unipc.set_timesteps(sigmas=np.array((1.0 - dpm_time_grid(steps, 3.0).double())[:-1].tolist()))
        theirs = _run_diffusers(unipc, mixture_velocity, x)
        ours = solve(mixture_velocity, x, 1.0 - unipc.sigmas.double(), f"unipc_{order}")
        torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-6)
        other = solve(mixture_velocity, x, 1.0 - unipc.sigmas.double(), f"unipc_{5 - order}")
        assert float((other - theirs).abs().max()) > 1e-4


# --------------------------------------------------------------------------------------------------------------
# The power grid


def test_power_grid_is_its_formula_and_the_lumina_grid_at_rho_one():
    for steps, s, rho in [(10, 2.0, 1.2), (7, 1.5, 2.0), (1, 3.0, 1.0)]:
        t = power_time_grid(steps, s, rho)
        sigma = (1 - torch.arange(steps + 1, dtype=torch.float64) / steps) ** rho
        torch.testing.assert_close(t.double(), 1 - s * sigma / (1 + (s - 1) * sigma), rtol=0, atol=1e-7)
        assert t.dtype == torch.float32 and float(t[0]) == 0.0 and float(t[-1]) == 1.0
        assert bool((t[1:] > t[:-1]).all())
    torch.testing.assert_close(power_time_grid(29, 4.0, 1.0), time_grid(29, 4.0), rtol=0, atol=2.5e-7)  # 2 ulp
    # rho > 1: a shorter last step than the Lumina grid of the same shift
    assert float(1 - power_time_grid(10, 2.0, 1.5)[-2]) < float(1 - time_grid(10, 2.0)[-2])
    assert torch.equal(power_time_grid(10, 2.0, 1.2, denoise=0.6), power_time_grid(10, 2.0, 1.2)[4:])
    assert power_time_grid(10, 2.0, 1.2, denoise=0.0).tolist() == [1.0]


def test_sampling_grid_chooses_the_grid():
    assert GRIDS == ("lumina", "power")
    for solver in ("euler", "dpm", "dpmpp_3m"):
        assert torch.equal(sampling_grid(solver, 8, 6.0, grid="power", grid_shift=2.5, grid_rho=1.4),
                           power_time_grid(8, 2.5, 1.4))
        assert torch.equal(sampling_grid(solver, 8, 6.0, grid="power"), power_time_grid(8, POWER_SHIFT, POWER_RHO))
    assert torch.equal(sampling_grid("dpm", 8, 6.0), dpm_time_grid(8, 6.0))
    assert torch.equal(sampling_grid("unipc_2", 8, 6.0), time_grid(8, 6.0))
    for bad, message in [(dict(grid="karras"), "unknown solver grid 'karras'"), (dict(grid="power", grid_rho=0.0),
                                                                                 "rho must be > 0"),
                         (dict(grid="power", grid_shift=-1.0), "shift must be > 0")]:
        with pytest.raises(ValueError, match=message):
            sampling_grid("euler", 8, 4.0, **bad)


class Recorder:
    def __init__(self):
        self.times = []

    def __call__(self, x, t, feats, mask):
        self.times.append(float(t[0]))
        pooled = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return -0.7 * x + pooled[:, :4, None, None] * (1 + t[:, None, None, None])


@pytest.mark.parametrize("solver", NEW)
def test_sample_runs_the_solver_on_the_power_grid(solver):
    cond, uncond = random_text(1, 5, 8, seed=1), random_text(1, 2, 8, seed=2)
    noise = make_noise(3, (2, 4, 4, 4))
    model = Recorder()
    out = sample(model, noise, cond, uncond, steps=6, cfg=3.0, solver=solver, grid="power", grid_shift=2.5,
                 grid_rho=1.3, extrapolation="off")
    grid = power_time_grid(6, 2.5, 1.3)
    assert model.times == pytest.approx(grid[:-1].tolist(), abs=1e-7)  # one evaluation per step, never at t = 1
    plain = sample(Recorder(), noise, cond, uncond, steps=6, cfg=3.0, solver=solver, extrapolation="off")
    assert float((out - plain).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="unknown solver grid"):
        sample(Recorder(), noise, cond, uncond, steps=6, solver=solver, grid="uniform")


def test_pipeline_passes_the_solver_grid():
    model = make_tiny_flag_dit(seed=2)
    pipe = LuminaT2IPipeline(model)
    pipe.set_progress_bar_config(disable=True)
    cap = model.config.cap_feat_dim
    feats, mask = random_text(1, 5, cap, seed=3)
    nfeats, nmask = random_text(1, 2, cap, seed=4)
    kw = dict(prompt_embeds=feats, prompt_attention_mask=mask, negative_prompt_embeds=nfeats,
              negative_prompt_attention_mask=nmask, height=64, width=64, num_inference_steps=5, seed=5,
              output_type="latent", solver="dpmpp_3m")
    out = pipe(grid="power", grid_shift=2.5, grid_rho=1.3, **kw).images
    with torch.no_grad():
        core = sample(model, make_noise(5, (1, 4, 8, 8)), (feats, mask), (nfeats, nmask), steps=5, solver="dpmpp_3m",
                      grid="power", grid_shift=2.5, grid_rho=1.3)
    from lumina_core.image.latent import to_vae_space

    torch.testing.assert_close(out, to_vae_space(core), rtol=1e-5, atol=1e-5)
    assert float((out - pipe(**kw).images).abs().max()) > 1e-4
    with pytest.raises(ValueError, match="unknown grid 'karras'"):
        pipe(grid="karras", **kw)


def test_nodes_offer_the_solvers_and_the_grid_as_last_inputs():
    for node_id in ("LuminaSampler", "LuminaSigmas"):
        inputs = N[node_id].INPUT_TYPES()
        assert list(inputs["optional"])[-3:] == ["grid", "grid_shift", "grid_rho"]  # after every existing input
        assert inputs["optional"]["grid"][1]["default"] == "lumina"
        assert inputs["optional"]["grid_shift"][1]["default"] == POWER_SHIFT
        assert inputs["optional"]["grid_rho"][1]["default"] == POWER_RHO
    for node_id in ("LuminaSampler", "LuminaSigmas", "LuminaODESampler"):
        assert set(NEW) <= set(N[node_id].INPUT_TYPES()["required"]["solver"][0])


def test_lumina_sigmas_default_is_todays_schedule_and_power_is_the_grid():
    sigmas = N["LuminaSigmas"]()
    for solver, grid in (("euler", time_grid(30, 4.0)), ("dpm", dpm_time_grid(30, 4.0))):
        assert torch.equal(sigmas.get_sigmas(30, 4.0, 1.0, solver)[0], sigmas_from_time_grid(grid))
        assert torch.equal(sigmas.get_sigmas(30, 4.0, 1.0, solver, "lumina", 9.0, 3.0)[0],
                           sigmas_from_time_grid(grid))
    (power,) = sigmas.get_sigmas(10, 4.0, 0.6, "unipc_3", "power", 2.5, 1.3)
    assert torch.equal(power, sigmas_from_time_grid(power_time_grid(10, 2.5, 1.3, 0.6)))


@pytest.mark.parametrize("solver", NEW)
def test_ode_sampler_runs_the_new_solvers_on_sigmas_as_the_core(solver):
    z = torch.randn(2, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = power_time_grid(10, 2.0, 1.2).double()
    model = FlowDenoiser(mixture_velocity)
    ours = lumina_ode(model, z.clone(), 1.0 - grid, {"model_options": {}}, solver=solver)
    torch.testing.assert_close(ours, solve(mixture_velocity, z.clone(), grid, solver), rtol=1e-10, atol=1e-10)
    assert len(model.calls) == 10 and min(s for s, _ in model.calls) > 0  # never evaluated at sigma 0


# --------------------------------------------------------------------------------------------------------------
# Equal settings: today's results bit for bit


def _dpm_before(fn, x, ts):
    """The "dpm" loop as it was before the multistep solvers joined it (flow DPM-Solver++ 2M), kept verbatim."""
    steps = len(ts) - 1
    m_prev, h_prev = None, None
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        v = fn(x, t0)
        m = x + (1 - t0) * v
        h = half_log_snr(t1) - half_log_snr(t0)
        alpha_phi = -t1 * math.expm1(-h)
        d = m
        second_order = m_prev is not None and i < steps - 1 and math.isfinite(h_prev) and h_prev > 0
        if second_order:
            d = m + (0.5 * h / h_prev) * (m - m_prev)
        x_next = ((1 - t1) / (1 - t0)) * x + alpha_phi * d
        x, m_prev, h_prev = x_next, m, h
    return x


def _fixed_before(fn, x, ts, solver):
    """euler, midpoint, rk4 (3/8 rule) and ab2 as the loop computes them."""
    v_prev, h_prev = None, None
    for t0, t1 in zip(ts, ts[1:]):
        h = t1 - t0
        v = fn(x, t0)
        if solver == "euler":
            x = x + h * v
        elif solver == "midpoint":
            x = x + h * fn(x + (h / 2) * v, t0 + h / 2)
        elif solver == "rk4":
            k2 = fn(x + h * v / 3, t0 + h / 3)
            k3 = fn(x + h * (k2 - v / 3), t0 + 2 * h / 3)
            k4 = fn(x + h * (v - k2 + k3), t1)
            x = x + h * (v + 3 * (k2 + k3) + k4) / 8
        else:
            x = x + h * v if v_prev is None else x + h * ((1 + h / h_prev / 2) * v - (h / h_prev / 2) * v_prev)
            v_prev, h_prev = v, h
    return x


GRIDS_TODAY = {
    "lumina": time_grid(12, 4.0),
    "dpm": dpm_time_grid(17, 6.0),
    "img2img": time_grid(30, 4.0, 0.6),
    "comfy from 1": torch.tensor([0.0, 0.2, 0.35, 0.5, 0.8, 0.9, 1.0]),
    "split": torch.tensor([0.1, 0.3, 0.5, 0.7]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grid_name", list(GRIDS_TODAY))
def test_todays_solvers_give_todays_results_bit_for_bit(dtype, grid_name):
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(4)).to(dtype)
    grid = GRIDS_TODAY[grid_name].to(dtype)
    ts = [float(t) for t in grid]

    def fn(xt, t):
        return mixture_velocity(xt, t).to(dtype)

    assert torch.equal(solve(fn, x, grid, "dpm"), _dpm_before(fn, x, ts))
    for solver in ("euler", "midpoint", "rk4", "ab2"):
        assert torch.equal(solve(fn, x, grid, solver), _fixed_before(fn, x, ts, solver)), solver


@pytest.mark.parametrize("solver", ["euler", "midpoint", "ab2", "dpm"])
def test_sample_with_the_lumina_grid_is_todays_sample(solver, monkeypatch):
    """The default grid is today's grid (the power grid's settings unused), handed to the same solver."""
    from lumina_core.sampling import loop

    grids = []
    monkeypatch.setattr(loop, "solve", lambda fn, x, grid, *a, **k: grids.append(grid) or solve(fn, x, grid, *a, **k))
    cond, uncond = random_text(1, 5, 8, seed=1), random_text(1, 2, 8, seed=2)
    noise = make_noise(3, (2, 4, 4, 4))
    kw = dict(steps=6, cfg=3.0, shift=4.0, solver=solver, extrapolation="off")
    today = sample(Recorder(), noise, cond, uncond, **kw)
    again = sample(Recorder(), noise, cond, uncond, grid="lumina", grid_shift=9.0, grid_rho=3.0, **kw)
    assert torch.equal(today, again)
    expected = (dpm_time_grid if solver == "dpm" else time_grid)(6, 4.0)
    assert len(grids) == 2 and all(torch.equal(g, expected) for g in grids)
