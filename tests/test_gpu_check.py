"""tests/bench/gpu_check.py: its skip line without CUDA, and its whole GPU path forced onto the CPU with a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from tests.helpers_nodes import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tests" / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the script measures instead of skipping")
def test_skips_with_one_line_without_cuda(tmp_path, capsys):
    assert _gpu_check().main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("SKIP gpu_check: no CUDA device")
    assert not (tmp_path / "gpu_check.json").exists()


def test_gpu_path_runs_on_the_cpu_with_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "out"
    assert _gpu_check().main(["--out", str(out), "--device", "cpu", "--size", "tiny", "--sizes", "64", "96",
                              "--steps", "1"]) == 0
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["size"] == "tiny" and result["device"] == "cpu"
    assert set(result["seconds_per_cfg_step"]) == {"64x64 bf16", "64x64 fp8_e4m3fn"}
    assert set(result["peak_memory_gb"]) == {"64x64 bf16", "96x96 bf16", "64x64 fp8_e4m3fn"}
    values = [*result["seconds_per_cfg_step"].values(), *result["peak_memory_gb"].values()]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert set(result["sdpa_backend"].values()) <= {"flash", "efficient", "cudnn", "math"}
    acc = result["gpu_bf16_vs_cpu_fp32"]
    # bf16 against fp32: a few bf16 ulps of the output scale, never zero (it is really bf16) nor large.
    assert 0 < acc["relative_diff"] < 0.05
    assert not (out / "weights").exists()  # the random weights are deleted
    table = capsys.readouterr().out
    assert "| s per CFG step, 64x64 fp8_e4m3fn |" in table and "SDPA backend" in table
