"""Low-memory paths inside a real ComfyUI (CPU): fp8 weights for both models, and saved prompt encodings.

Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`). One server for the module, on the tiny models.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lumina_core import conditioning  # noqa: E402
from tests.helpers_nodes import DIT_NAME, LLAMA_NAME, TINY_HIDDEN, load_workflows, ui_to_api  # noqa: E402
from tests.integration.comfy_server import (  # noqa: E402
    execution_error,
    load_latent,
    png_size,
    relative_difference,
    requires_comfyui,
    start_server,
)

pytestmark = requires_comfyui

FP8 = ("fp8_e4m3fn", "fp8_e5m2")
POSITIVE = "a photo of an astronaut riding a horse on the moon"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_lowmem"))
    yield srv
    srv.stop()
    shutil.rmtree(srv.base / "output", ignore_errors=True)


def _sampler(model, positive, negative, latent, seed=3):
    return {"class_type": "LuminaSampler", "inputs": {
        "model": model, "positive": positive, "negative": negative, "latent_image": latent, "seed": seed,
        "steps": 3, "cfg": 4.0, "solver": "euler", "shift": 4.0, "denoise": 1.0, "extrapolation": "t2i",
        "guidance": "faithful", "cfg_trunc": -1.0, "renorm_cfg": -1.0}}


def _base(te_dtype="fp32", dit_dtype="fp32", encoder=True) -> dict:
    prompt = {
        "dit": {"class_type": "LuminaFlagDiTLoader", "inputs": {"dit_name": DIT_NAME, "weight_dtype": dit_dtype}},
        "lat": {"class_type": "LuminaEmptyLatent",
                "inputs": {"resolution": "custom", "width": 64, "height": 48, "batch_size": 1}},
    }
    if encoder:
        prompt.update({
            "te": {"class_type": "LuminaLlamaLoader", "inputs": {"llama_folder": LLAMA_NAME, "dtype": te_dtype}},
            "pos": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["te", 0], "text": POSITIVE}},
            "neg": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["te", 0], "text": ""}},
        })
    return prompt


def _latents(server, entry) -> dict:
    return {re.sub(r"_\d+_\.latent$", "", p.name): load_latent(p) for p in server.output_files(entry, "latents")}


def _save_latent(prompt, key, source):
    prompt[f"save_{key}"] = {"class_type": "SaveLatent", "inputs": {"samples": source, "filename_prefix": f"lm/{key}"}}


def test_loaders_offer_fp8_and_conditioning_nodes_are_registered(server):
    info = server.object_info
    assert set(FP8) <= set(info["LuminaFlagDiTLoader"]["input"]["required"]["weight_dtype"][0])
    assert set(FP8) <= set(info["LuminaLlamaLoader"]["input"]["required"]["dtype"][0])
    assert info["LuminaSaveConditioning"]["display_name"] == "Lumina Save Conditioning"
    assert info["LuminaLoadConditioning"]["display_name"] == "Lumina Load Conditioning"
    assert info["LuminaLoadConditioning"]["input"]["required"]["conditioning_file"][1].get("file_upload") is True


def test_sampling_from_saved_encodings_equals_sampling_from_fresh_ones(server):
    prompt = _base()
    prompt["save_pos"] = {"class_type": "LuminaSaveConditioning",
                          "inputs": {"conditioning": ["pos", 0], "filename_prefix": "roundtrip/pos"}}
    prompt["save_neg"] = {"class_type": "LuminaSaveConditioning",
                          "inputs": {"conditioning": ["neg", 0], "filename_prefix": "roundtrip/neg"}}
    prompt["fresh"] = _sampler(["dit", 0], ["save_pos", 0], ["save_neg", 0], ["lat", 0])
    _save_latent(prompt, "fresh", ["fresh", 0])
    entry = server.run(prompt)
    fresh = _latents(server, entry)["fresh"]
    saved = server.base / "output" / "roundtrip" / "pos_00001_.safetensors"
    meta = conditioning.load(saved).meta
    assert meta["prompt"] == POSITIVE and meta["family"] == "lumina_t2i" and meta["width"] == TINY_HIDDEN

    second = _base(encoder=False)
    second["pos"] = {"class_type": "LuminaLoadConditioning",
                     "inputs": {"conditioning_file": "roundtrip/pos_00001_.safetensors [output]"}}
    second["neg"] = {"class_type": "LuminaLoadConditioning",
                     "inputs": {"conditioning_file": "roundtrip/neg_00001_.safetensors [output]"}}
    second["loaded"] = _sampler(["dit", 0], ["pos", 0], ["neg", 0], ["lat", 0])
    _save_latent(second, "loaded", ["loaded", 0])
    loaded = _latents(server, server.run(second))["loaded"]
    assert torch.isfinite(fresh).all() and fresh.abs().max() > 0
    assert torch.equal(loaded, fresh)


def test_two_stage_workflows_run_in_order(server):
    workflows = load_workflows()
    for name in ("lumina_two_stage_1_encode.json", "lumina_two_stage_2_sample.json"):
        prompt = ui_to_api(workflows[name], server.object_info)
        for node in prompt.values():
            if node["class_type"] == "LuminaEmptyLatent":
                node["inputs"].update(resolution="custom", width=64, height=64)
            elif node["class_type"] == "LuminaSampler":
                node["inputs"]["steps"] = 2
        images = server.output_files(server.run(prompt), "images")
        assert len(images) == 1 and png_size(images[0]) == (64, 64), name
    assert "LuminaLlamaLoader" not in {n["class_type"] for n in prompt.values()}  # stage 2 loads no text encoder


@pytest.mark.parametrize("fp8", FP8)
def test_fp8_dit_and_encoder_are_finite_and_close_to_fp32(server, fp8):
    prompt = _base()
    prompt["ref"] = _sampler(["dit", 0], ["pos", 0], ["neg", 0], ["lat", 0])
    prompt.update({f"{k}8": v for k, v in _base(te_dtype=fp8, dit_dtype=fp8).items() if k != "lat"})
    prompt["pos8"]["inputs"]["text_encoder"] = ["te8", 0]
    prompt["neg8"]["inputs"]["text_encoder"] = ["te8", 0]
    prompt["low"] = _sampler(["dit8", 0], ["pos8", 0], ["neg8", 0], ["lat", 0])
    _save_latent(prompt, "ref", ["ref", 0])
    _save_latent(prompt, "low", ["low", 0])
    latents = _latents(server, server.run(prompt))
    low, ref = latents["low"], latents["ref"]
    assert torch.isfinite(low).all()
    assert 1e-4 < relative_difference(low, ref) < 0.25  # really fp8 (not fp32), and close


def _failure(server, prompt) -> str:
    entry = server.wait(server.queue(prompt))
    assert entry.get("status", {}).get("status_str") == "error", "the prompt should have failed"
    return execution_error(entry)


def test_an_encoding_of_another_family_is_refused_with_a_clear_message(server):
    mask = torch.ones(1, 3, dtype=torch.bool)
    conditioning.save(server.base / "input" / "gemma_prompt.safetensors", torch.randn(1, 3, TINY_HIDDEN), mask,
                      family="lumina_next", prompt="from Lumina-Next")
    prompt = _base(encoder=False)
    prompt["pos"] = {"class_type": "LuminaLoadConditioning", "inputs": {"conditioning_file": "gemma_prompt.safetensors"}}
    prompt["run"] = _sampler(["dit", 0], ["pos", 0], ["pos", 0], ["lat", 0])
    _save_latent(prompt, "never", ["run", 0])
    error = _failure(server, prompt)
    assert "comes from Gemma-2B (Lumina-Next)" in error and "needs LLaMA-2-7B" in error, error


def _upload(server, path: Path) -> dict:
    """POST a file to /upload/image as the frontend's upload button does (multipart form, type=input)."""
    import json
    import urllib.request
    import uuid

    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"type\"\r\n\r\ninput\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{path.name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(server.url + "/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_uploaded_encoding_is_listed_and_loads(server, tmp_path):
    assert any(e.endswith("/lumina_conditioning_upload.js") for e in server.get("/extensions"))
    feats = torch.randn(1, 4, TINY_HIDDEN)
    mask = torch.ones(1, 4, dtype=torch.bool)
    path = conditioning.save(tmp_path / "uploaded_prompt.safetensors", feats, mask, prompt="uploaded")
    assert _upload(server, path)["name"] == "uploaded_prompt.safetensors"
    listed = server.get("/object_info/LuminaLoadConditioning")["LuminaLoadConditioning"]
    assert "uploaded_prompt.safetensors" in listed["input"]["required"]["conditioning_file"][0]
    prompt = _base(encoder=False)
    prompt["pos"] = {"class_type": "LuminaLoadConditioning",
                     "inputs": {"conditioning_file": "uploaded_prompt.safetensors"}}
    prompt["run"] = _sampler(["dit", 0], ["pos", 0], ["pos", 0], ["lat", 0])
    _save_latent(prompt, "uploaded", ["run", 0])
    assert torch.isfinite(_latents(server, server.run(prompt))["uploaded"]).all()


