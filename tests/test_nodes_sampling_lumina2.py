"""Lumina-Image-2.0's sampling options on the nodes, on plain Python (no ComfyUI): cfg_trunc and renorm_cfg on the
Lumina Sampler and the Lumina CFG Guider with the family's defaults behind -1, the dpm solver on the Lumina Sampler,
Lumina Sigmas and Lumina ODE Sampler, and the guider's truncation and renormalisation on ComfyUI's denoised
predictions."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from lumina_core import families
from lumina_core.generation import sample
from lumina_core.image.latent import SDXL_SCALING_FACTOR
from lumina_core.sampling.guidance import renorm
from lumina_core.sampling.schedule import dpm_time_grid, make_noise
from lumina_core.sampling.solvers import solve
from lumina_core.text.llama import LlamaTextEncoder
from lumina_core.weights.dit_files import load_flag_dit
from nodes import NODE_CLASS_MAPPINGS as N
from nodes import model_files
from nodes.flow_sampler import guided_at_sigma, lumina_ode, renorm_denoised
from nodes.sampling import FAMILY_DEFAULT, family_setting
from tests.helpers_nodes import DIT_NAME, LLAMA_NAME, make_tiny_models
from tests.test_flow_sampler import FlowDenoiser
from tests.test_sampling import MU, S, gaussian_velocity

PROMPT = "a lighthouse at dusk"
LUMINA2_SETTINGS = {"cfg_trunc": 0.25, "renorm_cfg": 1.0}  # the Lumina-Image-2.0 demo's


# --------------------------------------------------------------------------------------------------------------
# Declarations


@pytest.mark.parametrize("node_id", ["LuminaSampler", "LuminaCFGGuider"])
def test_truncation_and_renorm_follow_the_required_inputs_with_the_family_default(node_id):
    inputs = N[node_id].INPUT_TYPES()
    # The first optional inputs, after every required widget: saved workflows keep their widget values, and API
    # prompts written before them still validate.
    assert list(inputs["optional"])[:2] == ["cfg_trunc", "renorm_cfg"]
    assert not {"cfg_trunc", "renorm_cfg"} & set(inputs["required"])
    for name in ("cfg_trunc", "renorm_cfg"):
        kind, opts = inputs["optional"][name]
        assert kind == "FLOAT" and opts["default"] == FAMILY_DEFAULT == opts["min"] == -1.0
        assert "family" in opts["tooltip"] and "Lumina-Image-2.0" in opts["tooltip"]


def test_dpm_is_offered_wherever_a_solver_is_chosen():
    for node_id in ("LuminaSampler", "LuminaODESampler", "LuminaSigmas"):
        assert "dpm" in N[node_id].INPUT_TYPES()["required"]["solver"][0], node_id
    assert list(N["LuminaSigmas"].INPUT_TYPES()["required"]) == ["steps", "shift", "denoise", "solver"]


# --------------------------------------------------------------------------------------------------------------
# The family's defaults behind -1


def _model_of_family(name):
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=types.SimpleNamespace(family=name)))


@pytest.fixture
def lumina2_like(monkeypatch):
    """A registry entry with the Lumina-Image-2.0 sampling settings (the T2I entry's other fields)."""
    defaults = dataclasses.replace(families.LUMINA_T2I.defaults, **LUMINA2_SETTINGS)
    family = dataclasses.replace(families.LUMINA_T2I, name="lumina2_like", defaults=defaults)
    monkeypatch.setitem(families.FAMILIES, "lumina2_like", family)
    return family


def test_family_setting_reads_the_registry(lumina2_like):
    for family in ("lumina_t2i", "lumina_next"):  # the older families: always guide, no clamp
        model = _model_of_family(family)
        assert family_setting(model, "cfg_trunc", -1.0) == 1.0 and family_setting(model, "renorm_cfg", -1.0) == 0.0
    model = _model_of_family("lumina2_like")
    assert family_setting(model, "cfg_trunc", -1.0) == 0.25 and family_setting(model, "renorm_cfg", -1.0) == 1.0
    assert family_setting(model, "cfg_trunc", 0.6) == 0.6 and family_setting(model, "renorm_cfg", 0.0) == 0.0
    compiled = _model_of_family(None)
    compiled.model.diffusion_model = types.SimpleNamespace(_orig_mod=types.SimpleNamespace(family="lumina2_like"))
    assert family_setting(compiled, "cfg_trunc", -1.0) == 0.25  # a torch.compile'd DiT keeps its family
    for other in (_model_of_family("sd3"), types.SimpleNamespace(model=types.SimpleNamespace())):
        assert family_setting(other, "cfg_trunc", -1.0) == 1.0 and family_setting(other, "renorm_cfg", -1.0) == 0.0


def test_family_setting_of_comfyuis_own_lumina2_model():
    """ComfyUI's Lumina 2 MODEL (model config class Lumina2) gets Lumina-Image-2.0's defaults; a subclass of it
    (ComfyUI's Z-Image) and other models the neutral ones."""
    class Lumina2:  # the name of comfy.supported_models.Lumina2
        pass

    class ZImage(Lumina2):
        pass

    def comfy_model(config):
        return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config(),
                                                                 diffusion_model=types.SimpleNamespace()))

    expected = families.LUMINA_2.defaults
    model = comfy_model(Lumina2)
    assert family_setting(model, "cfg_trunc", -1.0) == expected.cfg_trunc == 0.25
    assert family_setting(model, "renorm_cfg", -1.0) == expected.renorm_cfg == 1.0
    assert family_setting(model, "cfg_trunc", 0.5) == 0.5
    z_image = comfy_model(ZImage)
    assert family_setting(z_image, "cfg_trunc", -1.0) == 1.0 and family_setting(z_image, "renorm_cfg", -1.0) == 0.0


