"""Few-step solvers on exact flows: the error of each (solver, solver grid, steps) against the exact solution, and
for each family's demo the fewest model evaluations that match its error (issue #24, SPEC.md §12).

Flows. Data ~ a mixture of Gaussians with diagonal covariances, noise ~ N(0, I), path x_t = t*data + (1-t)*noise.
Given the component k, x_t ~ N(t mu_k, t^2 s_k^2 + (1-t)^2) per dimension and E[data - noise | x_t, k] =
mu_k + (t s_k^2 - (1-t)) / (t^2 s_k^2 + (1-t)^2) (x_t - t mu_k), so the velocity v(x, t) = E[data - noise | x_t = x]
is the posterior-weighted sum of those, in closed form. One flow is a single Gaussian, whose ODE solution is exact
too: x_1 = mu + s * z. For the mixtures the exact solution is computed by RK4 with 2N steps on a grid refined at
both ends (t = 3u^2 - 2u^3); its distance to the N-step one is printed as the reference's error (far below every
error compared). Flows: 1-D two modes, 2-D eight modes on a ring, 64-D and 1024-D mixtures, and latents shaped like
the real ones at 1024x1024 (Lumina-T2I/Next: 4x128x128 SDXL latents; Lumina-Image-2.0: 16x128x128 FLUX latents),
data of unit scale as the models' latents are. Everything in float64 on the CPU; the grids are the core's float32
grids, as the samplers use them.

Error: RMS over all samples and elements of (x_solver - x_exact), divided by the RMS of x_exact. A setting matches a
demo when its error is at most the demo's on every flow. The demos (SPEC.md §12): Lumina-T2I 29 Euler steps at shift
4 (29 evaluations), Lumina-Next 29 midpoint steps at shift 4 (58), Lumina-Image-2.0 17 midpoint steps at shift 6
(34; its CFG truncation saves uncond passes, not velocity evaluations, so it is not counted here).

Grids: "lumina" at shift 4 or 6 (`schedule.time_grid`, each solver's own; "dpm" runs on Lumina-Image-2.0's own grid)
and "power" sigma_i = shift_s((1 - i/N)^rho) (`schedule.power_time_grid`) over a few (s, rho). The grid search uses
every flow but the largest latent; the tables are computed on every flow.

Tiny DiT: the solvers on a tiny random Flag-DiT with classifier-free guidance (`lumina_core.generation.sample`),
against RK4 with 1000 steps on the shift-4 Lumina grid: the ranking off the Gaussian case.

Output: markdown tables on stdout, and (matplotlib, optional: `pip install matplotlib`) a PNG of the error against
the evaluations per solver, by default docs/few_step_solvers.png (the README shows it).

    python tests/bench/bench_solvers.py [--quick] [--plot PATH | --no-plot] [--skip-dit]

--quick: fewer flows (no 1024x1024 latents), grids and steps, about a minute; the README's figures come from the
full run (about 1.5 hours on 2 busy cores). bench_solver_grid_limit.py frees every point of the grid instead of
searching these two-parameter families.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import table  # noqa: E402

from lumina_core.sampling.schedule import sampling_grid  # noqa: E402
from lumina_core.sampling.solvers import EVALS_PER_STEP, solve  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PLOT = REPO / "docs" / "few_step_solvers.png"

# (solver, grid, steps) of each family's demo; a grid is ("lumina", shift) or ("power", s, rho).
BASELINES = {
    "Lumina-T2I": ("euler", ("lumina", 4.0), 29),
    "Lumina-Next": ("midpoint", ("lumina", 4.0), 29),
    "Lumina-Image-2.0": ("midpoint", ("lumina", 6.0), 17),
}
SOLVERS = ("euler", "midpoint", "ab2", "ab3", "dpmpp_2m", "dpmpp_3m", "unipc_2", "unipc_3")
MAX_EVALS = 16


@dataclass(frozen=True)
class FlowSpec:
    name: str
    shape: tuple  # of one sample
    modes: int
    separation: float  # std of the component means per element
    std: tuple  # (min, max) of the components' per-element stds, log-uniform
    samples: int
    seed: int
    ring: bool = False  # 2-D: the modes evenly on a circle of radius `separation`


FLOWS = (
    FlowSpec("gaussian 256-D (exact)", (256,), 1, 0.5, (0.3, 1.5), 64, 0),
    FlowSpec("2 modes, 1-D", (1,), 2, 1.0, (0.3, 0.3), 1024, 1),
    FlowSpec("8 modes on a ring, 2-D", (2,), 8, 1.5, (0.3, 0.3), 1024, 2, ring=True),
    FlowSpec("16 modes, 64-D", (64,), 16, 1.0, (0.2, 0.6), 128, 3),
    FlowSpec("8 modes, 1024-D", (1024,), 8, 0.7, (0.3, 0.8), 16, 4),
    FlowSpec("8 modes, 4x128x128 (SDXL latent)", (4, 128, 128), 8, 0.6, (0.4, 0.9), 1, 5),
    FlowSpec("8 modes, 16x128x128 (FLUX latent)", (16, 128, 128), 8, 0.6, (0.4, 0.9), 1, 6),
)
QUICK_FLOWS = FLOWS[:5]


class MixtureFlow:
    """The exact velocity of the rectified flow from N(0, I) to a Gaussian mixture with diagonal covariances."""

    def __init__(self, spec: FlowSpec):
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        dim = math.prod(spec.shape)
        k = spec.modes
        if spec.ring:
            angle = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
            self.mu = torch.stack([angle.cos(), angle.sin()], 1) * spec.separation
        else:
            self.mu = torch.randn(k, dim, generator=g, dtype=torch.float64) * spec.separation
        lo, hi = math.log(spec.std[0]), math.log(spec.std[1])
        self.s2 = torch.exp(2 * (lo + (hi - lo) * torch.rand(k, dim, generator=g, dtype=torch.float64)))
        self.log_w = torch.log_softmax(0.5 * torch.randn(k, generator=g, dtype=torch.float64), 0) if k > 1 else (
            torch.zeros(1, dtype=torch.float64))
        self.z = torch.randn(spec.samples, dim, generator=g, dtype=torch.float64)

    def velocity(self, x: torch.Tensor, t: float) -> torch.Tensor:
        var = t * t * self.s2 + (1 - t) ** 2  # [K, D]
        diff = x[:, None, :] - t * self.mu[None]  # [n, K, D]
        log_p = -0.5 * (diff * diff / var).sum(-1) - 0.5 * var.log().sum(-1) + self.log_w
        post = torch.softmax(log_p, -1)  # [n, K]
        gain = (t * self.s2 - (1 - t)) / var
        return torch.einsum("nk,nkd->nd", post, self.mu[None] + gain[None] * diff)

    def exact(self):
        """The ODE's solution at t = 1 for a single Gaussian (None for a mixture)."""
        return self.mu[0] + self.s2[0].sqrt() * self.z if self.spec.modes == 1 else None


