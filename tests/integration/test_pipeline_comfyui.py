"""`python -m lumina_core generate` against a real ComfyUI, for each family: the PNG's embedded graph runs in ComfyUI
and gives the same latent, and ComfyUI's own VAE decode of it gives the same picture as the pipeline's diffusers
decode.

The VAEs here are the SDXL-shaped VAE and the FLUX-shaped AE the server module writes with ComfyUI's classes in the
released key layouts and shapes (fp16), so the command reads them through the packaged configurations, as it reads
sdxl_vae.safetensors and ae.safetensors. Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`), and diffusers in
the Python running pytest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
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
    LLAMA_NAME,
    LUMINA2_DIT_NAME,
    NEXT_DIT_NAME,
    REPO,
    VAE_NAME,
)
from tests.integration.comfy_server import (  # noqa: E402
    load_latent,
    relative_difference,
    requires_comfyui,
    start_server,
)

try:
    import diffusers  # noqa: F401

    HAVE_DIFFUSERS = True
except ImportError:
    HAVE_DIFFUSERS = False

pytestmark = [
    requires_comfyui,
    pytest.mark.skipif(not HAVE_DIFFUSERS, reason='diffusers is not installed (pip install ".[pipeline]")'),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_base"))
    yield srv
    srv.stop()
    shutil.rmtree(srv.base / "output", ignore_errors=True)


# (DiT, text encoder, VAE, extra arguments, latent channels) of each family's run.
FAMILIES = {
    "lumina_t2i": (DIT_NAME, LLAMA_NAME, VAE_NAME, ["--llama-alias"], 4),
    "lumina_next": (NEXT_DIT_NAME, GEMMA_NAME, VAE_NAME, ["--extrapolation", "time_aware", "--solver", "midpoint"], 4),
    "lumina2": (LUMINA2_DIT_NAME, GEMMA2_NAME, FLUX_VAE_NAME,
                ["--system-prompt", "alignment", "--cfg-trunc", "0.5", "--renorm-cfg", "1.0"], 16),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generated_png_graph_reproduces_in_comfyui(server, tmp_path, family):
    import numpy as np
    from PIL import Image

    models = server.base / "models"
    dit, text_encoder, vae, extra, channels = FAMILIES[family]
    out = tmp_path / "generated"
    te_flag = "--llama" if "--llama-alias" in extra else "--text-encoder"  # the Lumina-T2I flag keeps working
    extra = [a for a in extra if a != "--llama-alias"]
    result = subprocess.run(
        [sys.executable, "-m", "lumina_core", "generate", "--dit", str(models / "diffusion_models" / dit),
         te_flag, str(models / "text_encoders" / text_encoder), "--vae", str(models / "vae" / vae),
         "--prompt", "a red cat sat on the mat", "--negative", "blurry", "--width", "64", "--height", "48",
         "--steps", "3", "--cfg", "4.5", "--seed", "17", "--batch", "2", "--dtype", "fp32", "--device", "cpu",
         "--save-latent", "--out", str(out), *extra],
        cwd=REPO, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as image:
        graph = json.loads(image.text["prompt"])
    # The embedded graph, as ComfyUI's SaveImage would have stored it, plus a SaveLatent to compare latents.
    sampler = next(k for k, n in graph.items() if n["class_type"] == "LuminaSampler")
    graph["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": "gen"}}
    entry = server.run(graph)

    comfy_latent = load_latent(server.output_files(entry, "latents")[0])
    ours = torch.cat([load_latent(p.with_suffix(".latent")) for p in pngs])
    assert comfy_latent.shape == ours.shape == (2, channels, 6, 8)
    assert relative_difference(ours, comfy_latent) < 1e-5

    comfy_images = sorted(server.output_files(entry, "images"))
    assert len(comfy_images) == 2
    for ours_png, comfy_png in zip(pngs, comfy_images):
        with Image.open(ours_png) as a, Image.open(comfy_png) as b:
            assert a.size == b.size == (64, 48)
            diff = np.abs(np.asarray(a.convert("RGB"), dtype=int) - np.asarray(b.convert("RGB"), dtype=int))
        # ComfyUI truncates to 8 bits where the pipeline rounds (up to one level), plus float rounding.
        assert diff.max() <= 2, f"pixel difference up to {diff.max()} levels"
