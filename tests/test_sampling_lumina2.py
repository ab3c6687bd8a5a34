"""Lumina-Image-2.0's sampling options (SPEC.md §9): CFG truncation, CFG renormalisation and the flow DPM-Solver++
"dpm", checked against an independent re-implementation of the original loop (tests/reference_lumina2_sampling.py),
its evaluation counts, and analytic flows."""

from __future__ import annotations

import math

import pytest
import torch

from lumina_core.sampling.guidance import guided_at, renorm, renorm_factor
from lumina_core.sampling.loop import SamplingDefaults, sample
from lumina_core.sampling.schedule import dpm_time_grid, sampling_grid, time_grid
from lumina_core.sampling.solvers import EVALS_PER_STEP, solve
from tests import reference_lumina2_sampling as ref
from tests.test_sampling import MU, S, gaussian_velocity, shifted_grid64

C, D, B = 16, 8, 2  # latent channels, text feature size, batch
SHIFT = 6.0
STEPS = 10
# The Lumina-Image-2.0 entry of the registry: its demo's settings.
LUMINA2 = SamplingDefaults(solver="midpoint", steps=17, cfg=4.0, shift=6.0, extrapolation="off", guidance="all",
                           cfg_trunc=0.25, renorm_cfg=1.0)
NEUTRAL = SamplingDefaults(solver="euler", steps=STEPS, cfg=4.0, shift=SHIFT, extrapolation="off", guidance="all")


def original_count(solver: str, steps: int) -> int:
    """The original's step count for this package's `steps`: grid points for the ODE solvers, intervals for dpm."""
    return steps if solver == "dpm" else steps + 1


class LinearVelocity:
    """A velocity model(x, t, feats, mask): a fixed random channel map of x scaled by t plus a term from the masked
    mean of the text features, so cond and uncond differ. Records each call's t and, per row, which text it got."""

    def __init__(self, texts: dict, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(C, C, generator=g) / math.sqrt(C)
        self.p = torch.randn(D, C, generator=g)
        self.pooled = {k: self._pool(*v) for k, v in texts.items()}
        self.calls = []  # (t, [branch of each row])

    @staticmethod
    def _pool(feats, mask):
        m = mask.to(feats.dtype)[..., None]
        return (feats * m).sum(1) / m.sum(1)

    def __call__(self, x, t, feats, mask):
        pooled = self._pool(feats, mask)
        rows = [next(k for k, p in self.pooled.items() if torch.allclose(row, p[0], atol=1e-6)) for row in pooled]
        self.calls.append((float(t[0]), rows))
        tt = t.view(-1, 1, 1, 1)
        return torch.einsum("oc,bchw->bohw", self.a, x) * (1 - 0.5 * tt) + (pooled @ self.p)[:, :, None, None] * (1 + tt)

    def counts(self) -> dict:
        """Evaluations per branch (a guided evaluation has B cond rows and B uncond rows)."""
        rows = [r for _, rs in self.calls for r in rs]
        return {k: rows.count(k) // B for k in ("cond", "uncond")}


@pytest.fixture(scope="module")
def texts():
    g = torch.Generator().manual_seed(1)
    cond = (torch.randn(1, 5, D, generator=g), torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool))
    uncond = (torch.randn(1, 3, D, generator=g), torch.ones(1, 3, dtype=torch.bool))
    return {"cond": cond, "uncond": uncond}


@pytest.fixture(scope="module")
def z():
    return torch.randn(B, C, 4, 6, generator=torch.Generator().manual_seed(2))


def reference_velocity(model, texts):
    """The reference's velocity(x, t, which) over the same model, the text of `which` for every row."""
    expanded = {k: (f.expand(B, -1, -1), m.expand(B, -1)) for k, (f, m) in texts.items()}
    return lambda x, t, which: model(x, t, *expanded[which])


def run_ours(texts, z, solver, steps=STEPS, **settings):
    model = LinearVelocity(texts)
    out = sample(model, z, texts["cond"], texts["uncond"], steps=steps, solver=solver, shift=SHIFT, cfg=4.0,
                 defaults=NEUTRAL, **settings)
    return out, model


def run_reference(texts, z, solver, steps=STEPS, cfg_trunc=100.0, renorm_cfg=0.0):
    model = LinearVelocity(texts)
    counter = ref.CountingVelocity(reference_velocity(model, texts))
    out = ref.sample_original(counter, z, solver, original_count(solver, steps), SHIFT, 4.0, cfg_trunc, renorm_cfg)
    return out, counter


def guided_norm_ratios(texts, z, solver, cfg_trunc, steps=STEPS):
    """|u + 4 (c - u)| / |c| per sample at every guided evaluation of the original loop (renormalisation off)."""
    velocity = reference_velocity(LinearVelocity(texts), texts)
    ratios, last_cond = [], {}

    def recording(x, t, which):
        v = velocity(x, t, which)
        if which == "cond":
            last_cond["v"] = v
        else:
            c = last_cond["v"]
            g = v + 4.0 * (c - v)
            ratios.extend((g.flatten(1).norm(dim=1) / c.flatten(1).norm(dim=1)).tolist())
        return v

    ref.sample_original(recording, z, solver, original_count(solver, steps), SHIFT, 4.0, cfg_trunc, 0.0)
    return ratios


def assert_matches(ours, theirs):
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# The loop against the original


@pytest.mark.parametrize("solver", ["euler", "midpoint", "dpm"])
@pytest.mark.parametrize("cfg_trunc, renorm_cfg", [(0.25, 1.0), (0.25, 0.0), (0.6, 1.0), (1.0, 0.0)])
def test_loop_matches_the_original_with_its_evaluation_counts(texts, z, solver, cfg_trunc, renorm_cfg):
    ours, model = run_ours(texts, z, solver, cfg_trunc=cfg_trunc, renorm_cfg=renorm_cfg)
    ref_trunc = 100.0 if cfg_trunc >= 1 else cfg_trunc  # the original's "always"
    theirs, counter = run_reference(texts, z, solver, cfg_trunc=ref_trunc, renorm_cfg=renorm_cfg)
    assert_matches(ours, theirs)
    assert model.counts() == counter.counts == ref.count_evaluations(solver, original_count(solver, STEPS), SHIFT,
                                                                      ref_trunc)
    # Evaluated at the original's times, branch by branch.
    for branch in ("cond", "uncond"):
        times = [t for t, rows in model.calls if branch in rows]
        assert times == pytest.approx(counter.times[branch], abs=1e-6)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "dpm"])
