"""The few-step solvers in a real ComfyUI (CPU): the Lumina ODE Sampler runs ab3, dpmpp_2m, dpmpp_3m, unipc_2 and
unipc_3 on the power grid of Lumina Sigmas on the pack's Lumina-T2I MODEL (equal to the core, also through the Lumina
Sampler) and on a tiny SD3 MODEL (converging to a many-step solution, ahead of Euler).

Each check runs in ComfyUI's python (`comfy_solver_checks.py`, one process per check, no server) and reports its
measurements as JSON; the assertions are here. Needs COMFYUI_DIR and COMFYUI_PYTHON (see `comfy_server`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.integration.comfy_server import (  # noqa: E402
    requires_comfyui,
    run_check_script,
)

pytestmark = requires_comfyui

CHECKS = Path(__file__).resolve().with_name("comfy_solver_checks.py")
NEW_SOLVERS = ("ab3", "dpmpp_2m", "dpmpp_3m", "unipc_2", "unipc_3")
EXACT = 1e-5


def run_check(name: str, tmp_path: Path) -> dict:
    return run_check_script(CHECKS, name, tmp_path)


def test_new_solvers_on_the_lumina_t2i_model_equal_the_core(tmp_path):
    rows = run_check("lumina_t2i", tmp_path)["rows"]
    assert [r["solver"] for r in rows] == list(NEW_SOLVERS)
    for row in rows:
        assert row["finite"], row
        assert row["custom_vs_core"] < EXACT, row  # SamplerCustomAdvanced + Lumina parts = the core
        assert row["node_vs_core"] < EXACT, row  # the Lumina Sampler's ComfyUI path = the core
        assert row["power_vs_lumina_grid"] > 1e-3, row  # the grid reached the sampling


def test_new_solvers_on_a_tiny_sd3_model_converge(tmp_path):
    r = run_check("sd3", tmp_path)
    assert r["model"] == "SD3" and r["parameters"] < 2_000_000
    errors = r["errors"]
    for solver in NEW_SOLVERS:
        e6, e12 = errors[solver]["6"], errors[solver]["12"]
        assert e12 < 0.5 * e6, (solver, errors)  # converging: at least second order from 6 to 12 steps
        assert e12 < errors["euler"]["12"], (solver, errors)  # ahead of Euler at equal evaluations
