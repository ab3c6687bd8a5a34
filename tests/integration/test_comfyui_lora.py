"""LoRAs inside a real ComfyUI server (CPU) on tiny models: ComfyUI's own LoraLoaderModelOnly on the pack's Lumina-T2I
MODEL (original-name and kohya files), the Lumina LoRA Loader with a diffusers-format Lumina-Image-2.0 LoRA on the
pack's Lumina 2 MODEL and on ComfyUI's own, the LoRA workflow, and a LoRA of another family refused.

Truth: the latent of a checkpoint whose weights were merged with the LoRA by the test (tests/helpers_lora.py), sampled
the same way. Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lumina_core.families import load_dit  # noqa: E402
from lumina_core.weights.dit_files import save_dit  # noqa: E402
from tests.helpers_gemma2 import (  # noqa: E402
    make_tiny_gemma2_state_dict,
    tiny_gemma2_config_json,
    tiny_gemma2_spiece_model,
    write_comfy_gemma2_single_file,
)
from tests.helpers_lora import make_entries, merged, spell  # noqa: E402
from tests.helpers_nodes import DIT_NAME, LLAMA_NAME, TINY_HIDDEN, load_workflows, ui_to_api  # noqa: E402
from tests.integration.comfy_server import (  # noqa: E402
    COMFYUI_DIR,
    COMFYUI_PYTHON,
    execution_error,
    load_latent,
    png_size,
    preset_size,
    relative_difference,
    requires_comfyui,
    small_prompt,
    start_server,
)
from tests.reference_lumina2 import TINY, random_state_dict  # noqa: E402

pytestmark = requires_comfyui

STRENGTH = 0.8
WORKFLOW_LORA = "lumina2_lora.safetensors"  # the LoRA file name lumina2_lora.json uses (README)
CHECKS = Path(__file__).with_name("comfy_lora_checks.py")
# This module's own tiny Lumina-Image-2.0 files: the Unified Next-DiT in bf16 as ComfyUI's split file, and Gemma-2
# as ComfyUI's single file (heads of the released head_dim, which a file without config.json is read with).
LUMINA2_DIT = "lora_test_lumina2_bf16.safetensors"
GEMMA2 = "lora_test_gemma2.safetensors"
GEMMA2_HEADS = {"head_dim": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "query_pre_attn_scalar": 256}


def _write_lumina2(models: Path) -> None:
    dit = {k: v.to(torch.bfloat16).contiguous()
           for k, v in random_state_dict(dict(TINY, cap_feat_dim=TINY_HIDDEN), 5).items()}
    save_file(dit, str(models / "diffusion_models" / LUMINA2_DIT))
    gemma2 = make_tiny_gemma2_state_dict(tiny_gemma2_config_json(TINY_HIDDEN, **GEMMA2_HEADS), 5)
    write_comfy_gemma2_single_file(models / "text_encoders" / GEMMA2, gemma2, tiny_gemma2_spiece_model())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_base_lora"))
    (srv.base / "models" / "loras").mkdir(exist_ok=True)
    _write_lumina2(srv.base / "models")
    yield srv
    srv.stop()
    shutil.rmtree(srv.base / "output", ignore_errors=True)


def _write_lora(server, family: str, dit_name: str, fmt: str, names: list[str], seed: int = 0) -> str:
    """LoRA files `names` (in models/loras) of one random LoRA spelled in `fmt` (kohya for a second name), and the
    checkpoint `<stem>_merged.safetensors` in models/diffusion_models with it merged at STRENGTH; returns that
    checkpoint's name."""
    models = server.base / "models"
    base = load_dit(models / "diffusion_models" / dit_name, dtype=torch.float32)
    entries = make_entries(family, fmt, base, seed=seed)
    for name, spelling in zip(names, (fmt, "kohya")):
        save_file({k: v.contiguous() for k, v in spell(entries, family, spelling).items()},
                  str(models / "loras" / name))
    merged_name = Path(names[0]).stem + "_merged.safetensors"
    save_dit(merged(base, (entries, STRENGTH)), models / "diffusion_models" / merged_name)
    return merged_name


def node_input(prompt: dict, class_type: str, name: str):
    (value,) = [n["inputs"][name] for n in prompt.values() if n["class_type"] == class_type]
    return value


def _with_defaults(server, class_type: str, **inputs) -> dict:
    """A prompt node whose widget inputs not given take their defaults from /object_info."""
    info = server.object_info[class_type]["input"]
    for name, spec in {**info["required"], **info.get("optional", {})}.items():
        if name not in inputs and len(spec) > 1 and "default" in spec[1]:
            inputs[name] = spec[1]["default"]
    return {"class_type": class_type, "inputs": inputs}


