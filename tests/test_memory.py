"""lumina_core.release_memory: what a dropped model leaves is given back."""

from __future__ import annotations

import ctypes.util
import sys
import weakref

import pytest
import torch

from lumina_core import memory, release_memory


def test_a_dropped_model_in_a_reference_cycle_is_collected():
    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(64, 64)
            self.me = self  # a cycle: only the garbage collector frees it

    holder = Holder()
    ref = weakref.ref(holder.linear.weight)
    del holder
    release_memory()
    assert ref() is None


@pytest.mark.skipif(not sys.platform.startswith("linux") or "musl" in (ctypes.util.find_library("c") or ""),
                    reason="glibc only")
def test_the_c_heap_is_trimmed_on_glibc():
    assert memory._malloc_trim() is not None
    assert release_memory("cpu") is True


def test_without_malloc_trim_the_heap_step_is_skipped(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert release_memory() is False
