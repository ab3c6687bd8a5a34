"""A caption per region inside a real ComfyUI (CPU) on tiny models: ComfyUI's area and mask conditioning on the
Lumina-Next MODEL evaluated once per step for both CFG branches (counted) under the Lumina Sampler, the Lumina CFG
Guider, CFGGuider and KSampler, equal to the core's text by region; the two region workflows run in a server, the
2x2 grid equal to the core's reproduction of the original demo.

The checks needing ComfyUI's classes run in its python (`comfy_region_checks.py`, no server) and report JSON; the
assertions are here. Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers_nodes import GEMMA_NAME, NEXT_DIT_NAME, load_workflows, ui_to_api  # noqa: E402
from tests.integration.comfy_server import (  # noqa: E402
    load_latent,
    png_size,
    relative_difference,
    requires_comfyui,
    run_check_script,
    small_prompt,
    start_server,
)

pytestmark = requires_comfyui

CHECKS = Path(__file__).resolve().with_name("comfy_region_checks.py")
GRID = "lumina_next_compositional_2x2.json"
AREAS = "lumina_next_area_conditioning.json"
EXACT = 1e-5


def test_area_conditioning_is_one_dit_evaluation_per_step_and_the_cores_regions(tmp_path):
    r = run_check_script(CHECKS, "regions", tmp_path)
    steps, batch = r["steps"], r["batch"]
    # Euler: one evaluation per step, each of both CFG branches' images (two areas: ComfyUI would run each alone).
    for name in ("lumina_sampler", "lumina_guider", "cfg_guider", "ksampler", "mask"):
        assert r[name]["forwards"] == steps and r[name]["rows"] == steps * 2 * batch, (name, r)
    assert r["grid"]["forwards"] == steps and r["grid"]["rows"] == steps * 2 * batch, r
    # The regions' text work is done once per generation (the merged entries keep their uuid over the steps).
    for name in ("lumina_sampler", "lumina_guider", "cfg_guider", "ksampler", "mask", "grid"):
        assert r[name]["prepared"] == 1, (name, r)
    # The same sigmas and guidance as the core: the core's regions (KSampler's "simple" schedule is another grid).
    for name in ("lumina_sampler", "lumina_guider", "cfg_guider", "mask", "grid"):
        assert r[name]["vs_core"] < EXACT, (name, r)
    assert r["ksampler"]["finite"], r
    assert r["plain_vs_core"] > 0.1, r  # the regions reached the DiT
    # Without the pack's wrapper ComfyUI evaluates every area (and the negative's copies of them) on its own.
    assert r["comfy_default"]["rows"] > steps * 2 * batch, r


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("comfy_base_regions"))
    yield srv
    srv.stop()
    shutil.rmtree(srv.base / "output", ignore_errors=True)


def _run(server, name, width, height, save_latent_of):
    prompt = small_prompt(ui_to_api(load_workflows()[name], server.object_info), width, height)
    sampler = next(k for k, n in prompt.items() if n["class_type"] == save_latent_of)
    prompt["save_latent"] = {"class_type": "SaveLatent",
                             "inputs": {"samples": [sampler, 0], "filename_prefix": f"regions/{Path(name).stem}"}}
    entry = server.run(prompt)
    (image,) = server.output_files(entry, "images")
    assert png_size(image) == (width, height)
    (latent,) = [p for p in server.output_files(entry, "latents") if re.search(Path(name).stem, p.name)]
    return prompt, load_latent(latent)


def test_the_compositional_2x2_workflow_draws_the_original_grid(server):
    from lumina_core.generation import sample
    from lumina_core.image.latent import to_vae_space
    from lumina_core.models.regions import grid_regions, region_text
    from lumina_core.sampling.schedule import make_noise
    from lumina_core.text.gemma import GemmaTextEncoder
    from lumina_core.weights.dit_files import load_next_dit
    from nodes.region_grid import grid_captions

    prompt, got = _run(server, GRID, 64, 64, "LuminaSampler")
    grid = next(n["inputs"] for n in prompt.values() if n["class_type"] == "LuminaRegionGrid")
    settings = next(n["inputs"] for n in prompt.values() if n["class_type"] == "LuminaSampler")
    models = server.base / "models"
    encoder = GemmaTextEncoder.from_folder(models / "text_encoders" / GEMMA_NAME, dtype=torch.float32)
    cells = grid_captions(grid["captions"])
    assert (grid["rows"], grid["columns"], len(cells)) == (2, 2, 4)
    global_caption = encoder.encode([" ".join(cells)])
    uncond = region_text([(encoder.encode([grid["negative"]]), None)], (8, 8), pooled=global_caption)
    dit = load_next_dit(models / "diffusion_models" / NEXT_DIT_NAME, dtype=torch.float32)
    with torch.no_grad():
        want = sample(dit, make_noise(settings["seed"], (1, 4, 8, 8)), global_caption, uncond,
                      regions=grid_regions([encoder.encode([c]) for c in cells], 2, 2), steps=settings["steps"],
                      cfg=settings["cfg"], shift=settings["shift"], solver=settings["solver"],
                      extrapolation=settings["extrapolation"], guidance=settings["guidance"])
    assert relative_difference(got, to_vae_space(want)) < 1e-4


def test_the_area_conditioning_workflow_runs_in_ksampler(server):
    prompt, latent = _run(server, AREAS, 64, 64, "KSampler")
    kinds = [n["class_type"] for n in prompt.values()]
    assert kinds.count("ConditioningSetAreaPercentage") == 2 and "ConditioningCombine" in kinds
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
