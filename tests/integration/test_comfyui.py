"""The pack inside a real ComfyUI server (CPU), driven through its HTTP API on tiny models the test writes.

Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`), e.g.

    eval "$(bash ../shared/comfyui/install_comfyui.sh /tmp/comfyui)"; python -m pytest tests/integration -v

One server serves the whole module: every workflow in workflows/ runs at a small size, ComfyUI's samplers are
checked against the Lumina Sampler, and a re-queued prompt must reuse the loaded models.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers_nodes import (  # noqa: E402
    DIT_NAME,
    GGUF_DIT_NAME,
    LLAMA_NAME,
    LUMINA2_ALL_IN_ONE_NAME,
    LUMINA2_DIT_NAME,
    NEXT_DIT_NAME,
    REPO,
    VAE_NAME,
    load_workflows,
    ui_to_api,
)
from tests.integration.comfy_server import (  # noqa: E402
    COMFYUI_DIR,
    COMFYUI_PYTHON,
    load_latent,
    png_size,
    preset_size,
    relative_difference,
    requires_comfyui,
    small_prompt,
    start_server,
)

pytestmark = requires_comfyui

PACK_NODES = {
    "LuminaLlamaLoader": "Lumina Load LLaMA Text Encoder",
    "LuminaFlagDiTLoader": "Lumina Load Flag-DiT",
    "LuminaTextEncode": "Lumina Text Encode",
    "LuminaSampler": "Lumina Sampler",
    "LuminaSigmas": "Lumina Sigmas",
    "LuminaEmptyLatent": "Lumina Empty Latent",
}
DIT_LOAD_LINE = "Loaded Lumina-T2I Flag-DiT"
LLAMA_LOAD_LINE = "Loaded LLaMA text encoder"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_base"))
    yield srv
    srv.stop()
    shutil.rmtree(srv.base / "output", ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------


def test_nodes_registered_without_import_errors(server):
    log = server.log_text()
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert not re.search(r"Cannot import .*ComfyUI-Lumina", log)
    for node_id, display in PACK_NODES.items():
        info = server.object_info.get(node_id)
        assert info is not None, f"{node_id} is not registered"
        assert info["display_name"] == display
        assert info["category"].startswith("Lumina/")
    # The models tree holds tiny Lumina-Next and Lumina-Image-2.0 DiTs too (for their workflows), the latter also as
    # the all-in-one file in models/checkpoints.
    assert server.object_info["LuminaFlagDiTLoader"]["input"]["required"]["dit_name"][0] == sorted(
        [DIT_NAME, NEXT_DIT_NAME, LUMINA2_DIT_NAME, LUMINA2_ALL_IN_ONE_NAME, GGUF_DIT_NAME])
    assert server.object_info["LuminaLlamaLoader"]["input"]["required"]["llama_folder"][0] == [LLAMA_NAME]


WORKFLOW_NAMES = sorted(p.name for p in (REPO / "workflows").glob("*.json"))


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_runs(server, name):
    workflow = load_workflows()[name]
    prompt = ui_to_api(workflow, server.object_info)
    width, height = preset_size(prompt)
    batch = max([n["inputs"].get("batch_size", 1) for n in prompt.values() if n["class_type"] == "LuminaEmptyLatent"]
                or [1])
    entry = server.run(small_prompt(prompt, width, height))
    images = server.output_files(entry, "images")
    assert len(images) == batch
    for path in images:
        assert path.is_file() and path.stat().st_size > 0
        assert png_size(path) == (width, height)


def _text_nodes(prompt: dict, positive: str, negative: str):
    prompt.update({
        "te": {"class_type": "LuminaLlamaLoader", "inputs": {"llama_folder": LLAMA_NAME, "dtype": "fp32"}},
        "dit": {"class_type": "LuminaFlagDiTLoader", "inputs": {"dit_name": DIT_NAME, "weight_dtype": "fp32"}},
        "pos": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["te", 0], "text": positive}},
        "neg": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["te", 0], "text": negative}},
        "lat": {"class_type": "LuminaEmptyLatent",
                "inputs": {"resolution": "custom", "width": 64, "height": 48, "batch_size": 2}},
    })
    return prompt


def _save(prompt: dict, key: str, source: list):
    prompt[f"save_{key}"] = {"class_type": "SaveLatent", "inputs": {"samples": source, "filename_prefix": f"mix/{key}"}}


def test_comfy_samplers_match_lumina_sampler(server):
    """SamplerCustomAdvanced (euler, CFGGuider, Lumina Sigmas) = Lumina Sampler (euler, guidance "all"); the prompt
    and the negative have different token counts, so ComfyUI batches them through the padded conds. KSampler and the
    SD3/AuraFlow patch nodes accept the MODEL."""
    seed, steps, cfg, shift = 7, 4, 4.0, 4.0
    prompt = _text_nodes({}, "a photo of an astronaut riding a horse on the moon", "")
    prompt["lumina"] = {"class_type": "LuminaSampler", "inputs": {
        "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
        "seed": seed, "steps": steps, "cfg": cfg, "solver": "euler", "shift": shift, "denoise": 1.0,
        "extrapolation": "t2i", "guidance": "all", "cfg_trunc": -1.0, "renorm_cfg": -1.0}}
    prompt.update({
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "CFGGuider",
                   "inputs": {"model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": cfg}},
        "euler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "LuminaSigmas",
                   "inputs": {"steps": steps, "shift": shift, "denoise": 1.0, "solver": "euler"}},
        "custom": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["euler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["lat", 0]}},
        "aura": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["dit", 0], "shift": shift}},
        "sd3": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["dit", 0], "shift": shift}},
    })
    for key, model in (("ksampler", "dit"), ("ksampler_aura", "aura"), ("ksampler_sd3", "sd3")):
        prompt[key] = {"class_type": "KSampler", "inputs": {
            "model": [model, 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}}
    for key in ("lumina", "custom", "ksampler", "ksampler_aura", "ksampler_sd3"):
        _save(prompt, key, [key, 0])
    entry = server.run(prompt)
    latents = {}
    for path in server.output_files(entry, "latents"):
        latents[re.sub(r"_\d+_\.latent$", "", path.name)] = load_latent(path)
    lumina, custom = latents["lumina"], latents["custom"]
    assert lumina.shape == (2, 4, 6, 8)
    assert torch.isfinite(lumina).all() and lumina.abs().max() > 0
    assert relative_difference(custom, lumina) < 1e-4
    ks = latents["ksampler"]
    assert ks.shape == lumina.shape and torch.isfinite(ks).all()
    # ModelSamplingSD3 multiplies sigma by 1000 before the network; the MODEL must undo exactly that.
    assert relative_difference(latents["ksampler_sd3"], latents["ksampler_aura"]) < 1e-5
    assert relative_difference(latents["ksampler_aura"], ks) < 1e-5


def _load_counts(server) -> tuple[int, int]:
    log = server.log_text()
    return log.count(DIT_LOAD_LINE), log.count(LLAMA_LOAD_LINE)


def test_requeue_with_new_seed_reuses_models_and_prompts(server):
    prompt = small_prompt(ui_to_api(load_workflows()["lumina_t2i_basic.json"], server.object_info), 64, 64)
    server.run(prompt)
    loads = _load_counts(server)
    assert loads[0] >= 1 and loads[1] >= 1
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "LuminaSampler")
    prompt[sampler]["inputs"]["seed"] += 1
    entry = server.run(prompt)
    assert _load_counts(server) == loads
    cached = set()
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_cached":
            cached.update(data["nodes"])
    reused = {k for k, n in prompt.items() if n["class_type"] in
              ("LuminaLlamaLoader", "LuminaFlagDiTLoader", "LuminaTextEncode", "VAELoader")}
    assert reused <= cached
    assert sampler not in cached


# Run by ComfyUI's python, with the pack's folder first on sys.path: the MODEL's internals checked directly.
MODEL_SCRIPT = r"""
import sys, torch
import comfy.cli_args
comfy.cli_args.args.cpu = True
sys.path.insert(0, sys.argv[1])
from nodes import comfy_model
from lumina_core.weights.dit_files import load_flag_dit
from lumina_core.models.flag_dit import extrapolation_kwargs