def _sampled(server, prompt: dict, models: dict, sampler: dict) -> dict:
    """Add a Lumina Sampler and a SaveLatent after each MODEL in `models` (name -> node output); run; the latents."""
    for name, model in models.items():
        prompt[f"sample_{name}"] = _with_defaults(server, "LuminaSampler", model=model, positive=["pos", 0],
                                                  negative=["neg", 0], latent_image=["lat", 0], **sampler)
        prompt[f"save_{name}"] = {"class_type": "SaveLatent",
                                  "inputs": {"samples": [f"sample_{name}", 0], "filename_prefix": f"lora/{name}"}}
    entry = server.run(prompt)
    return {re.sub(r"_\d+_\.latent$", "", p.name): load_latent(p) for p in server.output_files(entry, "latents")}


def _text(server, loader: str, folder_key: str, folder: str) -> dict:
    return {
        "te": {"class_type": loader, "inputs": {folder_key: folder, "dtype": "fp32"}},
        "pos": _with_defaults(server, "LuminaTextEncode", text_encoder=["te", 0],
                              text="a photo of an astronaut riding a horse on the moon"),
        "neg": _with_defaults(server, "LuminaTextEncode", text_encoder=["te", 0], text=""),
        "lat": {"class_type": "LuminaEmptyLatent",
                "inputs": {"resolution": "custom", "width": 64, "height": 48, "batch_size": 1}},
    }


def _assert_no_lost_keys(server):
    log = server.log_text()
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]


