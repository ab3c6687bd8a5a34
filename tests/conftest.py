"""Test order: the fast unit tests first, then the tests that start a real ComfyUI server and a browser, so a broken
unit shows up within seconds."""

import pytest
import torch


def pytest_collection_modifyitems(session, config, items):
    def slow(item) -> int:
        path = str(item.path).replace("\\", "/")
        if "/tests/integration/test_frontend" in path:
            return 2
        return 1 if "/tests/integration/" in path else 0

    items.sort(key=slow)  # stable: the order within each group is kept


# Tolerances of computed floats, from the dtype's unit roundoff (half the spacing of numbers near 1): a result that
# passes through n roundings that do not cancel is off by at most about n * u relative. Tests that compare two
# computations whose arithmetic differs only in order (batch-dependent reductions, another kernel for the same maths)
# use a small multiple of these; exact equality is kept for stored bytes and loaded weights.
FP32_U = 2.0**-24
BF16_U = 2.0**-8


@pytest.fixture(params=["bf16", "fp32"])
def cpu_compute(request):
    """Run a test under each CPU compute dtype of fp8 weights (lumina_core.dtypes.compute_dtype_for), whatever this
    CPU supports, so both paths run on every machine. Yields the forced dtype."""
    from lumina_core import dtypes

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[request.param]
    dtypes.force_cpu_compute_dtype(dtype)
    try:
        yield dtype
    finally:
        dtypes.force_cpu_compute_dtype(None)


@pytest.fixture(autouse=True, scope="module")
def _model_folders_per_module():
    """Each test module sets the plain-Python model folders it needs (nodes.model_files); they are put back after it,
    so no module sees another's files in its lists."""
    from nodes import model_files

    saved = {kind: list(paths) for kind, paths in model_files._plain_folders.items()}
    yield
    model_files._plain_folders.clear()
    model_files._plain_folders.update(saved)
