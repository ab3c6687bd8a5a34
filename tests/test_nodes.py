"""The nodes on plain Python (no ComfyUI): declarations, the time-convention conversion, and every node run on tiny
models, checked against the core called directly."""

from __future__ import annotations

import ast
import importlib.util
import inspect

import pytest
import torch

from lumina_core.generation import sample
from lumina_core.image.latent import SDXL_SCALING_FACTOR
from lumina_core.models.flag_dit import extrapolation_kwargs
from lumina_core.sampling.schedule import make_noise, time_grid
from lumina_core.text.llama import LlamaTextEncoder
from lumina_core.weights.dit_files import load_flag_dit
from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, comfy_env, comfy_model, model_files
from nodes.common import LUMINA_MARKER, RESOLUTION_PRESETS, make_conditioning
from nodes.flow_model import ComfyFlagDiT, comfy_output_from_velocity, lumina_t_from_sigma
from tests.helpers_dit import make_tiny_flag_dit, random_text
from tests.helpers_nodes import DIT_NAME, LLAMA_NAME, REPO, TINY_HIDDEN, make_tiny_models

N = NODE_CLASS_MAPPINGS
EXPECTED_NODES = {
    "LuminaDiTLoader",
    "LuminaTextEncoderLoader",
    "LuminaLlamaLoader",
    "LuminaFlagDiTLoader",
    "LuminaLoraLoader",
    "LuminaTextEncode",
    "LuminaRegionGrid",
    "LuminaSampler",
    "LuminaSigmas",
    "LuminaEmptyLatent",
    "LuminaODESampler",
    "LuminaCFGGuider",
    "LuminaSaveConditioning",
    "LuminaLoadConditioning",
}
PROMPT = "a red cat sat on the mat"


# --------------------------------------------------------------------------------------------------------------
# Declarations


def test_all_nodes_registered_with_display_names():
    assert set(N) == EXPECTED_NODES
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == EXPECTED_NODES
    assert len(set(NODE_DISPLAY_NAME_MAPPINGS.values())) == len(EXPECTED_NODES)
    assert all(name.startswith("Lumina ") for name in NODE_DISPLAY_NAME_MAPPINGS.values())


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_node_declaration_is_well_formed(node_id):
    cls = N[node_id]
    assert node_id.startswith("Lumina") and cls.__name__ == node_id
    assert cls.CATEGORY.startswith("Lumina/")
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    if hasattr(cls, "RETURN_NAMES"):
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    inputs = cls.INPUT_TYPES()
    assert set(inputs) <= {"required", "optional", "hidden"} and inputs["required"]
    declared = {**inputs["required"], **inputs.get("optional", {})}
    for name, spec in declared.items():
        assert isinstance(spec, tuple) and len(spec) == 2, name
        kind, opts = spec
        assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if kind in ("INT", "FLOAT"):
            assert {"default", "min", "max", "step"} <= set(opts), f"{node_id}.{name} needs default/min/max/step"
            assert opts["min"] <= opts["default"] <= opts["max"]
            assert isinstance(opts["default"], int if kind == "INT" else float)
        elif isinstance(kind, list):
            assert "default" not in opts or opts["default"] in kind
        else:
            assert isinstance(kind, str) and kind
    method = getattr(cls, cls.FUNCTION)
    params = inspect.signature(method).parameters
    assert list(params)[1:] == list(declared), "the node function must take exactly the declared inputs"
    for name in inputs.get("optional", {}):  # API prompts may leave an optional input out
        assert params[name].default is not inspect.Parameter.empty, f"{node_id}.{name} needs a default"


def test_numeric_limits_of_the_sampler():
    req = N["LuminaSampler"].INPUT_TYPES()["required"]
    assert req["steps"][1]["min"] == 1 and req["steps"][1]["default"] == 30
    assert req["cfg"][1]["min"] == 0.0 and req["cfg"][1]["default"] == 4.0
    assert req["shift"][1]["min"] > 0 and req["shift"][1]["default"] == 4.0
    assert (req["denoise"][1]["min"], req["denoise"][1]["max"], req["denoise"][1]["default"]) == (0.0, 1.0, 1.0)
    assert req["seed"][1]["control_after_generate"] is True
    assert req["solver"][1]["default"] == "euler"
    assert req["extrapolation"][1]["default"] == "t2i"
    assert req["guidance"][0] == ["faithful", "all"] and req["guidance"][1]["default"] == "faithful"


def test_only_comfy_env_imports_comfyui():
    importers = set()
    for path in sorted((REPO / "nodes").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n.split(".")[0] in ("comfy", "folder_paths", "latent_preview", "comfy_extras") for n in names):
                importers.add(path.name)
    assert importers == {"comfy_env.py"}
    assert comfy_env.IN_COMFYUI is False