# --------------------------------------------------------------------------------------------------------------
# The Lumina Sampler on tiny models against the core


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    paths = make_tiny_models(tmp_path_factory.mktemp("models"))
    model_files.set_model_folders("diffusion_models", [paths["root"] / "diffusion_models"])
    model_files.set_model_folders("text_encoders", [paths["root"] / "text_encoders"])
    (te,) = N["LuminaLlamaLoader"]().load(LLAMA_NAME, "fp32")
    (model,) = N["LuminaFlagDiTLoader"]().load(DIT_NAME, "fp32")
    (pos,) = N["LuminaTextEncode"]().encode(te, PROMPT)
    (neg,) = N["LuminaTextEncode"]().encode(te, "")
    encoder = LlamaTextEncoder.from_folder(paths["llama"], dtype=torch.float32)
    return {"model": model, "pos": pos, "neg": neg, "dit": load_flag_dit(paths["dit"], dtype=torch.float32),
            "cond": encoder.encode([PROMPT]), "uncond": encoder.encode([""])}


def _node_sample(loaded, *, solver="euler", steps=6, **settings):
    latent = {"samples": torch.zeros(1, 4, 4, 6)}
    (out,) = N["LuminaSampler"]().sample(loaded["model"], loaded["pos"], loaded["neg"], latent, 7, steps, 4.0, solver,
                                         6.0, 1.0, "off", "all", **settings)
    return out["samples"] * SDXL_SCALING_FACTOR


def _core_sample(loaded, *, solver="euler", steps=6, **settings):
    return sample(loaded["dit"], make_noise(7, (1, 4, 4, 6)), loaded["cond"], loaded["uncond"], steps=steps, cfg=4.0,
                  shift=6.0, solver=solver, extrapolation="off", guidance="all", **settings)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "dpm"])
def test_sampler_passes_truncation_and_renorm_to_the_core(loaded, solver):
    ours = _node_sample(loaded, solver=solver, cfg_trunc=0.5, renorm_cfg=1.0)
    torch.testing.assert_close(ours, _core_sample(loaded, solver=solver, cfg_trunc=0.5, renorm_cfg=1.0),
                               rtol=1e-5, atol=1e-6)
    plain = _core_sample(loaded, solver=solver)
    assert float((ours - plain).abs().max()) > 1e-4  # the settings reached the sampling


def test_sampler_default_is_the_family_setting(loaded, lumina2_like, monkeypatch):
    """-1 on a Lumina-T2I MODEL is the neutral setting; with the T2I entry carrying Lumina-Image-2.0's settings,
    -1 is 0.25 / 1.0."""
    neutral = _node_sample(loaded)
    assert torch.equal(neutral, _node_sample(loaded, cfg_trunc=-1.0, renorm_cfg=-1.0))
    assert torch.equal(neutral, _node_sample(loaded, cfg_trunc=1.0, renorm_cfg=0.0))
    monkeypatch.setitem(families.FAMILIES, "lumina_t2i", dataclasses.replace(lumina2_like, name="lumina_t2i"))
    default = _node_sample(loaded)
    assert torch.equal(default, _node_sample(loaded, **LUMINA2_SETTINGS))
    assert float((default - neutral).abs().max()) > 1e-4


