"""Lumina-Image-2.0 inside a real ComfyUI server (CPU): its example workflows with 16-channel FLUX latents, the
loaders' lists, mixed families refused with the right text encoder named, ComfyUI's own Lumina 2 MODEL against the
pack's MODEL of the same weights under the Lumina CFG Guider and Lumina ODE Sampler, and ComfyUI's MODEL patches
(RenormCFG, TorchCompileModel) on the pack's Lumina 2 MODEL.

Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`). Every workflow also runs in
`test_comfyui.py::test_workflow_runs` and in the web page (`test_frontend.py`).

ComfyUI's model detection knows Lumina 2's head counts, RoPE axes and feed-forward width only for the released
width (comfy/model_detection.py, "Lumina 2": dim 2304), so the comparison with ComfyUI's own model uses a DiT of
that width with the fewest layers detection allows (1 joint layer, the 2 + 2 refiner layers ComfyUI's NextDiT
builds; 0.45B parameters, 0.9 GB in bf16), written once for this module and deleted afterwards; its conditioning
is a saved random 2304-wide encoding rather than a 2.6B Gemma-2.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers_nodes import (  # noqa: E402
    DIT_NAME,
    FLUX_VAE_NAME,
    GEMMA2_NAME,
    GEMMA_NAME,
    GGUF_LLAMA_NAME,
    LLAMA_NAME,
    LUMINA2_ALL_IN_ONE_NAME,
    LUMINA2_DIT_NAME,
    NEXT_DIT_NAME,
    load_workflows,
    ui_to_api,
)
from tests.integration.comfy_server import (  # noqa: E402
    INPUT_IMAGE,
    check_comfyui_env,
    execution_error,
    load_latent,
    png_size,
    preset_size,
    relative_difference,
    requires_comfyui,
    run_check_script,
    small_prompt,
    start_server,
)

pytestmark = requires_comfyui

LUMINA2_WORKFLOWS = ("lumina2_1024.json", "lumina2_all_in_one_1024.json", "lumina2_ksampler.json")
FLUX_CHANNELS = 16
DIT_LOAD_LINE = re.compile(r"Loaded Lumina-Image-2\.0 Unified Next-DiT \(original layout\) from (\S+):")

# The wide DiT: ComfyUI's detection fixes the rest for dim 2304 (24/8 heads, axes 32/32/32, ffn 4 x dim).
WIDE = dict(dim=2304, n_layers=1, n_refiner_layers=2, n_heads=24, n_kv_heads=8, multiple_of=256,
            ffn_dim_multiplier=None, norm_eps=1e-5, cap_feat_dim=2304, axes_dims=(32, 32, 32),
            axes_lens=(300, 512, 512), rope_theta=10000.0, patch_size=2, in_channels=16)
WIDE_NAME = "lumina2_wide_1layer_bf16.safetensors"
WIDE_ALL_IN_ONE_NAME = "lumina2_wide_1layer_all_in_one.safetensors"
WIDE_POSITIVE, WIDE_NEGATIVE = "lumina2_wide_positive.safetensors", "lumina2_wide_negative.safetensors"
# ComfyUI's NextDiT and the pack's Unified Next-DiT are separate implementations of one network (attention kernels,
# RoPE tables, summation orders differ), both in fp32 on the CPU from the same bf16 weights. Relative difference of
# the latents measured with ComfyUI 0.33: 5.9e-7 for the setting tested here; 5.4e-7 midpoint 3 steps, 6.9e-7 dpm 4
# steps, 1.2e-6 euler 8 steps always guided without renormalisation. The two ComfyUI loaders agree exactly, as do
# the pack's loader on the split and the all-in-one file.
INTERPLAY_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_base_lumina2"))
    yield srv
    srv.stop()
    shutil.rmtree(srv.base / "output", ignore_errors=True)


def _latents(server, entry) -> dict[str, torch.Tensor]:
    return {re.sub(r"_\d+_\.latent$", "", p.name): load_latent(p) for p in server.output_files(entry, "latents")}


def _save_latent(prompt: dict, key: str, source: list, folder: str = "lumina2"):
    prompt[f"save_{key}"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": source, "filename_prefix": f"{folder}/{key}"}}


# --------------------------------------------------------------------------------------------------------------
# Loaders, VAE, workflows


def test_loaders_list_the_lumina2_files(server):
    info = server.object_info
    assert LUMINA2_DIT_NAME in info["LuminaDiTLoader"]["input"]["required"]["dit_name"][0]
    assert LUMINA2_ALL_IN_ONE_NAME in info["LuminaDiTLoader"]["input"]["required"]["dit_name"][0]
    folders = info["LuminaTextEncoderLoader"]["input"]["required"]["text_encoder_folder"][0]
    assert folders == sorted([LLAMA_NAME, GEMMA_NAME, GEMMA2_NAME, LUMINA2_ALL_IN_ONE_NAME, GGUF_LLAMA_NAME])
    # ComfyUI's own loaders see the same files where ComfyUI keeps them.
    assert FLUX_VAE_NAME in info["VAELoader"]["input"]["required"]["vae_name"][0]
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [LUMINA2_ALL_IN_ONE_NAME]
    assert LUMINA2_DIT_NAME in info["UNETLoader"]["input"]["required"]["unet_name"][0]


def test_the_flux_ae_is_a_16_channel_vae_in_comfyui(server):
    """VAELoader builds the random FLUX-shaped AE as a 16-channel VAE: an image encodes to 16 x h/8 x w/8."""
    prompt = {
        "img": {"class_type": "LoadImage", "inputs": {"image": INPUT_IMAGE}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": FLUX_VAE_NAME}},
        "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["vae", 0]}},
    }
    _save_latent(prompt, "ae", ["enc", 0])
    latent = _latents(server, server.run(prompt))["ae"]
    assert latent.shape == (1, FLUX_CHANNELS, 80 // 8, 96 // 8)  # INPUT_IMAGE is 96x80
    assert torch.isfinite(latent).all() and latent.std() > 0


def _sampler_node(prompt: dict) -> str:
    return next(k for k, n in prompt.items() if n["class_type"] in ("LuminaSampler", "KSampler"))


@pytest.mark.parametrize("name", LUMINA2_WORKFLOWS)
def test_lumina2_workflow_gives_16_channel_latents_and_images(server, name):
    from PIL import Image

    prompt = ui_to_api(load_workflows()[name], server.object_info)
    width, height = preset_size(prompt)
    small_prompt(prompt, width, height)
    _save_latent(prompt, Path(name).stem, [_sampler_node(prompt), 0])
    entry = server.run(prompt)
    latent = _latents(server, entry)[Path(name).stem]
    assert latent.shape == (1, FLUX_CHANNELS, height // 8, width // 8)
    assert torch.isfinite(latent).all() and latent.std() > 0
    (image,) = server.output_files(entry, "images")
    assert png_size(image) == (width, height)
    pixels = torch.frombuffer(bytearray(Image.open(image).convert("RGB").tobytes()), dtype=torch.uint8).float()
    assert pixels.std() > 1.0  # not one flat colour
    # The DiT came from the file the workflow names (ComfyUI's split file, or its all-in-one file).
    (dit_name,) = {n["inputs"]["dit_name"] for n in prompt.values() if n["class_type"] == "LuminaDiTLoader"}
    loaded = {Path(path).name for path in DIT_LOAD_LINE.findall(server.log_text())}
    assert dit_name in loaded, server.log_tail()


def _text_prompt(dit: str, text_encoder: str, sampler: str) -> dict:
    prompt = {
        "te": {"class_type": "LuminaTextEncoderLoader", "inputs": {"text_encoder_folder": text_encoder, "dtype": "fp32"}},
        "dit": {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": dit, "weight_dtype": "fp32"}},
        "pos": {"class_type": "LuminaTextEncode", "inputs": {
            "text_encoder": ["te", 0], "text": "a red fox in the snow", "system_prompt": "superior",
            "custom_system_prompt": ""}},
        "neg": {"class_type": "LuminaTextEncode", "inputs": {
            "text_encoder": ["te", 0], "text": "", "system_prompt": "superior", "custom_system_prompt": ""}},
        "lat": {"class_type": "LuminaEmptyLatent",
                "inputs": {"resolution": "custom", "width": 64, "height": 48, "batch_size": 1}},
    }
    if sampler == "LuminaSampler":
        prompt["s"] = {"class_type": "LuminaSampler", "inputs": {
            "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": 1, "steps": 1, "cfg": 4.0, "solver": "euler", "shift": 6.0, "denoise": 1.0,
            "extrapolation": "off", "guidance": "faithful", "cfg_trunc": -1.0, "renorm_cfg": -1.0}}
    else:
        prompt["s"] = {"class_type": "KSampler", "inputs": {
            "model": ["dit", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
            "seed": 1, "steps": 1, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    _save_latent(prompt, "mixed", ["s", 0])
    return prompt


@pytest.mark.parametrize("sampler", ["LuminaSampler", "KSampler"])
@pytest.mark.parametrize(
    "dit, text_encoder, needed",
    [(LUMINA2_DIT_NAME, GEMMA_NAME, "Gemma-2-2B"),
     (LUMINA2_DIT_NAME, LLAMA_NAME, "Gemma-2-2B"),
     (NEXT_DIT_NAME, GEMMA2_NAME, "Gemma-2B"),
     (DIT_NAME, LUMINA2_ALL_IN_ONE_NAME, "LLaMA-2-7B")],
    ids=["gemma_into_lumina2", "llama_into_lumina2", "gemma2_into_next_dit", "gemma2_into_flag_dit"],
)
def test_mixed_families_are_refused_naming_the_text_encoder(server, dit, text_encoder, needed, sampler):
    entry = server.wait(server.queue(_text_prompt(dit, text_encoder, sampler)))
    message = execution_error(entry)
    assert f"which needs {needed} features" in message, message
    assert "Lumina Load Text Encoder" in message, message


# --------------------------------------------------------------------------------------------------------------
# ComfyUI's own Lumina 2 MODEL against the pack's


@pytest.fixture(scope="module")
def wide_models(server):
    """The 2304-wide one-layer DiT as ComfyUI's split file (models/diffusion_models) and as an all-in-one file with
    the FLUX AE (models/checkpoints), and two saved random 2304-wide Lumina-Image-2.0 encodings (input/); removed
    after the module."""
    from safetensors.torch import load_file, save_file

    from lumina_core import save_conditioning
    from tests.reference_lumina2 import random_state_dict

    models = server.base / "models"
    dit = {k: v.to(torch.bfloat16).contiguous() for k, v in random_state_dict(WIDE, seed=3).items()}
    parameters = sum(v.numel() for v in dit.values())
    split, all_in_one = models / "diffusion_models" / WIDE_NAME, models / "checkpoints" / WIDE_ALL_IN_ONE_NAME
    save_file(dit, str(split))
    tensors = {f"model.diffusion_model.{k}": v for k, v in dit.items()}
    tensors.update({f"vae.{k}": v for k, v in load_file(str(models / "vae" / FLUX_VAE_NAME)).items()})
    del dit
    save_file(tensors, str(all_in_one))
    del tensors
    g = torch.Generator().manual_seed(4)
    files = []
    for name, tokens in ((WIDE_POSITIVE, 9), (WIDE_NEGATIVE, 3)):
        path = server.base / "input" / name
        save_conditioning(path, torch.randn(1, tokens, WIDE["cap_feat_dim"], generator=g),
                          torch.ones(1, tokens, dtype=torch.bool), family="lumina2", prompt="random")
        files.append(path)
    yield {"parameters": parameters}
    for path in (split, all_in_one, *files):
        path.unlink(missing_ok=True)


def _wide_prompt(steps=4, cfg_trunc=0.25, renorm_cfg=1.0, solver="euler") -> dict:
    """Every MODEL of the wide weights through the same Lumina CFG Guider + Lumina ODE Sampler + Lumina Sigmas."""
    prompt = {
        "comfy_unet": {"class_type": "UNETLoader", "inputs": {"unet_name": WIDE_NAME, "weight_dtype": "default"}},
        "comfy_ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": WIDE_ALL_IN_ONE_NAME}},
        "pack": {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": WIDE_NAME, "weight_dtype": "fp32"}},
        "pack_aio": {"class_type": "LuminaDiTLoader",
                     "inputs": {"dit_name": WIDE_ALL_IN_ONE_NAME, "weight_dtype": "fp32"}},
        "pos": {"class_type": "LuminaLoadConditioning", "inputs": {"conditioning_file": WIDE_POSITIVE}},
        "neg": {"class_type": "LuminaLoadConditioning", "inputs": {"conditioning_file": WIDE_NEGATIVE}},
        "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 48, "batch_size": 1}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}},
        "sampler": {"class_type": "LuminaODESampler", "inputs": {"solver": solver, "rtol": 1e-3, "atol": 1e-6}},
        "sigmas": {"class_type": "LuminaSigmas",
                   "inputs": {"steps": steps, "shift": 6.0, "denoise": 1.0, "solver": solver}},
    }
    for key in ("comfy_unet", "comfy_ckpt", "pack", "pack_aio"):
        prompt[f"guider_{key}"] = {"class_type": "LuminaCFGGuider", "inputs": {
            "model": [key, 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 4.0, "guidance": "all",
            "extrapolation": "off", "cfg_trunc": cfg_trunc, "renorm_cfg": renorm_cfg}}
        prompt[f"sample_{key}"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": [f"guider_{key}", 0], "sampler": ["sampler", 0],
            "sigmas": ["sigmas", 0], "latent_image": ["lat", 0]}}
        _save_latent(prompt, key, [f"sample_{key}", 0], folder="wide")
    return prompt


def test_comfyuis_own_lumina2_model_gives_the_packs_latents(server, wide_models):
    """UNETLoader and CheckpointLoaderSimple (ComfyUI's Lumina 2 MODEL) and Lumina Load DiT (the pack's) of the same
    weights, under the same Lumina CFG Guider (cfg 4, CFG truncation 0.25 and renormalisation 1.0: three guided
    evaluations, one of the prompt alone), Lumina ODE Sampler (euler) and Lumina Sigmas (4 steps, shift 6)."""
    assert 0.4e9 < wide_models["parameters"] < 0.5e9
    entry = server.run(_wide_prompt(), timeout=900)
    latents = _latents(server, entry)
    pack = latents["pack"]
    assert pack.shape == (1, FLUX_CHANNELS, 6, 4)
    assert torch.isfinite(pack).all() and pack.abs().max() > 0
    differences = {key: relative_difference(latents[key], pack) for key in ("comfy_unet", "comfy_ckpt", "pack_aio")}
    print("relative difference to the pack's MODEL:", json.dumps(differences))
    assert differences["comfy_unet"] < INTERPLAY_TOLERANCE, differences
    assert differences["comfy_ckpt"] < INTERPLAY_TOLERANCE, differences
    assert torch.equal(latents["comfy_unet"], latents["comfy_ckpt"])
    assert torch.equal(latents["pack_aio"], pack)
    # cfg_trunc and renorm_cfg -1 (the family's defaults) are those same settings for every one of these MODELs,
    # ComfyUI's own included.
    defaults = _latents(server, server.run(_wide_prompt(cfg_trunc=-1.0, renorm_cfg=-1.0), timeout=900))
    for key, latent in latents.items():
        assert torch.equal(defaults[key], latent), key
    # The Lumina Sampler takes only the pack's MODEL and says what to do with ComfyUI's own (a Lumina2 model).
    refused = {
        "comfy_unet": {"class_type": "UNETLoader", "inputs": {"unet_name": WIDE_NAME, "weight_dtype": "default"}},
        "pos": {"class_type": "LuminaLoadConditioning", "inputs": {"conditioning_file": WIDE_POSITIVE}},
        "lat": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 48, "batch_size": 1}},
        "s": {"class_type": "LuminaSampler", "inputs": {
            "model": ["comfy_unet", 0], "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["lat", 0],
            "seed": 1, "steps": 1, "cfg": 4.0, "solver": "euler", "shift": 6.0, "denoise": 1.0,
            "extrapolation": "off", "guidance": "all", "cfg_trunc": -1.0, "renorm_cfg": -1.0}},
    }
    _save_latent(refused, "refused", ["s", 0])
    message = execution_error(server.wait(server.queue(refused)))
    assert "is a Lumina2 model" in message and "Lumina Load DiT" in message and "Lumina CFG Guider" in message, message


# --------------------------------------------------------------------------------------------------------------
# ComfyUI's MODEL patches on the pack's Lumina 2 MODEL

CHECKS = Path(__file__).resolve().with_name("comfy_sampling_checks.py")


def test_renorm_cfg_and_torch_compile_apply_to_the_lumina2_model(tmp_path):
    """comfy_sampling_checks.py's patches check on a tiny Unified Next-DiT: RenormCFG under KSampler and the Lumina
    Sampler, a recording cfg function, TorchCompileModel without graph breaks."""
    from tests.helpers_lumina2 import write_dit

    check_comfyui_env()
    write_dit(tmp_path / "dit", "original").rename(tmp_path / "tiny_lumina2.safetensors")
    r = run_check_script(CHECKS, "patches_lumina2", tmp_path, timeout=900)
    assert r["channels"] == FLUX_CHANNELS and r["in_channels"] == FLUX_CHANNELS
    # RenormCFG without renormalisation is plain CFG over all 16 channels: it ran and changed nothing, under
    # KSampler and under the Lumina Sampler (whose own truncation and renormalisation stay on).
    assert all(v < 1e-5 for v in r["renorm0_vs_base"].values()), r
    assert all(v > 1e-4 for v in r["renorm1_vs_base"].values()), r
    assert all(math.isfinite(v) for v in r["renorm1_vs_base"].values()), r
    # The recording cfg function (half the scale) ran at every evaluation and made cfg 4 into cfg 2.
    assert r["recording_vs_cfg2"] < 1e-6 and r["recording_vs_cfg4"] > 1e-3, r
    assert r["recording_sigmas"] == pytest.approx(r["expected_sigmas"], abs=1e-6)
    # TorchCompileModel compiled the DiT under both samplers without a graph break.
    assert all(v < 1e-4 for v in r["compiled_vs_eager"].values()), r
    assert r["unique_graphs"] >= 1 and r["frames_ok"] >= 1 and r["graph_breaks"] == {}, r