def test_root_package_registers_nothing_without_comfyui():
    spec = importlib.util.spec_from_file_location(
        "lumina_pack_root", REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.NODE_DISPLAY_NAME_MAPPINGS == {}


# --------------------------------------------------------------------------------------------------------------
# The ComfyUI time convention (SPEC §5), converted in one place


def test_sigma_conversion_recovers_the_data():
    """ComfyUI computes denoised = x - sigma * output; with Lumina's t = 1 - sigma and v = data - noise that must be
    the data itself on the straight path x = t*data + (1-t)*noise."""
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    sigma = torch.tensor([0.9, 0.25]).view(-1, 1, 1, 1)
    t = lumina_t_from_sigma(sigma)
    x = t * data + (1 - t) * noise
    assert torch.allclose(sigma * noise + (1 - sigma) * data, x)  # ComfyUI's own noise_scaling of a flow model
    denoised = x - sigma * comfy_output_from_velocity(data - noise)
    assert torch.allclose(denoised, data, atol=1e-6)


def _comfy_dit(seed=0, **overrides):
    plain = make_tiny_flag_dit(seed=seed, **overrides)
    wrapped = ComfyFlagDiT(plain.config, dtype=torch.float32)
    wrapped.load_state_dict(plain.state_dict(), strict=True)
    return plain, wrapped.eval()


def test_comfy_forward_is_the_negated_velocity_at_t_one_minus_sigma():
    plain, wrapped = _comfy_dit()
    feats, mask = random_text(2, 5, plain.config.cap_feat_dim, lengths=[5, 3])
    x = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        out = wrapped(x, sigma, context=feats, attention_mask=mask.long(), transformer_options={}, control=None)
        v = plain(x, 1 - sigma, feats, mask, **extrapolation_kwargs("t2i", 4, 6, 0.3))
        off = wrapped(x, sigma, context=feats, attention_mask=mask.long(),
                      transformer_options={"lumina_extrapolation": "off"})
        v_off = plain(x, 1 - sigma, feats, mask)
    assert wrapped.dtype == torch.float32
    assert torch.allclose(out, -v, atol=1e-6)
    assert torch.allclose(off, -v_off, atol=1e-6)
    assert not torch.allclose(out, off)  # the mask and the extrapolation reach the model
    with pytest.raises(ValueError, match="Lumina Text Encode"):
        wrapped(x, sigma)


# --------------------------------------------------------------------------------------------------------------
# Running the nodes on tiny models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = make_tiny_models(tmp_path_factory.mktemp("models"))
    root = paths["root"]
    # Folders the LLaMA list must skip or find: not LLaMA, no config, nested.
    (root / "text_encoders" / "t5xxl").mkdir()
    (root / "text_encoders" / "t5xxl" / "config.json").write_text('{"model_type": "t5"}')
    (root / "text_encoders" / "empty").mkdir()
    (root / "text_encoders" / "clip_l.safetensors").write_bytes(b"")
    from tests.helpers_llama import make_tiny_llama_folder

    make_tiny_llama_folder(root / "text_encoders" / "meta" / "llama-small", hidden_size=TINY_HIDDEN)
    model_files.set_model_folders("diffusion_models", [root / "diffusion_models"])
    model_files.set_model_folders("text_encoders", [root / "text_encoders"])
    return paths


@pytest.fixture(scope="module")
def loaded(models):
    (te,) = N["LuminaLlamaLoader"]().load(LLAMA_NAME, "fp32")
    (model,) = N["LuminaFlagDiTLoader"]().load(DIT_NAME, "fp32")
    (pos,) = N["LuminaTextEncode"]().encode(te, PROMPT)
    (neg,) = N["LuminaTextEncode"]().encode(te, "")
    return {"te": te, "model": model, "pos": pos, "neg": neg}


@pytest.fixture(scope="module")
def direct(models):
    """The same models loaded by the core alone, the reference the nodes are checked against."""
    encoder = LlamaTextEncoder.from_folder(models["llama"], dtype=torch.float32)
    dit = load_flag_dit(models["dit"], dtype=torch.float32)
    return {"cond": encoder.encode([PROMPT]), "uncond": encoder.encode([""]), "dit": dit}


def test_loader_lists(models):
    assert N["LuminaLlamaLoader"].INPUT_TYPES()["required"]["llama_folder"][0] == [LLAMA_NAME, "meta/llama-small"]
    assert N["LuminaFlagDiTLoader"].INPUT_TYPES()["required"]["dit_name"][0] == [DIT_NAME]


def test_loaders_refuse_missing_files(models):
    with pytest.raises(FileNotFoundError, match="Llama-2-7b-hf"):
        N["LuminaLlamaLoader"]().load("nope", "fp32")
    with pytest.raises(FileNotFoundError):
        N["LuminaFlagDiTLoader"]().load("../../etc/passwd", "fp32")


def test_loaders_apply_the_dtype(loaded, models):
    dit = comfy_model.lumina_dit(loaded["model"])
    assert dit.x_embedder.weight.dtype == torch.float32
    (bf16,) = N["LuminaFlagDiTLoader"]().load(DIT_NAME, "bf16")
    assert comfy_model.lumina_dit(bf16).x_embedder.weight.dtype == torch.bfloat16
    (te16,) = N["LuminaLlamaLoader"]().load(LLAMA_NAME, "auto")
    assert te16.encoder.dtype == torch.bfloat16  # plain Python's "auto"


def test_text_encode_gives_standard_conditioning(loaded, direct):
    (features, extras), = loaded["pos"]
    feats, mask = direct["cond"]
    assert extras[LUMINA_MARKER] is True
    assert torch.equal(features, feats) and torch.equal(extras["attention_mask"], mask)
    (empty, empty_extras), = loaded["neg"]
    assert empty.shape == (1, 2, TINY_HIDDEN)  # "" -> [BOS, EOS]
    assert empty_extras["attention_mask"].all()


def _run_sampler(loaded, latent, *, seed=5, steps=3, cfg=4.0, solver="euler", shift=4.0, denoise=1.0,
                 extrapolation="t2i", guidance="faithful", positive=None, negative=None):
    (out,) = N["LuminaSampler"]().sample(
        loaded["model"],
        loaded["pos"] if positive is None else positive,
        loaded["neg"] if negative is None else negative,
        latent, seed, steps, cfg, solver,
        shift, denoise, extrapolation, guidance,
    )
    return out


def test_sampler_returns_raw_vae_latents_of_the_core_sample(loaded, direct):
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 64, 48, 2)
    out = _run_sampler(loaded, latent, seed=11, steps=4, guidance="all", solver="midpoint")
    assert out["samples"].shape == (2, 4, 6, 8) and out["samples"].dtype == torch.float32
    model_space = sample(
        direct["dit"], make_noise(11, (2, 4, 6, 8)), direct["cond"], direct["uncond"], steps=4, cfg=4.0, shift=4.0,
        solver="midpoint", guidance="all", extrapolation="t2i",
    )
    assert torch.allclose(out["samples"] * SDXL_SCALING_FACTOR, model_space, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out["samples"], model_space)  # it is the raw VAE scale, not model space
    assert "downscale_ratio_spacial" not in out