# Texts of different lengths batch by zero padding (mask False), never by repeating tokens.
a = comfy_model.LuminaTextCond(torch.ones(2, 3, 4))
b = comfy_model.LuminaTextCond(torch.full((2, 5, 4), 2.0))
assert a.can_concat(b) and b.can_concat(a)
cat = a.concat([b])
assert cat.shape == (4, 5, 4) and cat[:2, 3:].abs().sum() == 0 and torch.equal(cat[:2, :3], a.cond)

# ComfyUI's denoised = x - sigma * output must be the Lumina data estimate x + (1 - t) * v, t = 1 - sigma.
patcher = comfy_model.load_flag_dit_model(sys.argv[2], "fp32")
base = patcher.model
plain = load_flag_dit(sys.argv[2], dtype=torch.float32)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 6, 8, generator=g)
sigma = torch.tensor([0.8, 0.8])
feats = torch.randn(2, 7, plain.config.cap_feat_dim, generator=g)
mask = torch.ones(2, 7, dtype=torch.bool)
mask[1, 4:] = False
conds = base.extra_conds(cross_attn=feats, attention_mask=mask, lumina_t2i_llama=True, prompt_type="positive")
assert set(conds) >= {"c_crossattn", "attention_mask"}
denoised = base.apply_model(x, sigma, c_crossattn=conds["c_crossattn"].cond,
                            attention_mask=conds["attention_mask"].cond)