# Run by ComfyUI's python: ComfyUI's fp8 command-line flags pick fp8 for "auto", and both models are built from
# ComfyUI's casting layers (comfy.ops), which is what lets its low-VRAM mode load them in parts.
FLAGS_SCRIPT = r"""
import sys, torch
import comfy.cli_args
args = comfy.cli_args.args
args.cpu = True
args.fp8_e4m3fn_unet = True
args.fp8_e5m2_text_enc = True
sys.path.insert(0, sys.argv[1])
from nodes import comfy_model, text_encoder_handle

patcher = comfy_model.load_flag_dit_model(sys.argv[2], "auto")
dit = patcher.model.diffusion_model
wq = dit.layers[0].attention.wq
assert wq.weight.dtype == torch.float8_e4m3fn, wq.weight.dtype
assert hasattr(wq, "comfy_cast_weights") and type(wq).__module__ == "comfy.ops", type(wq)
assert dit.compute_dtype == torch.float32, dit.compute_dtype  # ComfyUI computes in fp32 on a CPU
handle = text_encoder_handle.load_text_encoder(sys.argv[3], "auto")
q = handle.encoder.model.layers[0].self_attn.q_proj
assert q.weight.dtype == torch.float8_e5m2, q.weight.dtype
assert hasattr(q, "comfy_cast_weights") and type(q).__module__ == "comfy.ops", type(q)
feats, mask = text_encoder_handle.encode_text(handle, "a red cat")
assert feats.dtype == torch.float32 and torch.isfinite(feats).all()
out = dit(torch.randn(1, 4, 8, 8), torch.tensor([0.5]), feats, mask)
assert torch.isfinite(out).all()
print("FLAGS OK")
"""


