"""torch.compile of every family's DiT as ComfyUI calls it: no graph break, the compiled output equals eager.

The path is ComfyUI's (TorchCompileModel compiles the diffusion model): the family's Comfy class, a LuminaStep made
by `make_step` outside the compiled call, then `forward(x, sigma, context=, attention_mask=, lumina_step=)`. The
step carries everything that is not tensor maths (t, the prepared text, the extrapolation with the Next-DiT's
time-aware RoPE switch decided) and its RoPE tables are computed ahead, so the forward only reads them.

Dynamo's "eager" backend (for the graph count) and "aot_eager" (for the output): what is tested is the graph, not
inductor's code generation, which would take minutes on a small CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo as dynamo

from lumina_core import families
from lumina_core.models.config import UnifiedNextDiTConfig
from lumina_core.models.next_dit import time_aware_rope_factors
from lumina_core.models.unified_next_dit import UnifiedNextDiT
from lumina_core.tiny import make_tiny_flag_dit, make_tiny_next_dit
from nodes.flow_model import EXTRAPOLATION_OPTION, comfy_dit_class, comfy_output_from_velocity, make_step
from tests.helpers_dit import random_text
from tests.reference_lumina2 import TINY, random_state_dict

# Latent 136x128 is 1088x1024 pixels: beyond the trained 1024x1024 area, where the Next-DiT scales its RoPE with
# the time-aware switch (linear before the watershed, NTK from it on). Patch 8 keeps the token count small.
BIG = (136, 128)
BIG_SCALE = math.sqrt(BIG[0] * 8 * BIG[1] * 8) / 1024
WATERSHED = families.LUMINA_NEXT.defaults.watershed


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _unified(seed=0):
    model = UnifiedNextDiT(UnifiedNextDiTConfig.tiny())
    model.load_state_dict(random_state_dict(TINY, seed), strict=True)
    return model.eval().requires_grad_(False)


def _comfy(core):
    """The family's ComfyUI class holding the core model's weights (what the loader builds inside ComfyUI)."""
    model = comfy_dit_class(families.family_of(core))(core.config, dtype=torch.float32)
    model.load_state_dict(core.state_dict(), strict=True)
    return model.eval().requires_grad_(False)


CASES = {
    # family's core model, latent size, sigma, transformer_options
    "flag_dit": (lambda: make_tiny_flag_dit(seed=1), (8, 8), 0.6, {}),
    "flag_dit_time_aware_big": (lambda: make_tiny_flag_dit(seed=1, patch_size=8), BIG, 0.9,
                                {EXTRAPOLATION_OPTION: "time_aware"}),
    "next_dit": (lambda: make_tiny_next_dit(seed=2), (8, 8), 0.6, {}),
    # t = 0.1 < watershed: linear scaling; t = 0.5 >= watershed: NTK.
    "next_dit_big_before_watershed": (lambda: make_tiny_next_dit(seed=2, patch_size=8), BIG, 0.9, {}),
    "next_dit_big_after_watershed": (lambda: make_tiny_next_dit(seed=2, patch_size=8), BIG, 0.5, {}),
    "next_dit_big_t2i": (lambda: make_tiny_next_dit(seed=2, patch_size=8), BIG, 0.9, {EXTRAPOLATION_OPTION: "t2i"}),
    "unified_next_dit": (_unified, (8, 8), 0.6, {}),
}


def _inputs(model, size, sigma):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, model.config.in_channels, *size, generator=gen)
    # The second caption is padded: the masks are part of the graph.
    context, mask = random_text(2, 6, model.config.cap_feat_dim, seed=4, lengths=[6, 3])
    return x, torch.full((2,), sigma), context, mask.long()


def _break_report(explained) -> str:
    return "; ".join(
        f"{r.reason.splitlines()[0]} at "
        + ", ".join(f"{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno}" for fr in r.user_stack[-2:])
        for r in explained.break_reasons
    )


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_compiles_in_one_graph_and_equals_eager(case):
    build, size, sigma, options = CASES[case]
    model = _comfy(build())
    x, sigma, context, mask = _inputs(model, size, sigma)
    with torch.no_grad():
        step = make_step(model, x, sigma, context, mask, options)
        tables = set(step.text.rope_cache)
        kwargs = dict(context=context, attention_mask=mask, lumina_step=step)

        explained = dynamo.explain(model)(x, sigma, **kwargs)
        assert explained.graph_break_count == 0, _break_report(explained)
        assert explained.graph_count == 1

        dynamo.reset()
        eager = model(x, sigma, **kwargs)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, sigma, **kwargs)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    # The forward found every table make_step computed and added none.
    assert set(step.text.rope_cache) == tables and tables


@pytest.mark.parametrize(
    "case, ntk, linear",
    [("next_dit_big_before_watershed", 1.0, BIG_SCALE), ("next_dit_big_after_watershed", BIG_SCALE, 1.0),
     ("next_dit_big_t2i", BIG_SCALE, 1.0)],
)
def test_next_dit_step_carries_the_decided_switch_and_equals_the_public_forward(case, ntk, linear):
    build, size, sigma, options = CASES[case]
    core = build()
    model = _comfy(core)
    x, sigma, context, mask = _inputs(model, size, sigma)
    with torch.no_grad():
        step = make_step(model, x, sigma, context, mask, options)
        extra = step.extrapolation
        assert math.isclose(extra["ntk_factor"], ntk) and math.isclose(extra["linear_factor"], linear)
        assert "scale_factor" not in extra and "scale_watershed" not in extra
        got = model(x, sigma, context=context, attention_mask=mask, lumina_step=step)
        # The public forward with the demo's keywords decides the same switch itself, reading t.
        t = 1.0 - sigma
        mode = options.get(EXTRAPOLATION_OPTION, "time_aware")
        demo = families.LUMINA_NEXT.extrapolation_kwargs(mode, *size, float(t[0]), WATERSHED)
        assert (extra["ntk_factor"], extra["linear_factor"]) == time_aware_rope_factors(
            float(t[0]), demo["scale_factor"], demo["scale_watershed"])
        want = comfy_output_from_velocity(core(x, t, context, mask.bool(), **demo))
    assert torch.equal(got, want)


def test_next_dit_forward_refuses_both_forms_of_the_rope_scaling():
    model = make_tiny_next_dit(seed=2)
    x, sigma, context, mask = _inputs(model, (8, 8), 0.5)
    with pytest.raises(ValueError, match="not both"):
        model(x, 1 - sigma, context, mask.bool(), scale_factor=2.0, scale_watershed=0.3, ntk_factor=2.0)