def test_sampler_dpm_needs_two_steps(loaded):
    with pytest.raises(ValueError, match="steps >= 2"):
        _node_sample(loaded, solver="dpm", steps=1)


# --------------------------------------------------------------------------------------------------------------
# Lumina Sigmas and the Lumina ODE Sampler with dpm


@pytest.mark.parametrize("denoise", [1.0, 0.5])
def test_sigmas_for_dpm_are_its_own_grid(denoise):
    (sigmas,) = N["LuminaSigmas"]().get_sigmas(8, 6.0, denoise, "dpm")
    assert torch.equal(sigmas, 1.0 - dpm_time_grid(8, 6.0, denoise)) and float(sigmas[-1]) == 0.0
    if denoise == 1.0:
        assert float(sigmas[0]) == pytest.approx(6 * 0.999 / (1 + 5 * 0.999), abs=1e-6)  # not 1: the original's
    (uniform,) = N["LuminaSigmas"]().get_sigmas(8, 6.0, denoise, "midpoint")
    assert torch.equal(uniform, N["LuminaSigmas"]().get_sigmas(8, 6.0, denoise)[0])
    with pytest.raises(ValueError, match="steps >= 2"):
        N["LuminaSigmas"]().get_sigmas(1, 6.0, 1.0, "dpm")


def test_ode_sampler_dpm_on_its_sigmas_is_the_core_solver():
    z = torch.randn(2, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = dpm_time_grid(12, 6.0).double()
    model = FlowDenoiser(gaussian_velocity)
    ours = lumina_ode(model, z.clone(), 1.0 - grid, {"model_options": {}}, solver="dpm")
    torch.testing.assert_close(ours, solve(gaussian_velocity, z.clone(), grid, "dpm"), rtol=1e-10, atol=1e-10)
    assert len(model.calls) == 12 and min(s for s, _ in model.calls) > 0  # never evaluated at sigma 0


def test_ode_sampler_dpm_on_any_sigmas():
    """ComfyUI's sigmas from 1 (the uniform Lumina schedule here): dpm solves the flow to second order."""
    z = torch.randn(2, 256, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for steps in (20, 40):
        (sigmas,) = N["LuminaSigmas"]().get_sigmas(steps, 1.0, 1.0, "euler")
        out = lumina_ode(FlowDenoiser(gaussian_velocity), z.clone(), sigmas.double(), {}, solver="dpm")
        errors.append(float((out - (MU + S * z)).abs().max()))
    assert errors[0] < 0.05 and errors[0] / errors[1] > 3.0, errors


# --------------------------------------------------------------------------------------------------------------
# The guider's maths on denoised predictions


def test_guider_truncation_tests_t_one_minus_sigma():
    assert guided_at_sigma(torch.tensor([0.9, 0.9]), 0.25)  # t = 0.1: guided
    assert not guided_at_sigma(torch.tensor([0.75], dtype=torch.float64), 0.25)  # t = 0.25: the prompt alone
    assert not guided_at_sigma(torch.tensor([0.1]), 0.25)
    assert guided_at_sigma(torch.tensor([1e-6]), 1.0) and guided_at_sigma(torch.tensor([0.0]), 1.0)


def test_renorm_on_denoised_is_the_renorm_of_the_velocities():
    """denoised = x + sigma * v (per-sample sigma): clamping guided - x against cond - x is the original's clamp of
    the velocities, and samples the clamp leaves alone come back unchanged."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 4, 4, generator=g, dtype=torch.float64)
    v_cond = torch.randn(3, 16, 4, 4, generator=g, dtype=torch.float64)
    v_guided = torch.stack([v_cond[0] * 2.0, v_cond[1] * 0.8, v_cond[2] + torch.randn(16, 4, 4, generator=g,
                                                                                        dtype=torch.float64)])
    sigma = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64).view(-1, 1, 1, 1)
    guided, cond = x + sigma * v_guided, x + sigma * v_cond
    out = renorm_denoised(x, guided, cond, 1.0)
    torch.testing.assert_close(out, x + sigma * renorm(v_guided, v_cond, 1.0), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[0], guided[0]) and torch.equal(out[1], guided[1])
    assert renorm_denoised(x, guided, cond, 0.0) is guided
