"""Sampling a Next-DiT: Lumina-Next's demo defaults and extrapolation rule, against a loop written from its demo."""

import math

import pytest
import torch

from lumina_core.families import LUMINA_NEXT, LUMINA_T2I, family_of, next_dit_extrapolation_kwargs
from lumina_core.generation import sample
from lumina_core.tiny import make_tiny_next_dit
from tests.helpers_dit import random_text


def demo_model_kwargs(w, h, extrapolating, watershed=0.3, image_size=1024):
    """What `lumina_next_t2i/demo.py` passes to forward_with_cfg for a w x h image (proportional attention on,
    time-aware scaling for the resolutions its menu marks as extrapolation)."""
    kwargs = {"proportional_attn": True, "base_seqlen": (image_size // 16) ** 2}
    if extrapolating:
        kwargs.update(scale_factor=math.sqrt(w * h / image_size**2), scale_watershed=watershed)
    return kwargs


@pytest.mark.parametrize(
    "w, h, extrapolating",
    [(1024, 1024, False), (512, 2048, False), (2048, 512, False), (1536, 1536, True), (2048, 1024, True),
     (1024, 2048, True), (2048, 2048, True), (4096, 1024, True)],
)
def test_time_aware_keywords_equal_the_demo(w, h, extrapolating):
    got = next_dit_extrapolation_kwargs("time_aware", h // 8, w // 8, 0.5, 0.3)
    want = demo_model_kwargs(w, h, extrapolating)
    assert got.keys() == want.keys() and all(math.isclose(got[k], want[k]) for k in want)


def test_other_extrapolation_modes():
    assert next_dit_extrapolation_kwargs("off", 256, 128, 0.5, 0.3) == {}
    ntk = next_dit_extrapolation_kwargs("t2i", 256, 128, 0.5, 0.3)
    assert ntk["scale_watershed"] == 0.0 and math.isclose(ntk["scale_factor"], math.sqrt(2))
    with pytest.raises(ValueError, match="unknown extrapolation"):
        next_dit_extrapolation_kwargs("bogus", 256, 128, 0.5, 0.3)


def test_family_defaults_are_the_demos():
    d = LUMINA_NEXT.defaults
    assert (d.solver, d.steps, d.cfg, d.shift, d.extrapolation, d.watershed) == ("midpoint", 29, 4.0, 4.0,
                                                                                   "time_aware", 0.3)
    t = LUMINA_T2I.defaults
    assert (t.solver, t.steps, t.cfg, t.shift, t.extrapolation) == ("euler", 29, 4.0, 4.0, "t2i")
    assert family_of(make_tiny_next_dit()) is LUMINA_NEXT


def original_procedure(model, z, cap_feats, cap_mask, *, num_steps, cfg, t_shift, w, h, extrapolating):
    """The Lumina-Next demo's sampling written out: torchdiffeq's fixed-grid midpoint over
    linspace(0, 1, num_steps) with the time shift, forward_with_cfg on [z, z] with guidance on channels 0..2."""
    kwargs = demo_model_kwargs(w, h, extrapolating)
    t = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    t = t / (t + t_shift - t_shift * t)

    def forward_with_cfg(x, tt):
        xx = torch.cat([x, x])
        out = model(xx, torch.full((2,), tt), cap_feats, cap_mask, **kwargs)
        cond, uncond = out[:1], out[1:]
        guided = uncond[:, :3] + cfg * (cond[:, :3] - uncond[:, :3])
        return torch.cat([guided, cond[:, 3:]], dim=1)

    x = z
    for i in range(num_steps - 1):
        t0, t1 = float(t[i]), float(t[i + 1])
        dt = t1 - t0
        half = forward_with_cfg(x, t0)
        x = x + dt * forward_with_cfg(x + dt / 2 * half, t0 + dt / 2)
    return x


def test_sample_with_defaults_equals_the_original_procedure():
    model = make_tiny_next_dit(seed=2)
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    feats, mask = random_text(2, 6, model.config.cap_feat_dim, seed=4, lengths=[6, 2])
    cond, uncond = (feats[:1], mask[:1]), (feats[1:, :2], mask[1:, :2])
    got = sample(model, z, cond, uncond)  # every setting from the family defaults
    want = original_procedure(model, z, feats, mask, num_steps=30, cfg=4.0, t_shift=4.0, w=96, h=64,
                              extrapolating=False)
    # The same maths in another batch layout (cond and uncond padded to one caption length, the text prepared once):
    # fp32 reductions in another order, amplified by cfg 4 and 58 evaluations. Measured up to 2.8e-5 on an AVX512
    # CPU; 1e-4 (about 1700 fp32 roundings) bounds it. Guiding all four channels instead of three moves the result
    # by O(0.1).
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


class RecordingNextDiT:
    """Stands in for a Next-DiT: records the times and keywords of every evaluation."""

    family = "lumina_next"

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cap_feats, cap_mask, **kwargs):
        self.calls.append((float(t[0]), kwargs))
        return torch.zeros_like(x)


def test_extrapolated_sample_passes_the_demo_keywords_at_every_midpoint_evaluation():
    model = RecordingNextDiT()
    noise = torch.zeros(1, 4, 128, 256)  # 2048x1024
    text = (torch.zeros(1, 3, 8), torch.ones(1, 3, dtype=torch.bool))
    sample(model, noise, text, text, steps=4)
    assert len(model.calls) == 8  # midpoint: two evaluations per step
    want = demo_model_kwargs(2048, 1024, True)
    assert all(kwargs == want for _, kwargs in model.calls)
    times = [t for t, _ in model.calls]
    grid = [i / 4 / (i / 4 + 4 - 4 * i / 4) for i in range(5)]
    expect = [v for a, b in zip(grid, grid[1:]) for v in (a, (a + b) / 2)]
    assert times == pytest.approx(expect)
