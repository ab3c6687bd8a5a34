"""The Lumina ODE sampler function, faithful guidance on denoised predictions, and the MODEL's per-step wrappers
(text prepared once per generation, no graph break in the DiT's forward), on plain Python without ComfyUI."""

from __future__ import annotations

import pytest
import torch

from lumina_core.models.flag_dit import extrapolation_kwargs
from lumina_core.sampling.guidance import guide
from lumina_core.sampling.solvers import solve
from nodes.flow_model import (
    NETWORK_SIGMA_OPTION,
    STEP_KWARG,
    TEXT_CACHE_OPTION,
    ComfyFlagDiT,
    TextCache,
    apply_model_wrapper,
    outer_sample_wrapper,
)
from nodes.flow_sampler import SIGMA_FLOOR, keep_conditional_channels, lumina_ode
from tests.helpers_dit import make_tiny_flag_dit, random_text
from tests.test_sampling import MU, S, gaussian_velocity


class FlowDenoiser:
    """ComfyUI's model(x, sigma) of a flow model whose velocity is known: denoised = x + sigma * v(x, 1 - sigma).
    With `exact_end` it honours NETWORK_SIGMA_OPTION as the Lumina DiT does; `calls` records (sigma, options)."""

    def __init__(self, velocity, exact_end=False):
        self.velocity, self.exact_end, self.calls = velocity, exact_end, []

    def __call__(self, x, sigma, model_options=None, seed=None, **kwargs):
        options = (model_options or {}).get("transformer_options", {})
        self.calls.append((float(sigma[0]), dict(options)))
        network_sigma = options.get(NETWORK_SIGMA_OPTION) if self.exact_end else None
        s = sigma.view(-1, *[1] * (x.ndim - 1))
        t = 1.0 - (s if network_sigma is None else torch.full_like(s, network_sigma))
        return x + s * self.velocity(x, t)


