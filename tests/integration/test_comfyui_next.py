"""Lumina-Next inside a real ComfyUI server (CPU) on tiny models: the family-detecting loaders, the Next-DiT as a
native FLOW MODEL driven by ComfyUI's own samplers, and mixed families refused with the right encoder named.

Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`). The Lumina-Next workflows themselves run in
`test_comfyui.py::test_workflow_runs`, which runs every file in workflows/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers_nodes import (  # noqa: E402
    DIT_NAME,
    GEMMA2_NAME,
    GEMMA_NAME,
    GGUF_DIT_NAME,
    GGUF_LLAMA_NAME,
    LLAMA_NAME,
    LUMINA2_ALL_IN_ONE_NAME,
    LUMINA2_DIT_NAME,
    NEXT_DIT_NAME,
    REPO,
    load_workflows,
    ui_to_api,
)
from tests.integration.comfy_server import (  # noqa: E402
    COMFYUI_DIR,
    COMFYUI_PYTHON,
    execution_error,
    load_latent,
    png_size,
    relative_difference,
    requires_comfyui,
    start_server,
)

pytestmark = requires_comfyui

NEW_NODES = {"LuminaDiTLoader": "Lumina Load DiT", "LuminaTextEncoderLoader": "Lumina Load Text Encoder"}
NEXT_WORKFLOWS = ("lumina_next_1024.json", "lumina_next_2048x1024_extrapolation.json")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_base_next"))
    yield srv
    srv.stop()
    shutil.rmtree(srv.base / "output", ignore_errors=True)


def test_family_loaders_registered_and_list_both_families(server):
    for node_id, display in NEW_NODES.items():
        info = server.object_info[node_id]
        assert info["display_name"] == display and info["category"] == "Lumina/loaders"
    required = server.object_info["LuminaTextEncoderLoader"]["input"]["required"]
    # (and Lumina-Image-2.0's files, checked in test_comfyui_lumina2.py)
    assert required["text_encoder_folder"][0] == sorted(
        [GEMMA_NAME, LLAMA_NAME, GEMMA2_NAME, LUMINA2_ALL_IN_ONE_NAME, GGUF_LLAMA_NAME])
    assert server.object_info["LuminaDiTLoader"]["input"]["required"]["dit_name"][0] == sorted(
        [DIT_NAME, NEXT_DIT_NAME, LUMINA2_DIT_NAME, LUMINA2_ALL_IN_ONE_NAME, GGUF_DIT_NAME])
    # The older loaders stay, so saved Lumina-T2I workflows keep loading.
    assert "LuminaFlagDiTLoader" in server.object_info and "LuminaLlamaLoader" in server.object_info


@pytest.mark.parametrize("name", NEXT_WORKFLOWS)
def test_next_workflow_runs_and_loads_the_next_family(server, name):
    prompt = ui_to_api(load_workflows()[name], server.object_info)
    for node in prompt.values():
        if node["class_type"] == "LuminaEmptyLatent":
            w, h = (int(v) for v in node["inputs"]["resolution"].split("x"))
            node["inputs"].update(resolution="custom", width=w // 16, height=h // 16)
            size = (w // 16, h // 16)
        elif node["class_type"] == "LuminaSampler":
            node["inputs"]["steps"] = 2
    entry = server.run(prompt)
    (image,) = server.output_files(entry, "images")
    assert png_size(image) == size
    log = server.log_text()
    assert "Loaded Lumina-Next Next-DiT (original layout)" in log


def _next_prompt(text_loader="LuminaTextEncoderLoader", folder=GEMMA_NAME, dit=NEXT_DIT_NAME):
    key = "text_encoder_folder" if text_loader == "LuminaTextEncoderLoader" else "llama_folder"
    return {
        "te": {"class_type": text_loader, "inputs": {key: folder, "dtype": "fp32"}},
        "dit": {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": dit, "weight_dtype": "fp32"}},
        "pos": {"class_type": "LuminaTextEncode",
                "inputs": {"text_encoder": ["te", 0], "text": "a photo of an astronaut riding a horse on the moon"}},
        "neg": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["te", 0], "text": ""}},
        "lat": {"class_type": "LuminaEmptyLatent",
                "inputs": {"resolution": "custom", "width": 64, "height": 48, "batch_size": 2}},
    }


def test_comfy_samplers_drive_the_next_dit_as_the_lumina_sampler(server):
    """SamplerCustomAdvanced (euler, CFGGuider, Lumina Sigmas) on the Next-DiT MODEL = Lumina Sampler (euler,
    guidance "all", time_aware: the MODEL path's default for Lumina-Next); KSampler runs it too."""
    seed, steps, cfg, shift = 7, 3, 4.0, 4.0
    prompt = _next_prompt()
    prompt.update({
        "lumina": {"class_type": "LuminaSampler", "inputs": {
            "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "solver": "euler", "shift": shift, "denoise": 1.0,
            "extrapolation": "time_aware", "guidance": "all", "cfg_trunc": -1.0, "renorm_cfg": -1.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "guider": {"class_type": "CFGGuider",
                   "inputs": {"model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": cfg}},
        "euler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "LuminaSigmas",
                   "inputs": {"steps": steps, "shift": shift, "denoise": 1.0, "solver": "euler"}},
        "custom": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["euler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["lat", 0]}},
        "ksampler": {"class_type": "KSampler", "inputs": {
            "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
    })
    for key in ("lumina", "custom", "ksampler"):
        prompt[f"save_{key}"] = {"class_type": "SaveLatent",
                                 "inputs": {"samples": [key, 0], "filename_prefix": f"next/{key}"}}
    entry = server.run(prompt)
    latents = {re.sub(r"_\d+_\.latent$", "", p.name): load_latent(p) for p in server.output_files(entry, "latents")}
    lumina = latents["lumina"]
    assert lumina.shape == (2, 4, 6, 8) and torch.isfinite(lumina).all() and lumina.abs().max() > 0
    assert relative_difference(latents["custom"], lumina) < 1e-4
    assert latents["ksampler"].shape == lumina.shape and torch.isfinite(latents["ksampler"]).all()


@pytest.mark.parametrize(
    "text_loader, folder, dit, needed",
    [("LuminaTextEncoderLoader", GEMMA_NAME, DIT_NAME, "LLaMA-2-7B"),
     ("LuminaLlamaLoader", LLAMA_NAME, NEXT_DIT_NAME, "Gemma-2B")],
    ids=["gemma_into_flag_dit", "llama_into_next_dit"],
)
def test_mixed_families_are_refused_in_ksampler(server, text_loader, folder, dit, needed):
    prompt = _next_prompt(text_loader, folder, dit)
    prompt["ks"] = {"class_type": "KSampler", "inputs": {
        "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
        "seed": 1, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": "mixed"}}
    entry = server.wait(server.queue(prompt))
    message = execution_error(entry)
    assert f"which needs {needed} features" in message, message


MODEL_SCRIPT = r"""
import sys, torch
import comfy.cli_args
comfy.cli_args.args.cpu = True
sys.path.insert(0, sys.argv[1])
from nodes import comfy_model
from lumina_core.families import LUMINA_NEXT
from lumina_core.weights.dit_files import load_next_dit

patcher = comfy_model.load_dit_model(sys.argv[2], "fp32")
base = patcher.model
plain = load_next_dit(sys.argv[2], dtype=torch.float32)
assert type(base.diffusion_model).__name__ == "ComfyNextDiT"
assert base.model_sampling.shift == LUMINA_NEXT.defaults.shift and base.model_sampling.multiplier == 1.0
assert type(base.latent_format).__name__ == "SDXL" and base.model_type.name == "FLOW"
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 4, 6, 8, generator=g)
sigma = torch.tensor([0.8, 0.8])
feats = torch.randn(2, 7, plain.config.cap_feat_dim, generator=g)
mask = torch.ones(2, 7, dtype=torch.bool)
mask[1, 4:] = False
conds = base.extra_conds(cross_attn=feats, attention_mask=mask, lumina_t2i_llama=True, lumina_family="lumina_next",
                         prompt_type="positive")
denoised = base.apply_model(x, sigma, c_crossattn=conds["c_crossattn"].cond,
                            attention_mask=conds["attention_mask"].cond)
t = 1 - sigma
v = plain(x, t, feats, mask, **LUMINA_NEXT.extrapolation_kwargs("time_aware", 6, 8, 0.2, 0.3))
err = float((denoised - (x + (1 - t).view(-1, 1, 1, 1) * v)).abs().max())
assert err < 1e-5, err
try:
    base.extra_conds(cross_attn=feats, attention_mask=mask, lumina_t2i_llama=True, prompt_type="negative")
except ValueError as e:
    assert "needs Gemma-2B features" in str(e), e
else:
    raise AssertionError("LLaMA conditioning accepted by a Next-DiT")
print("NEXT MODEL OK")
"""


def test_next_model_internals_in_comfyui(server):
    dit = server.base / "models" / "diffusion_models" / NEXT_DIT_NAME
    result = subprocess.run([COMFYUI_PYTHON, "-c", MODEL_SCRIPT, str(REPO), str(dit)], cwd=COMFYUI_DIR,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "NEXT MODEL OK" in result.stdout, result.stderr[-4000:]
