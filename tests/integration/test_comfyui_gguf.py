"""GGUF DiTs inside a real ComfyUI (CPU): listed from models/diffusion_models and models/unet, built from the pack's
comfy.ops GGUF layers, and sampling as the same weights from a safetensors file do.

Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`), and the `gguf` package in that Python (the pack's
requirements.txt, which ComfyUI-Manager installs).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lumina_core.weights.convert import convert_to_gguf  # noqa: E402
from tests.helpers_lumina2 import write_dit  # noqa: E402
from tests.helpers_nodes import DIT_NAME, LLAMA_NAME  # noqa: E402
from tests.integration.comfy_server import (  # noqa: E402
    COMFYUI_PYTHON,
    load_latent,
    relative_difference,
    requires_comfyui,
    start_server,
)

pytestmark = requires_comfyui

T2I_GGUF = "lumina_t2i-q4_0.gguf"  # in models/unet
LUMINA2_GGUF = "lumina2-q8_0.gguf"  # in models/diffusion_models
HELD = "lumina_t2i-q4_0-held.safetensors"  # what the GGUF holds, dequantized by the gguf package


def _dequantized(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
            .reshape(tuple(int(d) for d in reversed(t.shape.tolist()))) for t in reader.tensors}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if COMFYUI_PYTHON and subprocess.run([COMFYUI_PYTHON, "-c", "import gguf"], capture_output=True).returncode:
        pytest.skip(f"{COMFYUI_PYTHON} has no `gguf` package: `{COMFYUI_PYTHON} -m pip install gguf` (the pack's "
                    f"requirements.txt) to run the GGUF tests in ComfyUI")
    srv = start_server(tmp_path_factory.mktemp("comfy_gguf"))
    models = srv.base / "models"
    (models / "unet").mkdir(exist_ok=True)
    convert_to_gguf(models / "diffusion_models" / DIT_NAME, models / "unet" / T2I_GGUF, qtype="q4_0")
    save_file(_dequantized(models / "unet" / T2I_GGUF), str(models / "diffusion_models" / HELD))
    lumina2 = write_dit(srv.base / "lumina2_source", "original")
    convert_to_gguf(lumina2, models / "diffusion_models" / LUMINA2_GGUF)
    yield srv
    srv.stop()
    shutil.rmtree(srv.base / "output", ignore_errors=True)


def test_dit_loader_lists_gguf_files_of_both_folders(server):
    info = server.get("/object_info/LuminaDiTLoader")["LuminaDiTLoader"]
    names = info["input"]["required"]["dit_name"][0]
    assert T2I_GGUF in names and LUMINA2_GGUF in names and DIT_NAME in names


def _sampler_defaults(server) -> dict:
    """The widget defaults of every required input of the Lumina Sampler, as this server declares them."""
    required = server.object_info["LuminaSampler"]["input"]["required"]
    return {name: spec[1]["default"] for name, spec in required.items()
            if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}


def _branch(server, prompt: dict, tag: str, dit_name: str) -> None:
    prompt[f"dit_{tag}"] = {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": dit_name, "weight_dtype": "fp32"}}
    prompt[f"s_{tag}"] = {"class_type": "LuminaSampler", "inputs": {**_sampler_defaults(server), **{
        "model": [f"dit_{tag}", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0],
        "seed": 3, "steps": 3, "cfg": 4.0, "solver": "euler", "shift": 4.0, "denoise": 1.0}}}
    prompt[f"save_{tag}"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [f"s_{tag}", 0], "filename_prefix": f"gguf/{tag}"}}


def test_gguf_model_samples_as_its_dequantized_weights_do(server):
    prompt = {
        "te": {"class_type": "LuminaLlamaLoader", "inputs": {"llama_folder": LLAMA_NAME, "dtype": "fp32"}},
        "pos": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["te", 0], "text": "a red cat"}},
        "neg": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["te", 0], "text": ""}},
        "lat": {"class_type": "LuminaEmptyLatent",
                "inputs": {"resolution": "custom", "width": 64, "height": 48, "batch_size": 1}},
    }
    _branch(server, prompt, "gguf", T2I_GGUF)
    _branch(server, prompt, "held", HELD)
    entry = server.run(prompt)
    latents = {re.sub(r"_\d+_\.latent$", "", p.name): load_latent(p) for p in server.output_files(entry, "latents")}
    assert torch.isfinite(latents["gguf"]).all() and latents["gguf"].abs().max() > 0
    assert relative_difference(latents["gguf"], latents["held"]) <= 1e-5
    log = server.log_text()
    assert "GGUF without architecture: " in log and "Q4_0 x" in log  # the load's log line names the types