def test_img2img_scales_the_input_latent(loaded, direct):
    raw = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3)) * 5
    out = _run_sampler(loaded, {"samples": raw}, seed=2, steps=5, denoise=0.6)
    model_space = sample(
        direct["dit"], make_noise(2, raw.shape), direct["cond"], direct["uncond"], steps=5, cfg=4.0, shift=4.0,
        solver="euler", denoise=0.6, init_latent=raw * SDXL_SCALING_FACTOR,
    )
    assert torch.allclose(out["samples"] * SDXL_SCALING_FACTOR, model_space, atol=1e-6, rtol=1e-5)
    # denoise 0 runs no step: the input comes back, through model space and back to the VAE scale.
    same = _run_sampler(loaded, {"samples": raw}, denoise=0.0)
    assert torch.allclose(same["samples"], raw, atol=1e-5)


def test_sampler_noise_follows_batch_index(loaded, direct):
    latent = {"samples": torch.zeros(2, 4, 4, 4), "batch_index": [3, 1]}
    out = _run_sampler(loaded, latent, seed=9, steps=2, cfg=1.0)
    expected = sample(direct["dit"], make_noise(9, (2, 4, 4, 4), [3, 1]), direct["cond"], None, steps=2, cfg=1.0,
                      shift=4.0)
    assert torch.allclose(out["samples"] * SDXL_SCALING_FACTOR, expected, atol=1e-6, rtol=1e-5)
    assert out["batch_index"] == [3, 1]


def test_cfg_one_ignores_the_negative(loaded):
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 32, 32, 1)
    sdxl_negative = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    a = _run_sampler(loaded, latent, cfg=1.0, negative=sdxl_negative)
    b = _run_sampler(loaded, latent, cfg=1.0)
    assert torch.equal(a["samples"], b["samples"])