@pytest.fixture(scope="module")
def z():
    return torch.randn(2, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _grid(steps, shift=4.0):
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return t / (t + shift - shift * t)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4", "ab2", "dopri5"])
def test_lumina_ode_on_sigmas_is_the_core_solver(z, solver):
    """Through ComfyUI's interface (denoised in, sigmas) with exact end points: the core's solution to rounding."""
    grid = _grid(12)
    model = FlowDenoiser(gaussian_velocity, exact_end=True)
    ours = lumina_ode(model, z.clone(), 1.0 - grid, {"model_options": {}}, solver=solver, rtol=1e-5)
    ref = solve(gaussian_velocity, z.clone(), grid, solver, rtol=1e-5)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    bound = {"euler": 1.0, "ab2": 0.3, "midpoint": 0.05, "rk4": 1e-3, "dopri5": 1e-3}[solver]
    assert float((ours - (MU + S * z)).abs().max()) < bound


@pytest.mark.parametrize("solver, low, high", [("euler", 1.7, 2.3), ("midpoint", 3.5, 9.0), ("rk4", 12.0, 32.0),
                                               ("ab2", 3.0, 6.0)])
def test_floor_keeps_the_convergence_of_the_core_for_any_flow_model(z, solver, low, high):
    """A model that cannot compute at sigma 0 is evaluated at SIGMA_FLOOR there: its errors are the core's (exact
    end point) to 2e-7 (the floor costs about h/8 * 1e-6 * |dv/dt|), and each solver keeps its order (the ranges of tests/test_sampling.py). rk4 is checked at
    10 and 20 steps: at 40 its error (2e-8) meets the floor's."""
    target = MU + S * z
    steps = (10, 20) if solver == "rk4" else (20, 40, 80)
    errors = []
    for n in steps:
        ours = lumina_ode(FlowDenoiser(gaussian_velocity), z.clone(), 1.0 - _grid(n), {}, solver=solver)
        core = solve(gaussian_velocity, z.clone(), _grid(n), solver)
        errors.append(float((ours - target).abs().max()))
        assert errors[-1] == pytest.approx(float((core - target).abs().max()), rel=1e-3, abs=2e-7)
    for coarse, fine in zip(errors, errors[1:]):
        assert low < coarse / fine < high, errors


def test_sigma_zero_is_evaluated_at_the_floor_in_float64_with_the_network_option():
    model = FlowDenoiser(gaussian_velocity)
    x = torch.randn(1, 8, dtype=torch.float32)
    lumina_ode(model, x, 1.0 - _grid(2).float(), {"model_options": {"transformer_options": {"keep": 1}}}, solver="rk4")
    sigmas = [s for s, _ in model.calls]
    assert 0.0 not in sigmas and sigmas[-1] == pytest.approx(SIGMA_FLOOR, rel=1e-6)
    end_options = model.calls[-1][1]
    assert end_options[NETWORK_SIGMA_OPTION] == 0.0 and end_options["keep"] == 1
    assert all(NETWORK_SIGMA_OPTION not in options for _, options in model.calls[:-1])
    # Only the last rk4 stage lands on t = 1.
    assert sum(s == pytest.approx(SIGMA_FLOOR, rel=1e-6) for s in sigmas) == 1


def test_callback_gets_comfyui_step_dicts(z):
    seen = []
    lumina_ode(FlowDenoiser(gaussian_velocity), z.clone(), 1.0 - _grid(3), {}, callback=seen.append, solver="midpoint")
    assert [d["i"] for d in seen] == [0, 1, 2]
    assert {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(seen[0])
    assert seen[-1]["sigma"] == pytest.approx(0.0)


def test_unknown_solver_is_refused(z):
    with pytest.raises(ValueError, match="unknown solver 'heun'.*dopri5"):
        lumina_ode(FlowDenoiser(gaussian_velocity), z, 1.0 - _grid(3), {}, solver="heun")


def test_faithful_guidance_on_denoised_equals_the_core_on_velocities():
    g = torch.Generator().manual_seed(3)
    x, v_c, v_u = (torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sigma, cfg = 0.37, 4.0
    cond, uncond = x + sigma * v_c, x + sigma * v_u  # ComfyUI's denoised predictions
    guided = keep_conditional_channels(uncond + cfg * (cond - uncond), cond)
    torch.testing.assert_close((guided - x) / sigma, guide(v_c, v_u, cfg, "faithful"))


# --------------------------------------------------------------------------------------------------------------
# The MODEL's wrappers: text prepared once per generation, the forward pure tensor maths


def _comfy_dit(seed=0):
    plain = make_tiny_flag_dit(seed=seed)
    wrapped = ComfyFlagDiT(plain.config, dtype=torch.float32)
    wrapped.load_state_dict(plain.state_dict(), strict=True)
    return plain, wrapped.eval()


class FakeBaseModel:
    """What ComfyUI's BaseModel._apply_model does around the diffusion model for a flow model (denoised out)."""

    def __init__(self, dit):
        self.diffusion_model = dit

    def apply_model(self, x, sigma, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        out = self.diffusion_model(x, sigma, context=c_crossattn, control=control,
                                   transformer_options=transformer_options, **kwargs)
        return x - sigma.view(-1, 1, 1, 1) * out


class Executor:
    """ComfyUI's WrapperExecutor for one wrapper around a bound method."""

    def __init__(self, fn, class_obj):
        self.fn, self.class_obj = fn, class_obj

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class Counted:
    def __init__(self, dit):
        self.count = 0
        original = dit.prepare_text

        def prepare(*a, **k):
            self.count += 1
            return original(*a, **k)

        dit.prepare_text = prepare


def _generation(base, steps, feats, mask, options):
    """One generation: new but equal text tensors at every step, as ComfyUI's cond concatenation makes them."""
    outs = []
    x = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    for i in range(steps):
        sigma = torch.full((2,), 1.0 - (i + 0.5) / steps)
        call = dict(options, uuids=["c", "u"], cond_or_uncond=[0, 1])
        outs.append(apply_model_wrapper(Executor(base.apply_model, base), x, sigma, None, feats.clone(), None, call,
                                        attention_mask=mask.long().clone()))
    return outs


def test_text_is_prepared_once_per_generation_and_results_are_unchanged():
    plain, dit = _comfy_dit()
    base = FakeBaseModel(dit)
    feats, mask = random_text(2, 5, plain.config.cap_feat_dim, lengths=[5, 2])
    counted = Counted(dit)
    guider = type("Guider", (), {"model_options": {"transformer_options": {}}})()
    results = {}

    def sample(*_args):
        results["outs"] = _generation(base, 5, feats, mask, guider.model_options["transformer_options"])
        return "done"

    assert outer_sample_wrapper(Executor(sample, guider)) == "done"
    assert counted.count == 1  # five steps, one preparation
    assert TEXT_CACHE_OPTION not in guider.model_options["transformer_options"]  # dropped with the generation
    x = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(4))
    for i, out in enumerate(results["outs"]):
        t = 1.0 - torch.full((2,), 1.0 - (i + 0.5) / 5)
        with torch.no_grad():
            v = plain(x, t, feats, mask, **extrapolation_kwargs("t2i", 4, 6, float(t[0])))
        torch.testing.assert_close(out, x + (1 - t).view(-1, 1, 1, 1) * v, rtol=1e-5, atol=1e-6)
    # A second generation prepares again (the cache does not outlive its generation); without a cache, every call.
    outer_sample_wrapper(Executor(sample, guider))
    assert counted.count == 2
    _generation(base, 3, feats, mask, {})
    assert counted.count == 5


def test_text_cache_checks_the_text_not_only_the_key():
    plain, dit = _comfy_dit()
    feats, mask = random_text(2, 5, plain.config.cap_feat_dim)
    cache = TextCache()
    a = cache.get(dit, ("k",), feats, mask)
    assert cache.get(dit, ("k",), feats.clone(), mask.clone()) is a and cache.prepared == 1
    changed = feats.clone()
    changed[0, 0, 0] += 1
    assert cache.get(dit, ("k",), changed, mask) is not a and cache.prepared == 2
    longer, longer_mask = random_text(2, 6, plain.config.cap_feat_dim)
    cache.get(dit, ("k",), longer, longer_mask)
    assert cache.prepared == 3


def test_network_sigma_option_computes_the_dit_at_that_sigma():
    plain, dit = _comfy_dit()
    base = FakeBaseModel(dit)
    feats, mask = random_text(1, 4, plain.config.cap_feat_dim)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    floor = torch.full((1,), 1e-3, dtype=torch.float64)
    denoised = apply_model_wrapper(Executor(base.apply_model, base), x.double(), floor, None, feats, None,
                                   {NETWORK_SIGMA_OPTION: 0.0}, attention_mask=mask)
    with torch.no_grad():
        v = plain(x, torch.ones(1), feats, mask, **extrapolation_kwargs("t2i", 4, 4, 1.0))
    torch.testing.assert_close(((denoised - x.double()) / 1e-3).float(), v, rtol=1e-5, atol=1e-6)


def test_dit_forward_with_a_step_has_no_graph_break():
    plain, dit = _comfy_dit(seed=2)
    feats, mask = random_text(2, 5, plain.config.cap_feat_dim, lengths=[5, 3])
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.4, 0.4])
    captured = {}

    def executor_fn(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        captured.update(kwargs)
        return dit(x, t, context=c_crossattn, transformer_options=transformer_options, **kwargs)

    with torch.no_grad():
        eager = apply_model_wrapper(Executor(executor_fn, FakeBaseModel(dit)), x, sigma, None, feats, None,
                                    {"lumina_extrapolation": "time_aware"}, attention_mask=mask)
        step = captured[STEP_KWARG]
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(dit)(x, sigma, context=feats, attention_mask=mask,
                                                 transformer_options={}, lumina_step=step)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
        compiled = torch.compile(dit, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x, sigma, context=feats, attention_mask=mask, transformer_options={},
                                            lumina_step=step), eager)
    assert dit.in_channels == 4  # read by ComfyUI's RenormCFG


def test_guider_and_sampler_nodes_say_they_need_comfyui():
    from nodes import NODE_CLASS_MAPPINGS as N

    with pytest.raises(RuntimeError, match="only inside ComfyUI"):
        N["LuminaODESampler"]().get_sampler("rk4", 1e-3, 1e-6)
    with pytest.raises(RuntimeError, match="only inside ComfyUI"):
        N["LuminaCFGGuider"]().get_guider(None, [], [], 4.0, "faithful", "t2i")