def smooth_grid(steps: int) -> torch.Tensor:
    u = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    return u * u * (3 - 2 * u)


def reference(flow: MixtureFlow, steps: int):
    """(x_1, estimated relative error): the exact solution where known, else RK4 with 2*steps steps."""
    exact = flow.exact()
    coarse = solve(flow.velocity, flow.z, smooth_grid(steps), "rk4")
    fine = solve(flow.velocity, flow.z, smooth_grid(2 * steps), "rk4")
    best = fine if exact is None else exact
    return best, relative(coarse if exact is None else fine, best)


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def grid_name(grid) -> str:
    return f"lumina s={grid[1]:g}" if grid[0] == "lumina" else f"power s={grid[1]:g} rho={grid[2]:g}"


def time_points(solver: str, grid, steps: int) -> torch.Tensor:
    if grid[0] == "lumina":
        return sampling_grid(solver, steps, grid[1]).double()
    return sampling_grid(solver, steps, 1.0, grid="power", grid_shift=grid[1], grid_rho=grid[2]).double()


def run(flow: MixtureFlow, ref: torch.Tensor, solver: str, grid, steps: int) -> float:
    return relative(solve(flow.velocity, flow.z, time_points(solver, grid, steps), solver), ref)


def step_range(solver: str, max_evals: int):
    per = EVALS_PER_STEP[solver]
    return range(max(1, 3 // per), max_evals // per + 1)


def sweep(flows, refs, solvers, grids, max_evals, cache):
    """cache[(flow, solver, grid, steps)] = error, for every combination."""
    for f, flow in flows.items():
        start = time.perf_counter()
        for solver in solvers:
            for grid in grids:
                for steps in step_range(solver, max_evals):
                    key = (f, solver, grid, steps)
                    if key not in cache:
                        cache[key] = run(flow, refs[f], solver, grid, steps)
        print(f"  swept {f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)


def fewest(cache, flows, solver, grid, target: dict, max_evals: int):
    """(evaluations, worst error / target over the flows) of the fewest steps whose error is at most the target on
    every flow; None if no step count up to max_evals does."""
    for steps in step_range(solver, max_evals):
        ratios = [cache[(f, solver, grid, steps)] / target[f] for f in flows]
        if max(ratios) <= 1.0:
            return steps * EVALS_PER_STEP[solver], max(ratios)
    return None


def best_grid(cache, flows, solver, grids, target, max_evals):
    """The grid with the fewest evaluations matching `target` (ties: the smaller worst-case ratio), or the grid with
    the smallest worst-case ratio at max_evals when none matches."""
    found = [(r, g) for g in grids if (r := fewest(cache, flows, solver, g, target, max_evals))]
    if found:
        (evals, ratio), grid = min(found, key=lambda x: x[0])
        return grid, evals, ratio
    steps = max_evals // EVALS_PER_STEP[solver]
    grid = min(grids, key=lambda g: max(cache[(f, solver, g, steps)] / target[f] for f in flows))
    return grid, None, max(cache[(f, solver, grid, steps)] / target[f] for f in flows)


def dit_check(settings, steps_list):
    """Errors of the solvers on a tiny random Flag-DiT with CFG 4 against RK4 with 1000 steps (shift-4 grid)."""
    from lumina_core.generation import sample
    from lumina_core.tiny import make_tiny_flag_dit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and far faster on a busy machine
    model = make_tiny_flag_dit(seed=0)
    g = torch.Generator().manual_seed(1)
    cap = model.config.cap_feat_dim
    cond = (torch.randn(1, 6, cap, generator=g), torch.ones(1, 6, dtype=torch.bool))
    uncond = (torch.randn(1, 3, cap, generator=g), torch.ones(1, 3, dtype=torch.bool))
    noise = torch.randn(2, 4, 16, 16, generator=g).double()
    model = model.double()
    kw = dict(cfg=4.0, extrapolation="off")
    with torch.no_grad():
        ref = sample(model, noise, cond, uncond, steps=1000, solver="rk4", shift=4.0, **kw)
        rows = []
        for label, solver, grid in settings:
            extra = (dict(shift=grid[1]) if grid[0] == "lumina" else
                     dict(grid="power", grid_shift=grid[1], grid_rho=grid[2]))
            errors = []
            for evals in steps_list:
                steps = evals // EVALS_PER_STEP[solver]
                out = sample(model, noise, cond, uncond, steps=steps, solver=solver, **extra, **kw)
                errors.append(relative(out, ref))
            rows.append((label, errors))
    torch.set_num_threads(threads)
    return rows


def plot(path: Path, cache, flows, refs_targets, lumina_rows, power_rows):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\nmatplotlib is not installed: no plot (pip install matplotlib, then rerun for {path})")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)

    def gmean_error(solver, grid, steps):
        return math.exp(sum(math.log(cache[(f, solver, grid, steps)]) for f in flows) / len(flows))

    for ax, rows, title in ((axes[0], lumina_rows, "Lumina grid, shift 4"),
                            (axes[1], power_rows, "power grid (per solver: best for the Lumina-T2I demo)")):
        for solver, grid in rows:
            xs = [s * EVALS_PER_STEP[solver] for s in step_range(solver, MAX_EVALS)]
            ys = [gmean_error(solver, grid, s) for s in step_range(solver, MAX_EVALS)]
            label = solver if ax is axes[0] else f"{solver} ({grid_name(grid)})"
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
        for name, (error, evals) in refs_targets.items():
            ax.scatter([evals], [error], marker="*", s=120, zorder=5)
            ax.annotate(f"{name} demo", (evals, error), textcoords="offset points", xytext=(-40, 8), fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([3, 4, 6, 8, 10, 12, 16, 29, 34, 58])
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("model evaluations per image")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("relative error (geometric mean over the flows)")
    fig.suptitle("Exact Gaussian-mixture flows: error against the exact solution (tests/bench/bench_solvers.py)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"\nplot: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer flows, grids and steps (about a minute)")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"PNG path (default {DEFAULT_PLOT})")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--skip-dit", action="store_true", help="leave out the tiny-DiT check")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    specs = QUICK_FLOWS if args.quick else FLOWS
    shifts = (1.5, 2.0, 3.0) if args.quick else (1.5, 2.0, 2.5, 3.0, 4.0, 6.0)
    rhos = (1.0, 1.2, 1.5) if args.quick else (1.0, 1.2, 1.5, 2.0)
    power = [("power", s, r) for s in shifts for r in rhos]
    grids = [("lumina", 4.0), ("lumina", 6.0)] + power
    ref_steps = 128 if args.quick else 256

    started = time.perf_counter()
    flows, refs, rows = {}, {}, []
    for spec in specs:
        flow = MixtureFlow(spec)
        t0 = time.perf_counter()
        refs[spec.name], ref_error = reference(flow, ref_steps)
        flows[spec.name] = flow
        kind = "exact solution" if flow.exact() is not None else f"RK4 {2 * ref_steps} steps"
        rows.append([spec.name, spec.samples, spec.modes, kind, f"{ref_error:.1e}",
                     f"{time.perf_counter() - t0:.0f}"])
    print("# Few-step solvers on exact flows\n")
    print(table(["flow", "samples", "modes", "reference", "reference error", "s"], rows))

    cache = {}
    targets = {}
    for name, (solver, grid, steps) in BASELINES.items():
        targets[name] = {}
        for f, flow in flows.items():
            cache[(f, solver, grid, steps)] = targets[name][f] = run(flow, refs[f], solver, grid, steps)
    print("\nDemo errors (relative RMS error against the exact solution):\n")
    print(table(["flow"] + [f"{n} ({BASELINES[n][0]} {BASELINES[n][2]} x {EVALS_PER_STEP[BASELINES[n][0]]}, "
                            f"{grid_name(BASELINES[n][1])})" for n in BASELINES],
                [[f] + [f"{targets[n][f]:.2e}" for n in BASELINES] for f in flows]))

    # Grid search on every flow but the largest latent; the tables on every flow.
    search = [f for f in flows if math.prod(flows[f].spec.shape) < 200_000]
    sweep({f: flows[f] for f in search}, refs, SOLVERS, grids, MAX_EVALS, cache)
    chosen = {}
    for name in BASELINES:
        for solver in SOLVERS:
            grid, *_ = best_grid(cache, search, solver, grids, targets[name], MAX_EVALS)
            chosen[(name, solver)] = grid
    chosen_grids = sorted(set(chosen.values()) | {("lumina", 4.0), ("lumina", 6.0)})
    rest = {f: flows[f] for f in flows if f not in search}
    for f, flow in rest.items():
        for (name, solver), grid in chosen.items():
            for steps in step_range(solver, MAX_EVALS):
                cache[(f, solver, grid, steps)] = run(flow, refs[f], solver, grid, steps)
        for solver in SOLVERS:
            for grid in (("lumina", 4.0), ("lumina", 6.0)):
                for steps in step_range(solver, MAX_EVALS):
                    cache.setdefault((f, solver, grid, steps), run(flow, refs[f], solver, grid, steps))
    dpm_grid = ("lumina", 6.0)
    for f, flow in flows.items():  # Lumina-Image-2.0's own dpm, on its own grid
        for steps in range(2, MAX_EVALS + 1):
            cache.setdefault((f, "dpm", dpm_grid, steps), run(flow, refs[f], "dpm", dpm_grid, steps))

    all_flows = list(flows)
    print(f"\nFewest evaluations (up to {MAX_EVALS}) whose error is at most the demo's on every flow, per solver at "
          f"the grid where that is fewest (the search: lumina s=4, 6 and power s in {shifts}, rho in {rhos}); "
          f"in brackets the worst flow's error / the demo's:\n")
    header = ["solver"] + [f"{n} demo: {BASELINES[n][2] * EVALS_PER_STEP[BASELINES[n][0]]} evaluations"
                           for n in BASELINES]
    rows, recommended = [], {}
    for solver in SOLVERS + ("dpm",):
        row = [solver]
        for name in BASELINES:
            grid = dpm_grid if solver == "dpm" else chosen[(name, solver)]
            found = fewest(cache, all_flows, solver, grid, targets[name], MAX_EVALS)
            if found:
                row.append(f"**{found[0]}** ({grid_name(grid)}; {found[1]:.2f})")
                best = recommended.get(name)
                if best is None or found < best[0]:
                    recommended[name] = (found, solver, grid)
            else:
                steps = MAX_EVALS // EVALS_PER_STEP[solver]
                worst = max(cache[(f, solver, grid, steps)] / targets[name][f] for f in all_flows)
                row.append(f"> {MAX_EVALS} ({grid_name(grid)}; {worst:.2f} at {steps * EVALS_PER_STEP[solver]})")
        rows.append(row)
    print(table(header, rows))

    print("\nPer flow: fewest evaluations matching each demo on that flow alone (best solver and grid of the "
          "search):\n")
    rows = []
    for f in all_flows:
        row = [f]
        for name in BASELINES:
            best = None
            for solver in SOLVERS:
                for grid in chosen_grids:
                    if (f, solver, grid, step_range(solver, MAX_EVALS)[0]) not in cache:
                        continue
                    found = fewest(cache, [f], solver, grid, targets[name], MAX_EVALS)
                    if found and (best is None or found < best[0]):
                        best = (found, solver, grid)
            row.append(f"{best[0][0]} ({best[1]}, {grid_name(best[2])})" if best else f"> {MAX_EVALS}")
        rows.append(row)
    print(table(["flow"] + [f"{n} demo" for n in BASELINES], rows))

    print("\nRecommended (fewest evaluations matching the demo on every flow):\n")
    for name in BASELINES:
        if name in recommended:
            (evals, ratio), solver, grid = recommended[name]
            print(f"- {name}: {solver}, {grid_name(grid)}, {evals} evaluations (demo: "
                  f"{BASELINES[name][2] * EVALS_PER_STEP[BASELINES[name][0]]}); worst flow at {ratio:.2f} x the "
                  f"demo's error")
        else:
            print(f"- {name}: no setting of the search matches on every flow within {MAX_EVALS} evaluations")

    if not args.skip_dit:
        dit_settings = [("euler, lumina s=4", "euler", ("lumina", 4.0)),
                        ("midpoint, lumina s=4", "midpoint", ("lumina", 4.0))]
        for solver in ("ab2", "ab3", "dpmpp_2m", "dpmpp_3m", "unipc_2", "unipc_3"):
            grid = chosen[("Lumina-T2I", solver)]
            dit_settings.append((f"{solver}, {grid_name(grid)}", solver, grid))
            dit_settings.append((f"{solver}, lumina s=4", solver, ("lumina", 4.0)))
        evals = [6, 8, 10, 12, 16]
        t0 = time.perf_counter()
        dit_rows = dit_check(dit_settings, evals)
        print(f"\nTiny random Flag-DiT (CFG 4, 2 images of 16x16 latents), relative error against RK4 with 1000 "
              f"steps on the shift-4 grid ({time.perf_counter() - t0:.0f} s):\n")
        print(table(["solver, grid"] + [f"{e} evaluations" for e in evals],
                    [[label] + [f"{e:.1e}" for e in errors] for label, errors in dit_rows]))

    if not args.no_plot:
        gm = {name: (math.exp(sum(math.log(targets[name][f]) for f in all_flows) / len(all_flows)),
                     BASELINES[name][2] * EVALS_PER_STEP[BASELINES[name][0]]) for name in BASELINES}
        lumina_rows = [(s, ("lumina", 4.0)) for s in SOLVERS]
        power_rows = [(s, chosen[("Lumina-T2I", s)]) for s in SOLVERS]
        plot(args.plot, cache, all_flows, gm, lumina_rows, power_rows)
    print(f"\n({time.perf_counter() - started:.0f} s in all; errors are deterministic, the times indicative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