def test_comfyui_fp8_flags_pick_fp8_and_comfy_casting_layers(server):
    import subprocess

    from tests.helpers_nodes import REPO
    from tests.integration.comfy_server import COMFYUI_DIR, COMFYUI_PYTHON

    models = server.base / "models"
    result = subprocess.run(
        [COMFYUI_PYTHON, "-c", FLAGS_SCRIPT, str(REPO), str(models / "diffusion_models" / DIT_NAME),
         str(models / "text_encoders" / LLAMA_NAME)],
        cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0 and "FLAGS OK" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]


def test_api_prompts_without_the_newer_sampler_inputs_still_run(server):
    """cfg_trunc, renorm_cfg and the solver grid are optional inputs: an API prompt written before they existed runs
    and gives the latents of their defaults (the family's settings, the Lumina grid)."""
    prompt = _base()
    prompt["given"] = _sampler(["dit", 0], ["pos", 0], ["neg", 0], ["lat", 0])
    prompt["given"]["inputs"].update(grid="lumina", grid_shift=4.0, grid_rho=1.5)
    prompt["old"] = _sampler(["dit", 0], ["pos", 0], ["neg", 0], ["lat", 0])
    for name in ("cfg_trunc", "renorm_cfg"):
        del prompt["old"]["inputs"][name]
    prompt["guider"] = {"class_type": "LuminaCFGGuider", "inputs": {
        "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 4.0, "guidance": "faithful",
        "extrapolation": "t2i"}}
    prompt["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}}
    prompt["ode"] = {"class_type": "LuminaODESampler", "inputs": {"solver": "euler", "rtol": 1e-3, "atol": 1e-6}}
    prompt["sigmas"] = {"class_type": "LuminaSigmas", "inputs": {"steps": 3, "shift": 4.0, "denoise": 1.0,
                                                                 "solver": "euler"}}
    prompt["custom"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["ode", 0], "sigmas": ["sigmas", 0],
        "latent_image": ["lat", 0]}}
    for key in ("given", "old"):
        _save_latent(prompt, key, [key, 0])
    _save_latent(prompt, "custom", ["custom", 0])
    entry = server.run(prompt)
    latents = _latents(server, entry)
    assert set(latents) == {"given", "old", "custom"}, sorted(latents)  # every output ran (none failed validation)
    assert torch.equal(latents["old"], latents["given"])
    # The guider without them is the Lumina Sampler's own path (the same noise for the seed, the same grid).
    given, custom = latents["given"], latents["custom"]
    assert float((custom - given).abs().max()) <= 1e-5 * float(given.abs().max())