def test_renorm_clamp_fires_on_some_steps_and_not_others(texts, z, solver):
    ratios = guided_norm_ratios(texts, z, solver, cfg_trunc=0.6)
    limit = sorted(ratios)[len(ratios) // 2]  # between the smallest and the largest ratio: fires about half the time
    fired = [r >= limit for r in ratios]
    assert any(fired) and not all(fired), ratios
    ours, _ = run_ours(texts, z, solver, cfg_trunc=0.6, renorm_cfg=limit)
    theirs, _ = run_reference(texts, z, solver, cfg_trunc=0.6, renorm_cfg=limit)
    assert_matches(ours, theirs)
    unclamped, _ = run_ours(texts, z, solver, cfg_trunc=0.6, renorm_cfg=0.0)
    assert float((ours - unclamped).abs().max()) > 1e-2  # the clamp changed the result
    # A limit above every ratio never fires: the same as renormalisation off.
    never, _ = run_ours(texts, z, solver, cfg_trunc=0.6, renorm_cfg=max(ratios) * 1.01)
    assert torch.equal(never, unclamped)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "dpm"])
def test_cfg_trunc_skips_exactly_the_uncond_evaluations_from_it_on(texts, z, solver):
    _, full = run_ours(texts, z, solver, cfg_trunc=1.0)
    _, cut = run_ours(texts, z, solver, cfg_trunc=0.25)
    late = sum(1 for t, _ in cut.calls if t >= 0.25)
    assert 0 < late < len(cut.calls)
    assert cut.counts()["cond"] == full.counts()["cond"] == len(full.calls)
    assert full.counts()["uncond"] - cut.counts()["uncond"] == late
    for t, rows in cut.calls:  # really skipped: a batch of B rows, all conditional, once t reaches cfg_trunc
        assert rows == (["cond"] * B if t >= 0.25 else ["cond"] * B + ["uncond"] * B), t