t = 1 - sigma
v = plain(x, t, feats, mask, **extrapolation_kwargs("t2i", 6, 8, 0.2))
expected = x + (1 - t).view(-1, 1, 1, 1) * v
err = float((denoised - expected).abs().max())
assert err < 1e-5, err
assert base.model_sampling.shift == 4.0 and base.model_sampling.multiplier == 1.0
assert type(base.latent_format).__name__ == "SDXL" and base.model_type.name == "FLOW"

# SDXL CLIP conditioning (2048 wide, no Lumina marker) is refused with what to connect.
try:
    base.extra_conds(cross_attn=torch.zeros(1, 77, 2048), prompt_type="negative")
except ValueError as e:
    assert "SDXL CLIP" in str(e) and "Lumina Text Encode" in str(e), e
else:
    raise AssertionError("SDXL conditioning accepted")
print("MODEL OK")
"""


def test_model_internals_in_comfyui(server):
    dit = server.base / "models" / "diffusion_models" / DIT_NAME
    result = subprocess.run([COMFYUI_PYTHON, "-c", MODEL_SCRIPT, str(REPO), str(dit)], cwd=COMFYUI_DIR,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "MODEL OK" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]


def test_sampler_refuses_wrong_latent_size_with_nearest_sizes(server):
    prompt = _text_nodes({}, "a red cat", "")
    prompt["bad"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 72, "height": 64, "batch_size": 1}}
    prompt["lumina"] = {"class_type": "LuminaSampler", "inputs": {
        "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["bad", 0],
        "seed": 0, "steps": 2, "cfg": 4.0, "solver": "euler", "shift": 4.0, "denoise": 1.0,
        "extrapolation": "t2i", "guidance": "faithful", "cfg_trunc": -1.0, "renorm_cfg": -1.0}}
    _save(prompt, "bad", ["lumina", 0])
    entry = server.wait(server.queue(prompt))
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "LuminaSampler"
    assert "width 72 is not a multiple of 16 (use 64 or 80)" in errors[0]["exception_message"]


def test_empty_latent_validation_names_nearest_sizes(server):
    prompt = {"lat": {"class_type": "LuminaEmptyLatent",
                      "inputs": {"resolution": "custom", "width": 1000, "height": 1024, "batch_size": 1}}}
    _save(prompt, "x", ["lat", 0])
    status, resp = server.post("/prompt", {"prompt": prompt})
    assert status == 400
    assert "use 992 or 1008" in json.dumps(resp)


def test_interrupt_stops_the_lumina_sampler(server):
    prompt = _text_nodes({}, "a blue dog", "")
    prompt["lumina"] = {"class_type": "LuminaSampler", "inputs": {
        "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
        "seed": 3, "steps": 10000, "cfg": 4.0, "solver": "euler", "shift": 4.0, "denoise": 1.0,
        "extrapolation": "t2i", "guidance": "faithful", "cfg_trunc": -1.0, "renorm_cfg": -1.0}}
    _save(prompt, "long", ["lumina", 0])
    prompt_id = server.queue(prompt)
    deadline = time.monotonic() + 120
    while not server.get("/queue").get("queue_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # well into the 10000 steps
    start = time.monotonic()
    server.post("/interrupt", {})
    entry = server.wait(prompt_id, timeout=120)
    interrupted = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_interrupted"]
    assert interrupted and interrupted[0]["node_type"] == "LuminaSampler", entry["status"]["messages"]
    assert time.monotonic() - start < 30
    # The next prompt runs normally, with the models loaded before the interrupt.
    loads = _load_counts(server)
    prompt["lumina"]["inputs"]["steps"] = 2
    after = server.run(prompt)  # fails the test unless the prompt succeeds
    latent = load_latent(server.output_files(after, "latents")[0])
    assert latent.shape == (2, 4, 6, 8) and torch.isfinite(latent).all()
    assert _load_counts(server) == loads


def test_demo_latent_loads_and_decodes_in_comfyui(server, tmp_path):
    """The `.latent` file of `python -m lumina_core demo` goes through LoadLatent and VAEDecode unchanged."""
    out = tmp_path / "demo"
    subprocess.run(
        [sys.executable, "-m", "lumina_core", "demo", "--out", str(out), "--width", "64", "--height", "48",
         "--steps", "2"],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    shutil.copy(out / "lumina_demo.latent", server.base / "input" / "lumina_demo.latent")
    assert png_size(out / "lumina_demo_preview.png") == (64, 48)
    prompt = {
        "load": {"class_type": "LoadLatent", "inputs": {"latent": "lumina_demo.latent"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_NAME}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["load", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "demo/decoded"}},
        "resave": {"class_type": "SaveLatent", "inputs": {"samples": ["load", 0], "filename_prefix": "demo/latent"}},
    }
    entry = server.run(prompt)
    (image,) = server.output_files(entry, "images")
    assert png_size(image) == (64, 48)
    (latent,) = server.output_files(entry, "latents")
    expected = load_latent(out / "lumina_demo.latent")
    assert expected.shape == (1, 4, 6, 8)
    torch.testing.assert_close(load_latent(latent), expected)  # read as raw VAE latents, no rescale
