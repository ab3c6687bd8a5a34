"""Sampler checks against analytic flows, the schedule formula and counted model calls."""

import math

import pytest
import torch

from lumina_core.generation import sample
from lumina_core.models.flag_dit import extrapolation_kwargs
from lumina_core.sampling.guidance import guide
from lumina_core.sampling.schedule import make_noise, sigmas_from_time_grid, time_grid
from lumina_core.sampling.solvers import EVALS_PER_STEP, SamplingError, solve
from tests.helpers_dit import make_tiny_flag_dit, random_text

# Data ~ N(mu, s^2), noise ~ N(0, 1): the exact velocity of the linear path and the exact transport z -> mu + s*z.
MU, S = -0.4, 1.5  # (S*S = 4 would make the shift-4 Euler grid coincide with the uniform one)


def gaussian_velocity(x, t):
    return MU + (t * S * S - (1 - t)) / (t * t * S * S + (1 - t) ** 2) * (x - t * MU)


def shifted_grid64(steps, shift):
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return t / (t + shift - shift * t)


@pytest.fixture(scope="module")
def z():
    return torch.randn(2048, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


# Error at 20 steps (stated bound) and the factor by which halving the step shrinks it.
ORDER_CASES = {
    "euler": (0.7, 1.7, 2.3),
    "midpoint": (2e-2, 3.5, 9.0),  # order 2; this flow is superconvergent for midpoint (ratio ~8), see note
    "rk4": (1e-4, 12.0, 32.0),
    "ab2": (0.15, 3.0, 6.0),
}


@pytest.mark.parametrize("shift", [1.0, 4.0])
@pytest.mark.parametrize("solver", list(ORDER_CASES))
def test_solvers_converge_at_their_order_on_the_exact_gaussian_flow(z, solver, shift):
    bound, low, high = ORDER_CASES[solver]
    target = MU + S * z
    errors = [
        float((solve(gaussian_velocity, z, shifted_grid64(n, shift), solver) - target).abs().max())
        for n in (20, 40, 80)
    ]
    assert errors[0] < bound
    for coarse, fine in zip(errors, errors[1:]):
        assert low < coarse / fine < high, errors


@pytest.mark.parametrize("rtol", [1e-3, 1e-5])
def test_dopri5_meets_its_tolerance_with_fewer_evaluations_than_rk4(z, rtol):
    target = MU + S * z
    calls = []

    def counted(x, t):
        calls.append(t)
        return gaussian_velocity(x, t)

    out = solve(counted, z, shifted_grid64(30, 4.0), "dopri5", rtol=rtol, atol=1e-6)
    err = (out - target).abs()
    # Global error at the scale of the solution: within 2x the tolerance (a few local errors accumulate).
    assert float(err.max()) < 2 * (1e-6 + rtol * float(target.abs().max()))
    if rtol <= 1e-5:
        steps = 1
        while float((solve(gaussian_velocity, z, shifted_grid64(steps, 4.0), "rk4") - target).abs().max()) > err.max():
            steps += 1
        assert len(calls) < 4 * steps


def test_dopri5_evaluation_cap_raises_a_clear_error(z):
    with pytest.raises(SamplingError, match="more than 10 model evaluations"):
        solve(gaussian_velocity, z, shifted_grid64(4, 1.0), "dopri5", rtol=1e-9, atol=1e-12, max_evals=10)


def test_time_grid_is_the_shift_formula():
    for steps, shift in [(30, 4.0), (7, 2.5), (1, 6.0)]:
        t = torch.arange(steps + 1, dtype=torch.float64) / steps
        expect = t / (t + shift - shift * t)
        torch.testing.assert_close(time_grid(steps, shift).double(), expect, rtol=0, atol=1e-6)
    torch.testing.assert_close(time_grid(10, 1.0), torch.linspace(0, 1, 11), rtol=0, atol=1e-7)
    # sigma form of the same shift (SD3/Flux): sigma' = s*sigma / (1 + (s-1)*sigma)
    sigma = 1 - torch.arange(31, dtype=torch.float64) / 30
    torch.testing.assert_close(
        sigmas_from_time_grid(time_grid(30, 4.0)).double(), 4 * sigma / (1 + 3 * sigma), rtol=0, atol=1e-6
    )


def test_denoise_keeps_the_end_of_the_grid_as_the_original_img2img():
    # The original counts grid points (steps + 1) and drops the first int(points * (1 - strength)) of them.
    for steps, denoise, start in [(30, 0.6, 12), (10, 0.05, 10), (3, 0.5, 2), (20, 0.35, 13), (30, 1.0, 0)]:
        assert int((steps + 1) * (1 - denoise)) == start
        assert torch.equal(time_grid(steps, 4.0, denoise), time_grid(steps, 4.0)[start:])
    assert time_grid(30, 4.0, 0.0).tolist() == [1.0]  # nothing left to denoise


@pytest.mark.parametrize(
    "args, message",
    [((0, 4.0), "steps must be a positive integer"), ((10, 0.0), "shift must be > 0"), ((10, 4.0, 1.5), "denoise")],
)
def test_time_grid_refuses_bad_numbers(args, message):
    with pytest.raises(ValueError, match=message):
        time_grid(*args)


class Recorder:
    """A callable model: velocity = a fixed function of x, t and the text, recording each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, feats, mask, **kwargs):
        self.calls.append({"batch": x.shape[0], "kwargs": kwargs, "t": t.clone()})
        pooled = (feats * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return x * 0.5 + pooled[:, :4, None, None] + t[:, None, None, None]


def _text(length, seed, dim=8):
    return random_text(1, length, dim, seed=seed)


def test_faithful_guidance_keeps_the_conditional_channel_3():
    c = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    u = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    out = guide(c, u, 4.0, "faithful")
    assert torch.equal(out[:, 3], c[:, 3])
    torch.testing.assert_close(out[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]))
    torch.testing.assert_close(guide(c, u, 4.0, "all"), u + 4.0 * (c - u))


def test_one_euler_step_equals_guidance_of_separate_predictions():
    model = Recorder()
    cond, uncond = _text(5, 1), _text(2, 2)
    noise = make_noise(3, (2, 4, 4, 4))
    out = sample(model, noise, cond, uncond, steps=1, cfg=3.0, shift=1.0, solver="euler", extrapolation="off")
    t = torch.zeros(2)
    vc = model(noise, t, cond[0].expand(2, -1, -1), cond[1].expand(2, -1))
    vu = model(noise, t, uncond[0].expand(2, -1, -1), uncond[1].expand(2, -1))
    torch.testing.assert_close(out, noise + guide(vc, vu, 3.0, "faithful"))


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4", "ab2"])
def test_cfg_batches_cond_and_uncond_and_cfg_one_skips_uncond(solver):
    noise = make_noise(0, (3, 4, 4, 4))
    cond, uncond = _text(6, 1), _text(2, 2)
    guided = Recorder()
    sample(guided, noise, cond, uncond, steps=5, cfg=4.0, shift=4.0, solver=solver)
    assert len(guided.calls) == 5 * EVALS_PER_STEP[solver]
    assert {c["batch"] for c in guided.calls} == {6}
    plain = Recorder()
    sample(plain, noise, cond, None, steps=5, cfg=1.0, shift=4.0, solver=solver)
    assert len(plain.calls) == 5 * EVALS_PER_STEP[solver]
    assert {c["batch"] for c in plain.calls} == {3}


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_unbatched_cfg_runs_the_negative_apart_with_the_same_result(solver):
    """batch_cfg=False: every guided evaluation is two calls of B rows (positive, then negative), unguided ones (cfg
    truncation) one; the latents equal the batched run's, for a callable model and for DiTs that prepare their
    text (their text then unpadded: the negative is shorter than the positive)."""
    noise = make_noise(0, (3, 4, 4, 4))
    cond, uncond = _text(6, 1), _text(2, 2)
    kw = dict(steps=4, cfg=4.0, shift=4.0, solver=solver, cfg_trunc=0.2)
    batched, apart = Recorder(), Recorder()
    truth = sample(batched, noise, cond, uncond, **kw)
    out = sample(apart, noise, cond, uncond, batch_cfg=False, **kw)
    guided = [c for c in batched.calls if c["batch"] == 6]
    assert 0 < len(guided) < len(batched.calls)  # the truncation leaves some evaluations unguided
    assert [c["batch"] for c in apart.calls] == [n for c in batched.calls for n in ([3, 3] if c["batch"] == 6 else [3])]
    torch.testing.assert_close(out, truth, rtol=0, atol=1e-6)

    from lumina_core import tiny

    for model in (make_tiny_flag_dit(seed=3), tiny.make_tiny_unified_next_dit(seed=3)):
        dim = model.config.cap_feat_dim
        c, u = random_text(1, 5, dim, seed=1), random_text(1, 2, dim, seed=2)
        noise = make_noise(1, (2, model.config.in_channels, 8, 8))
        kw = dict(steps=3, cfg=4.0, shift=4.0, solver=solver)
        truth = sample(model, noise, c, u, **kw)
        torch.testing.assert_close(sample(model, noise, c, u, batch_cfg=False, **kw), truth, rtol=1e-5, atol=1e-5)


def test_seed_reproduces_and_batch_position_is_independent_of_batch_size():
    model = make_tiny_flag_dit(seed=3)
    cond = random_text(1, 4, model.config.cap_feat_dim, seed=1)
    uncond = random_text(1, 2, model.config.cap_feat_dim, seed=2)
    kw = dict(steps=3, cfg=4.0, shift=4.0, solver="euler")
    one = sample(model, make_noise(42, (1, 4, 8, 8)), cond, uncond, **kw)
    again = sample(model, make_noise(42, (1, 4, 8, 8)), cond, uncond, **kw)
    three = sample(model, make_noise(42, (3, 4, 8, 8)), cond, uncond, **kw)
    assert torch.equal(one, again)
    torch.testing.assert_close(three[:1], one, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(three[1], three[0])
    # ComfyUI's KSampler convention: one CPU generator for the whole batch.
    assert torch.equal(make_noise(42, (3, 4, 8, 8)), torch.randn(3, 4, 8, 8, generator=torch.manual_seed(42)))
    assert torch.equal(make_noise(42, (2, 4, 8, 8), batch_index=[2, 0]), make_noise(42, (3, 4, 8, 8))[[2, 0]])


def test_img2img_denoise_zero_returns_the_input_and_one_ignores_it():
    model = Recorder()
    cond = _text(3, 1)
    noise = make_noise(1, (1, 4, 4, 4))
    init = make_noise(2, (1, 4, 4, 4))
    kw = dict(steps=10, cfg=1.0, shift=4.0, solver="euler")
    assert torch.equal(sample(model, noise, cond, None, denoise=0.0, init_latent=init, **kw), init)
    assert not model.calls
    with_init = sample(model, noise, cond, None, denoise=1.0, init_latent=init, **kw)
    without = sample(model, noise, cond, None, denoise=1.0, **kw)
    assert torch.equal(with_init, without)
    # Partial denoise starts from noise*(1-t0) + init*t0 at t0 = grid[int((N+1)*(1-d))].
    model.calls.clear()
    sample(model, noise, cond, None, denoise=0.6, init_latent=init, **kw)
    t0 = float(time_grid(10, 4.0)[4])
    assert len(model.calls) == 6 and float(model.calls[0]["t"][0]) == pytest.approx(t0)
    # 1 step at denoise 0.5: the original drops int(2 * 0.5) = 1 of its 2 points, leaving only t = 1.
    assert torch.equal(sample(model, noise, cond, None, steps=1, cfg=1.0, shift=1.0, denoise=0.5, init_latent=init), init)


class Spy:
    """Wraps a real FlagDiT and records the keyword arguments of every forward."""

    def __init__(self, model):
        self.model = model
        self.kwargs = []

    def prepare_text(self, feats, mask):
        return self.model.prepare_text(feats, mask)

    def forward_with_text(self, x, t, text, **kwargs):
        self.kwargs.append((float(t[0]), dict(kwargs)))
        return self.model.forward_with_text(x, t, text, **kwargs)


def test_t2i_extrapolation_is_neutral_ntk_at_1024_and_doubles_at_2x_area():
    model = make_tiny_flag_dit(seed=4)
    cond = random_text(1, 3, model.config.cap_feat_dim, seed=1)
    spy = Spy(model)
    kw = dict(steps=1, cfg=1.0, shift=4.0, solver="euler")
    trained = sample(spy, make_noise(0, (1, 4, 128, 128)), cond, None, extrapolation="t2i", **kw)
    assert spy.kwargs[-1][1] == {"ntk_factor": 1.0, "proportional_attn": True, "base_seqlen": 4224}
    off = sample(model, make_noise(0, (1, 4, 128, 128)), cond, None, extrapolation="off", **kw)
    prop_only = sample(
        lambda x, t, f, m: model(x, t, f, m, proportional_attn=True, base_seqlen=4224),
        make_noise(0, (1, 4, 128, 128)), cond, None, extrapolation="off", **kw,
    )
    torch.testing.assert_close(trained, prop_only, rtol=1e-5, atol=1e-6)  # NTK at factor 1 changes nothing
    assert not torch.allclose(trained, off, atol=1e-6)  # proportional attention (4160 vs 4224) does
    sample(spy, make_noise(0, (1, 4, 128, 256)), cond, None, extrapolation="t2i", **kw)  # 2048x1024 pixels
    assert spy.kwargs[-1][1] == {"ntk_factor": 2.0, "proportional_attn": True, "base_seqlen": 4224}


def test_time_aware_switches_from_linear_to_ntk_at_the_watershed():
    scale = math.sqrt(2048 * 1024) / 1024
    early = extrapolation_kwargs("time_aware", 256, 128, 0.1)
    late = extrapolation_kwargs("time_aware", 256, 128, 0.5)
    assert early == {"proportional_attn": True, "base_seqlen": 4096, "rope_scaling_factor": scale, "ntk_factor": 1.0}
    assert late == {"proportional_attn": True, "base_seqlen": 4096, "rope_scaling_factor": 1.0, "ntk_factor": scale}
    assert extrapolation_kwargs("off", 256, 128, 0.5) == {}
    # At or below the trained area nothing is rescaled (only proportional attention stays on).
    small = extrapolation_kwargs("time_aware", 64, 64, 0.1)
    assert small["rope_scaling_factor"] == 1.0 and small["ntk_factor"] == 1.0


def test_callback_sees_every_step_and_can_cancel():
    model = Recorder()
    seen = []
    sample(model, make_noise(0, (1, 4, 4, 4)), _text(3, 1), None, steps=4, cfg=1.0, shift=4.0,
           callback=lambda info: seen.append(info))
    assert [i["step"] for i in seen] == [0, 1, 2, 3] and {i["steps"] for i in seen} == {4}
    assert seen[-1]["t"] == 1.0 and set(seen[0]) >= {"x", "denoised", "t"}

    class Cancelled(Exception):
        pass

    def cancel(info):
        if info["step"] == 1:
            raise Cancelled

    model.calls.clear()
    with pytest.raises(Cancelled):
        sample(model, make_noise(0, (1, 4, 4, 4)), _text(3, 1), None, steps=10, cfg=1.0, shift=4.0, callback=cancel)
    assert len(model.calls) == 2


def test_non_finite_values_stop_with_advice():
    def overflow(x, t, f, m, **kw):
        return torch.full_like(x, float("inf"))

    with pytest.raises(SamplingError, match="bf16 or fp32"):
        sample(overflow, make_noise(0, (1, 4, 4, 4)), _text(2, 1), None, steps=3, cfg=1.0, shift=4.0)


def test_unknown_options_are_refused():
    noise = make_noise(0, (1, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        sample(Recorder(), noise, _text(2, 1), None, steps=3, cfg=1.0, shift=4.0, solver="heun")
    with pytest.raises(ValueError, match="negative"):
        sample(Recorder(), noise, _text(2, 1), None, steps=3, cfg=4.0, shift=4.0)