@pytest.mark.parametrize("solver", ["euler", "midpoint", "dpm"])
def test_neutral_settings_are_plain_guidance(texts, z, solver):
    plain, _ = run_ours(texts, z, solver)  # NEUTRAL: cfg_trunc 1, renorm_cfg 0 by default
    explicit, _ = run_ours(texts, z, solver, cfg_trunc=1.0, renorm_cfg=0.0)
    above, _ = run_ours(texts, z, solver, cfg_trunc=5.0, renorm_cfg=0.0)
    assert torch.equal(plain, explicit) and torch.equal(plain, above)
    theirs, _ = run_reference(texts, z, solver, cfg_trunc=100.0, renorm_cfg=0.0)
    assert_matches(plain, theirs)
    lumina2, _ = run_ours(texts, z, solver, cfg_trunc=0.25, renorm_cfg=1.0)
    assert float((lumina2 - plain).abs().max()) > 1e-2


def test_family_defaults_fill_in_the_truncation_and_renormalisation(texts, z):
    model = LinearVelocity(texts)
    out = sample(model, z, texts["cond"], texts["uncond"], steps=6, defaults=LUMINA2)
    explicit = sample(LinearVelocity(texts), z, texts["cond"], texts["uncond"], steps=6, defaults=NEUTRAL,
                      solver="midpoint", shift=6.0, cfg_trunc=0.25, renorm_cfg=1.0)
    assert torch.equal(out, explicit)
    assert model.counts() == ref.count_evaluations("midpoint", 7, 6.0, 0.25)


def test_cfg_one_with_truncation_and_renorm_evaluates_the_prompt_only(texts, z):
    """At cfg 1 the original's guided velocity is the conditional one: renorm_cfg 1 leaves it unchanged."""
    model = LinearVelocity(texts)
    out = sample(model, z, texts["cond"], None, steps=5, cfg=1.0, shift=SHIFT, solver="euler", defaults=NEUTRAL,
                 cfg_trunc=0.25, renorm_cfg=1.0)
    plain = sample(LinearVelocity(texts), z, texts["cond"], None, steps=5, cfg=1.0, shift=SHIFT, solver="euler",
                   defaults=NEUTRAL)
    assert torch.equal(out, plain)
    assert model.counts() == {"cond": 5, "uncond": 0}


class PreparedModel:
    """A model with prepare_text/forward_with_text that counts its text preparations and their rows."""

    def __init__(self, texts):
        self.inner = LinearVelocity(texts)
        self.prepared = []

    def prepare_text(self, feats, mask):
        self.prepared.append(feats.shape[0])
        return feats, mask

    def forward_with_text(self, x, t, text):
        return self.inner(x, t, *text)


@pytest.mark.parametrize("cfg_trunc, prepared", [(1.0, [2 * B]), (0.25, [2 * B, B]), (0.0, [B])])
def test_text_is_prepared_once_per_kind_when_first_needed(texts, z, cfg_trunc, prepared):
    model = PreparedModel(texts)
    out = sample(model, z, texts["cond"], texts["uncond"], steps=6, solver="midpoint", shift=SHIFT, defaults=NEUTRAL,
                 cfg_trunc=cfg_trunc)
    assert model.prepared == prepared
    plain = sample(LinearVelocity(texts), z, texts["cond"], texts["uncond"], steps=6, solver="midpoint", shift=SHIFT,
                   defaults=NEUTRAL, cfg_trunc=cfg_trunc)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)


def test_invalid_settings_are_refused(texts, z):
    kw = dict(steps=4, defaults=NEUTRAL)
    with pytest.raises(ValueError, match="cfg_trunc"):
        sample(LinearVelocity(texts), z, texts["cond"], texts["uncond"], cfg_trunc=-0.5, **kw)
    with pytest.raises(ValueError, match="renorm_cfg"):
        sample(LinearVelocity(texts), z, texts["cond"], texts["uncond"], renorm_cfg=-1.0, **kw)
    with pytest.raises(ValueError, match="steps >= 2"):
        sample(LinearVelocity(texts), z, texts["cond"], texts["uncond"], steps=1, solver="dpm", defaults=NEUTRAL)


# --------------------------------------------------------------------------------------------------------------
# Guidance maths


def test_guided_at_tests_the_evaluation_time_strictly():
    assert guided_at(0.2499, 0.25) and not guided_at(0.25, 0.25) and not guided_at(0.9, 0.25)
    assert not guided_at(0.0, 0.0)  # cfg_trunc 0: never guided
    assert guided_at(1.0, 1.0) and guided_at(1.0, 100.0)  # 1 or more: always, t = 1 included


