"""Sampling through ComfyUI's own machinery, in a real ComfyUI (CPU): the Lumina Sampler against the core and
against SamplerCustomAdvanced with the Lumina CFG Guider and Lumina ODE Sampler, MODEL patches (RenormCFG, a
recording cfg function, TorchCompileModel) under KSampler and the Lumina Sampler, the solvers' convergence on a
synthetic flow MODEL with a known solution, and SD3's MMDiT sampled by the Lumina ODE Sampler.

Each check runs in ComfyUI's python (`comfy_sampling_checks.py`, one process per check, no server) and reports
its measurements as JSON; the assertions are here. Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.comfy_server import (  # noqa: E402
    png_size,
    requires_comfyui,
    run_check_script,
)

pytestmark = requires_comfyui

CHECKS = Path(__file__).resolve().with_name("comfy_sampling_checks.py")
EXACT = 1e-5
# dopri5 chooses its steps from error estimates: a perturbation at the level of fp32 rounding (ComfyUI guides in
# float64 on denoised predictions, the core in fp32 on velocities; img2img starts 1 ulp apart in t) can flip one
# accept/reject decision, after which both runs meet the same tolerance along different steps.
ADAPTIVE = 1e-4


def run_check(name: str, tmp_path: Path) -> dict:
    return run_check_script(CHECKS, name, tmp_path)


def test_lumina_sampler_equals_the_core_and_sampler_custom_advanced(tmp_path):
    rows = run_check("parity", tmp_path)["rows"]
    combos = {(r["solver"], r["guidance"], r["cfg"], r["mode"]) for r in rows}
    assert len([c for c in combos if c[3] in ("txt2img", "img2img")]) == 5 * 2 * 2 * 2
    for row in rows:
        bound = ADAPTIVE if row["solver"] == "dopri5" else EXACT
        assert row["vs_core"] < bound, row
        assert row["vs_custom"] < 1e-6, row  # SamplerCustomAdvanced with the same parts: the same computation
        if "prepared" in row:
            assert row["prepared"] == 1, row  # text work once per generation
            if row["solver"] != "dopri5":
                assert row["forwards"] == row["core_forwards"], row
                # Images through the DiT: 2 per step at cfg 1 (batch 2), 4 at cfg 4 (the negative skipped at cfg 1).
                assert row["rows"] == row["core_rows"] == row["forwards"] * (2 if row["cfg"] == 1.0 else 4), row
    big = [r for r in rows if r["mode"].startswith("1040x1040")]
    assert len(big) == 2 and all(r["vs_off"] > 1e-2 for r in big)  # the extrapolation reached the DiT


def test_model_patches_apply_under_ksampler_and_the_lumina_sampler(tmp_path):
    r = run_check("patches", tmp_path)
    # RenormCFG without renormalisation is plain CFG over in_channels: it ran, read in_channels, changed nothing.
    assert all(v < EXACT for v in r["renorm0_vs_base"].values()), r
    assert all(v > 1e-4 for v in r["renorm1_vs_base"].values()), r
    # The recording cfg function (half the scale) ran at every evaluation and made cfg 4 into cfg 2.
    assert r["recording_vs_cfg2"] < 1e-6 and r["recording_vs_cfg4"] > 1e-3, r
    assert r["recording_sigmas"] == pytest.approx(r["expected_sigmas"], abs=1e-6)
    # TorchCompileModel compiled the DiT under both samplers without a graph break.
    assert all(v < 1e-4 for v in r["compiled_vs_eager"].values()), r
    assert r["unique_graphs"] >= 1 and r["frames_ok"] >= 1 and r["graph_breaks"] == {}, r


# Error ratio per halving of the step (tests/test_sampling.py), and the last grid's error bound.
ORDERS = {"euler": (1.7, 2.3), "midpoint": (3.5, 9.0), "ab2": (3.0, 6.0), "rk4": (6.0, 32.0)}


def test_lumina_ode_sampler_converges_like_the_core_on_an_exact_flow(tmp_path):
    rows = run_check("gaussian", tmp_path)
    for solver, (low, high) in ORDERS.items():
        errors = [r["comfy_error"] for r in rows[solver]]
        for r in rows[solver]:
            assert r["comfy_error"] == pytest.approx(r["core_error"], rel=0.05, abs=2e-6), (solver, rows[solver])
        for coarse, fine in zip(errors, errors[1:]):
            assert low < coarse / fine < high, (solver, errors)
    (dopri5,) = rows["dopri5"]
    assert dopri5["comfy_error"] < 1e-3 and dopri5["comfy_error"] == pytest.approx(dopri5["core_error"], abs=2e-6)


def test_lumina_ode_sampler_runs_sd3_and_saves_an_image(tmp_path):
    r = run_check("sd3", tmp_path)
    assert r["model"] == "SD3" and r["parameters"] < 2_000_000
    assert r["finite"] and r["rk4_vs_euler"] > 0
    # Lumina euler over the same sigmas and guidance is ComfyUI's euler.
    assert r["euler_vs_comfy_euler"] < EXACT, r
    path = Path(r["image"])
    assert path.is_file() and png_size(path) == (r["image_size"][1], r["image_size"][0])