def test_comfy_lora_loader_applies_original_name_and_kohya_loras_to_the_pack_t2i_model(server):
    merged_name = _write_lora(server, "lumina_t2i", DIT_NAME, "original",
                              ["t2i_original.safetensors", "t2i_kohya.safetensors"])
    prompt = _text(server, "LuminaLlamaLoader", "llama_folder", LLAMA_NAME)
    prompt["dit"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": DIT_NAME, "weight_dtype": "fp32"}}
    prompt["merged"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": merged_name, "weight_dtype": "fp32"}}
    for name in ("original", "kohya"):
        prompt[f"lora_{name}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["dit", 0], "lora_name": f"t2i_{name}.safetensors", "strength_model": STRENGTH}}
    latents = _sampled(server, prompt, {"original": ["lora_original", 0], "kohya": ["lora_kohya", 0],
                                        "merged": ["merged", 0], "base": ["dit", 0]},
                       {"seed": 3, "steps": 3, "cfg": 4.0, "solver": "euler"})
    truth = latents["merged"]
    assert relative_difference(latents["original"], truth) < 1e-4
    assert relative_difference(latents["kohya"], truth) < 1e-4
    assert relative_difference(latents["base"], truth) > 1e-2  # the LoRA matters: the comparison is not vacuous
    _assert_no_lost_keys(server)


def test_lumina_lora_loader_applies_a_diffusers_lumina2_lora_to_the_pack_model(server):
    merged_name = _write_lora(server, "lumina2", LUMINA2_DIT, "peft", ["l2_diffusers.safetensors"], seed=1)
    prompt = _text(server, "LuminaTextEncoderLoader", "text_encoder_folder", GEMMA2)
    prompt["dit"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": LUMINA2_DIT, "weight_dtype": "fp32"}}
    prompt["merged"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": merged_name, "weight_dtype": "fp32"}}
    prompt["lora"] = {"class_type": "LuminaLoraLoader", "inputs": {
        "model": ["dit", 0], "lora_name": "l2_diffusers.safetensors", "strength_model": STRENGTH}}
    latents = _sampled(server, prompt, {"lora": ["lora", 0], "merged": ["merged", 0], "base": ["dit", 0]},
                       {"seed": 3, "steps": 3, "cfg": 4.0, "solver": "midpoint", "shift": 6.0, "extrapolation": "off"})
    assert latents["lora"].shape[1] == 16
    assert relative_difference(latents["lora"], latents["merged"]) < 1e-4
    assert relative_difference(latents["base"], latents["merged"]) > 1e-2
    _assert_no_lost_keys(server)
    assert re.search(r"LoRA \S*l2_diffusers\.safetensors: \d+ modules patched on the Lumina-Image-2\.0",
                     server.log_text())


def test_loras_reach_a_gguf_model_through_its_dequantized_weight(server):
    """A Q8_0 Flag-DiT: ComfyUI's LoraLoaderModelOnly and the Lumina LoRA Loader patch the weights the quantized
    layers compute with (never the raw blocks), fully loaded, and give the latent of the dequantized weights with
    the LoRA merged."""
    pytest.importorskip("gguf")
    from lumina_core.weights.convert import convert_checkpoint, convert_to_gguf

    folder = server.base / "models" / "diffusion_models"
    gguf_name, dense_name = "lora_test_t2i_q8_0.gguf", "lora_test_t2i_q8_0_dense.safetensors"
    convert_to_gguf(folder / DIT_NAME, folder / gguf_name, qtype="q8_0")
    convert_checkpoint(folder / gguf_name, folder / dense_name, dtype=torch.float32)
    merged_name = _write_lora(server, "lumina_t2i", dense_name, "original", ["gguf_original.safetensors"], seed=2)
    prompt = _text(server, "LuminaLlamaLoader", "llama_folder", LLAMA_NAME)
    prompt["dit"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": gguf_name, "weight_dtype": "fp32"}}
    prompt["merged"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": merged_name, "weight_dtype": "fp32"}}
    prompt["core"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["dit", 0], "lora_name": "gguf_original.safetensors", "strength_model": STRENGTH}}
    prompt["lumina"] = {"class_type": "LuminaLoraLoader", "inputs": {
        "model": ["dit", 0], "lora_name": "gguf_original.safetensors", "strength_model": STRENGTH}}
    prompt["dense"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": dense_name, "weight_dtype": "fp32"}}
    latents = _sampled(server, prompt, {"core": ["core", 0], "lumina": ["lumina", 0], "merged": ["merged", 0],
                                        "base": ["dit", 0], "dense": ["dense", 0]},
                       {"seed": 3, "steps": 3, "cfg": 4.0, "solver": "euler"})
    truth = latents["merged"]
    assert torch.equal(latents["base"], latents["dense"])  # the GGUF model computes with exactly its dequantized weights
    assert relative_difference(latents["core"], truth) < 1e-4
    assert relative_difference(latents["lumina"], truth) < 1e-4
    assert relative_difference(latents["base"], truth) > 1e-2
    _assert_no_lost_keys(server)


def test_lumina_lora_loader_on_comfyuis_own_lumina2_model(server, tmp_path):
    models = server.base / "models"
    merged_name = _write_lora(server, "lumina2", LUMINA2_DIT, "peft", ["l2_own.safetensors"], seed=2)
    result = subprocess.run(
        [COMFYUI_PYTHON, str(CHECKS), str(models / "diffusion_models" / LUMINA2_DIT),
         str(models / "loras" / "l2_own.safetensors"), str(models / "diffusion_models" / merged_name),
         "l2_own.safetensors"],
        cwd=COMFYUI_DIR, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    checks = json.loads(result.stdout.strip().splitlines()[-1])
    assert checks["type"] == "Lumina2" and not checks["same_object"]
    assert checks["weight_err"] < 1e-5 and checks["half_err"] < 1e-5
    # every LoRA module landed: qkv (three row blocks), the output projection, the FFN, adaLN, final layer, embedders
    assert "layers.0.attention.qkv.weight" in checks["changed"] and "x_embedder.weight" in checks["changed"]
    assert checks["base_restored"]
    assert checks["forward_rel"] < 1e-5 and checks["lora_effect"] > 1e-2
    assert checks["not_loaded"] == [] and checks["lumina_messages"]


def test_the_lora_workflow_runs(server):
    prompt = ui_to_api(load_workflows()["lumina2_lora.json"], server.object_info)
    models = server.base / "models"
    needed = {(models / folder / node["inputs"][key]) for node in prompt.values()
              for (kind, key), folder in {("LuminaDiTLoader", "dit_name"): "diffusion_models",
                                          ("LuminaTextEncoderLoader", "text_encoder_folder"): "text_encoders",
                                          ("VAELoader", "vae_name"): "vae"}.items() if node["class_type"] == kind}
    missing = sorted(p.name for p in needed if not p.exists())
    if missing:
        pytest.skip(f"the test server's models tree has no {', '.join(missing)} (the README's Lumina-Image-2.0 files)")
    _write_lora(server, "lumina2", node_input(prompt, "LuminaDiTLoader", "dit_name"), "peft", [WORKFLOW_LORA], seed=3)
    assert [n["inputs"]["lora_name"] for n in prompt.values() if n["class_type"] == "LuminaLoraLoader"] == \
        [WORKFLOW_LORA]
    width, height = preset_size(prompt)
    entry = server.run(small_prompt(prompt, width, height))
    (image,) = server.output_files(entry, "images")
    assert png_size(image) == (width, height)
    _assert_no_lost_keys(server)


def test_a_lora_of_another_family_is_refused_naming_it(server):
    _write_lora(server, "lumina2", LUMINA2_DIT, "peft", ["l2_wrong.safetensors"], seed=4)
    prompt = _text(server, "LuminaLlamaLoader", "llama_folder", LLAMA_NAME)
    prompt["dit"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": DIT_NAME, "weight_dtype": "fp32"}}
    prompt["lora"] = {"class_type": "LuminaLoraLoader", "inputs": {
        "model": ["dit", 0], "lora_name": "l2_wrong.safetensors", "strength_model": 1.0}}
    prompt["sample"] = _with_defaults(server, "LuminaSampler", model=["lora", 0], positive=["pos", 0],
                                      negative=["neg", 0], latent_image=["lat", 0], steps=1)
    prompt["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "wrong"}}
    message = execution_error(server.wait(server.queue(prompt)))
    assert "is a LoRA for Lumina-Image-2.0 (Unified Next-DiT), but the model is Lumina-T2I" in message, message