def test_renorm_is_a_clamp_of_the_norm_per_sample():
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(3, C, 2, 2, generator=g)
    guided = torch.stack([cond[0] * 3.0, cond[1] * 0.5, torch.zeros_like(cond[2])])
    out = renorm(guided, cond, 1.5)
    torch.testing.assert_close(out[0], cond[0] * 1.5)  # clamped to 1.5 |c|
    assert torch.equal(out[1], guided[1]) and torch.equal(out[2], guided[2])  # below the limit; a zero stays zero
    assert renorm_factor(guided, cond, 1.5).shape == (3, 1, 1, 1)
    assert renorm(guided, cond, 0.0) is guided


# --------------------------------------------------------------------------------------------------------------
# The dpm solver and its grid


def test_dpm_grid_is_the_originals():
    for steps in (2, 4, 17):
        grid = dpm_time_grid(steps, SHIFT)
        assert grid.dtype == torch.float32 and len(grid) == steps + 1
        assert torch.equal(grid, 1.0 - ref.dpm_sigma_grid(steps, SHIFT))
        assert float(grid[-1]) == 1.0 and bool((grid[1:] > grid[:-1]).all())
    assert torch.equal(sampling_grid("dpm", 8, SHIFT), dpm_time_grid(8, SHIFT))
    assert torch.equal(sampling_grid("midpoint", 8, SHIFT), time_grid(8, SHIFT))
    assert EVALS_PER_STEP["dpm"] == 1
    with pytest.raises(ValueError, match="steps >= 2"):
        dpm_time_grid(1, SHIFT)


def test_dpm_denoise_cuts_its_grid_like_the_others(texts, z):
    full = dpm_time_grid(10, SHIFT)
    cut = dpm_time_grid(10, SHIFT, denoise=0.5)
    assert torch.equal(cut, full[int(11 * 0.5):]) and torch.equal(dpm_time_grid(10, SHIFT, 0.0), full[-1:])
    latent = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    model = LinearVelocity(texts)
    out = sample(model, z, texts["cond"], texts["uncond"], steps=10, solver="dpm", denoise=0.5, init_latent=latent,
                 shift=SHIFT, defaults=NEUTRAL)
    assert len(model.calls) == len(cut) - 1
    t0 = float(cut[0])
    start = z * (1 - t0) + latent * t0
    assert model.calls[0][0] == pytest.approx(t0)
    velocity = reference_velocity(LinearVelocity(texts), texts)

    def guided(x, t):
        tb = torch.full((B,), t)
        c, u = velocity(x, tb, "cond"), velocity(x, tb, "uncond")
        return u + 4.0 * (c - u)

    torch.testing.assert_close(out, solve(guided, start, cut, "dpm"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [2, 3, 17])
@pytest.mark.parametrize("shift", [1.0, 6.0])
def test_dpm_lands_on_a_point_mass(steps, shift):
    """v = (a - x) / (1 - t) carries every point along a straight line to a; its data prediction is a, and DPM-Solver++
    is exact on it at any step count (never evaluated at t = 1)."""
    g = torch.Generator().manual_seed(5)
    a, x = torch.randn(2, C, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, C, 3, 3, generator=g,
                                                                                dtype=torch.float64)
    seen = []

    def velocity(xt, t):
        seen.append(t)
        return (a - xt) / (1 - t)

    out = solve(velocity, x, dpm_time_grid(steps, shift).double(), "dpm")
    torch.testing.assert_close(out, a, rtol=0, atol=1e-10)
    assert len(seen) == steps and max(seen) < 1.0


def test_dpm_is_second_order_on_any_grid():
    """On the exact Gaussian flow over the uniform grid from t = 0 (a ComfyUI sigma schedule from 1): the error
    shrinks by more than 3 per halving (2 would be first order; the first step from pure noise is Euler's)."""
    z = torch.randn(2048, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = MU + S * z
    errors = [float((solve(gaussian_velocity, z, shifted_grid64(n, 1.0), "dpm") - target).abs().max())
              for n in (20, 40, 80, 160)]
    assert errors[0] < 0.05
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.0 < coarse / fine < 4.5, errors


def test_dpm_callback_reports_each_step():
    infos = []
    z = torch.randn(64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    solve(gaussian_velocity, z, dpm_time_grid(5, SHIFT).double(), "dpm", callback=infos.append)
    assert [i["step"] for i in infos] == list(range(5)) and [i["evals"] for i in infos] == [1, 2, 3, 4, 5]
    assert infos[-1]["t"] == 1.0 and torch.equal(infos[-1]["x"], infos[-1]["denoised"])  # last step: x = m