def test_sampler_refusals_say_what_to_connect(loaded):
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 32, 32, 1)
    sdxl = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(ValueError, match=r"SDXL CLIP.*Lumina Text Encode"):
        _run_sampler(loaded, latent, positive=sdxl)
    narrow = make_conditioning(torch.zeros(1, 3, 16), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="expects 32"):
        _run_sampler(loaded, latent, negative=narrow)
    (features, extras), = loaded["pos"]
    concatenated = [[torch.cat([features, features], dim=1), extras]]  # what ConditioningConcat makes
    with pytest.raises(ValueError, match="ConditioningConcat"):
        _run_sampler(loaded, latent, positive=concatenated)
    with pytest.raises(ValueError, match="empty"):
        _run_sampler(loaded, latent, positive=[])
    other = type("SDXLPatcher", (), {"model": type("SDXL", (), {"diffusion_model": torch.nn.Linear(2, 2)})()})()
    with pytest.raises(ValueError, match="not a Lumina DiT loaded by this pack.*Lumina Load DiT"):
        N["LuminaSampler"]().sample(other, loaded["pos"], loaded["neg"], latent, 0, 2, 4.0, "euler", 4.0, 1.0,
                                    "t2i", "faithful")


@pytest.mark.parametrize(
    "shape, message",
    [
        ((1, 16, 4, 4), r"16 channels.*Lumina-T2I works on 4-channel latents of the SDXL VAE"),
        ((1, 4, 9, 8), r"height 72 is not a multiple of 16 \(use 64 or 80\)"),
        ((1, 4, 8, 125), r"width 1000 is not a multiple of 16 \(use 992 or 1008\)"),
        ((4, 4, 4), "shape"),
    ],
)
def test_sampler_refuses_latents_it_cannot_take(loaded, shape, message):
    # Not empty: an empty latent of another channel count is widened or narrowed, as ComfyUI's samplers do.
    with pytest.raises(ValueError, match=message):
        _run_sampler(loaded, {"samples": torch.full(shape, 0.5)})


def test_sampler_refuses_masked_latents(loaded):
    latent = {"samples": torch.zeros(1, 4, 4, 4), "noise_mask": torch.ones(1, 1, 32, 32)}
    with pytest.raises(ValueError, match="KSampler"):
        _run_sampler(loaded, latent)


# --------------------------------------------------------------------------------------------------------------
# Empty latent and sigmas


@pytest.mark.parametrize("preset", RESOLUTION_PRESETS)
def test_empty_latent_presets(preset):
    w, h = (int(v) for v in preset.split("x"))
    (latent,) = N["LuminaEmptyLatent"]().generate(preset, 16, 16, 3)
    assert latent["samples"].shape == (3, 4, h // 8, w // 8)
    assert latent["samples"].abs().sum() == 0


def test_empty_latent_custom_size_and_validation():
    node = N["LuminaEmptyLatent"]
    (latent,) = node().generate("custom", 1040, 512, 1)
    assert latent["samples"].shape == (1, 4, 64, 130)
    assert node.VALIDATE_INPUTS("custom", 1040, 512) is True
    assert node.VALIDATE_INPUTS("1024x1024", 1000, 7) is True  # the custom size is not used
    message = node.VALIDATE_INPUTS("custom", 1000, 1024)
    assert isinstance(message, str) and "use 992 or 1008" in message
    assert "width 16 is below the minimum 32 (use 32)" in node.VALIDATE_INPUTS("custom", 16, 1024)
    assert "height 9000 is above the maximum 8192" in node.VALIDATE_INPUTS("custom", 1024, 9000)
    assert "not one of" in node.VALIDATE_INPUTS("999x999", 1024, 1024)
    assert node.VALIDATE_INPUTS("custom", None, 1024) is True  # linked input: known only at run time
    with pytest.raises(ValueError, match="992 or 1008"):
        node().generate("custom", 1000, 1024, 1)


@pytest.mark.parametrize("steps, shift, denoise", [(30, 4.0, 1.0), (7, 1.0, 1.0), (10, 6.0, 0.6), (4, 4.0, 0.0)])
def test_sigmas_are_the_shifted_lumina_grid(steps, shift, denoise):
    (sigmas,) = N["LuminaSigmas"]().get_sigmas(steps, shift, denoise)
    start = steps + 1 - len(sigmas)  # img2img keeps the tail of the grid (the core decides how much)
    assert (start == 0) == (denoise == 1.0) and len(sigmas) >= 1
    sigma = 1 - torch.arange(start, steps + 1, dtype=torch.float64) / steps
    expected = shift * sigma / (1 + (shift - 1) * sigma)  # SD3/Flux shift of sigma = 1 - t (SPEC §5)
    assert sigmas.dtype == torch.float32 and sigmas.ndim == 1 and sigmas.device.type == "cpu"
    assert torch.allclose(sigmas.double(), expected, atol=1e-6)
    assert float(sigmas[-1]) == 0.0
    assert torch.allclose(sigmas, 1 - time_grid(steps, shift, denoise))
