"""The compute dtype of fp8 weights on the CPU: chosen by the CPU, forced by a setting, logged once."""

from __future__ import annotations

import logging

import pytest
import torch

from lumina_core import dtypes


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_the_cpu_decides_without_a_setting(monkeypatch, native, expected):
    monkeypatch.delenv(dtypes.CPU_COMPUTE_ENV, raising=False)
    monkeypatch.setattr(dtypes, "cpu_supports_bf16", lambda: native)
    assert dtypes.compute_dtype_for("cpu") == expected


@pytest.mark.parametrize("setting, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_environment_forces_either_path_on_any_cpu(monkeypatch, setting, expected):
    for native in (True, False):
        monkeypatch.setattr(dtypes, "cpu_supports_bf16", lambda native=native: native)
        monkeypatch.setenv(dtypes.CPU_COMPUTE_ENV, setting)
        assert dtypes.compute_dtype_for("cpu") == expected
    monkeypatch.setenv(dtypes.CPU_COMPUTE_ENV, "fp16")
    with pytest.raises(ValueError, match="LUMINA_CPU_COMPUTE_DTYPE='fp16'.*bf16, fp32 or auto"):
        dtypes.compute_dtype_for("cpu")


def test_the_choice_is_logged_once_with_its_reason(monkeypatch, caplog):
    monkeypatch.delenv(dtypes.CPU_COMPUTE_ENV, raising=False)
    monkeypatch.setattr(dtypes, "cpu_supports_bf16", lambda: False)
    monkeypatch.setattr(dtypes, "_logged", set())
    with caplog.at_level(logging.INFO, logger=dtypes.__name__):
        for _ in range(3):
            dtypes.compute_dtype_for("cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == dtypes.__name__]
    assert lines == ["fp8 weights compute in float32 on the CPU: this CPU has no native bf16 (no AVX512-BF16 or AMX), "
                     "where bf16 is emulated and slow"]


def test_force_overrides_and_refuses_other_dtypes():
    dtypes.force_cpu_compute_dtype(torch.float32)
    try:
        assert dtypes.compute_dtype_for("cpu") == torch.float32
    finally:
        dtypes.force_cpu_compute_dtype(None)
    with pytest.raises(ValueError, match="bfloat16 or torch.float32"):
        dtypes.force_cpu_compute_dtype(torch.float16)
