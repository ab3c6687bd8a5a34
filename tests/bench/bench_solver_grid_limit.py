"""How close a solver can come to a demo's error at a fixed number of evaluations with ANY time grid (issue #24).

bench_solvers.py searches two-parameter grid families (Lumina s; power s, rho). This script frees the grid
entirely: for each solver, every interior time point is a free parameter (the steps are a softmax of free logits,
so the grid stays increasing from t = 0 to t = 1), and Nelder-Mead minimises the worst flow's error divided by the
demo's error on that flow, starting from the best power grid of a small set. The result bounds what grid tuning can
give that solver at that budget: a worst-flow ratio above 1 after the search means no grid of the search's reach
makes the solver match the demo on every flow (Nelder-Mead is a local method, so it is an estimate of the bound, not
a proof; `--starts 2` adds the Lumina grid at the demo's shift as a second start). `--global` runs scipy's
differential evolution instead (seeded, then polished), a global search over step logits in [-4, 4] that is
practical for solvers with few steps (midpoint: 5 free points at 12 evaluations, about 4 minutes).

Flows, errors and demos are bench_solvers.py's (relative RMS error against the exact solution); the search runs on
every flow but the largest latent, as bench_solvers.py's grid search does, and the grid found is then checked on every
flow. Float64 grids (the core rounds its own grids to float32; the difference is far below the ratios reported).

    python tests/bench/bench_solver_grid_limit.py [--evals 12] [--demo Lumina-Image-2.0]
        [--solvers midpoint,rk4,ab3,unipc_3,dpmpp_3m] [--maxfev 1500] [--starts 1] [--global [--generations 60]]

Needs scipy (`pip install scipy`) for Nelder-Mead. About 6-8 minutes per solver on 2 cores at 12 evaluations.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import table  # noqa: E402
from bench_solvers import BASELINES, FLOWS, MixtureFlow, grid_name, reference, relative, run, time_points  # noqa: E402

from lumina_core.sampling.solvers import EVALS_PER_STEP, solve  # noqa: E402

START_GRIDS = [("power", s, r) for s in (2.0, 4.0, 6.0, 8.0) for r in (1.0, 1.2, 1.5, 2.0)]


def free_grid(logits) -> torch.Tensor:
    """An increasing grid from exactly 0 to exactly 1 whose steps are softmax([0, *logits])."""
    z = torch.cat([torch.zeros(1, dtype=torch.float64), torch.as_tensor(logits, dtype=torch.float64)])
    t = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.softmax(z, 0), 0)])
    t[-1] = 1.0
    return t


def logits_of(grid: torch.Tensor) -> list:
    steps = torch.diff(grid.double()).clamp_min(1e-12).log()
    return (steps[1:] - steps[0]).tolist()


def ratios(flows, refs, targets, solver, grid) -> dict:
    return {f: relative(solve(flow.velocity, flow.z, grid, solver), refs[f]) / targets[f] for f, flow in flows.items()}


def search(flows, refs, targets, solver, steps, starts, maxfev, demo_grid, generations=0):
    """(worst ratio, per-flow ratios, grid) of the best grid found, and (worst ratio, name) of the best start;
    generations > 0: differential evolution for that many generations instead of Nelder-Mead."""
    from scipy.optimize import differential_evolution, minimize

    start_scores = sorted((max(ratios(flows, refs, targets, solver, time_points(solver, g, steps).double())
                               .values()), g) for g in START_GRIDS)
    first = start_scores[0]
    inits = [time_points(solver, first[1], steps).double()]
    if starts > 1:
        inits.append(time_points(solver, demo_grid, steps).double())
    best = [math.inf, None, None]

    def objective(x):
        grid = free_grid(x)
        r = ratios(flows, refs, targets, solver, grid)
        worst = max(r.values())
        if worst < best[0]:
            best[:] = [worst, r, grid]
        return math.log(worst)

    if generations:
        differential_evolution(objective, [(-4.0, 4.0)] * (steps - 1), seed=0, maxiter=generations, popsize=12,
                               tol=1e-6, polish=True)
        return best, first
    for init in inits:
        x = logits_of(init)
        for _ in range(2):  # a restart from the best point renews the simplex
            x = minimize(objective, x, method="Nelder-Mead",
                         options=dict(maxfev=maxfev // 2, xatol=1e-3, fatol=1e-4, adaptive=True)).x
    return best, first



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", type=int, default=12, help="model evaluations per image (default 12)")
    parser.add_argument("--demo", default="Lumina-Image-2.0", choices=list(BASELINES))
    parser.add_argument("--solvers", default="midpoint,rk4,ab3,unipc_3,dpmpp_3m")
    parser.add_argument("--maxfev", type=int, default=1500, help="objective evaluations per start (default 1500)")
    parser.add_argument("--starts", type=int, default=1, choices=(1, 2))
    parser.add_argument("--global", dest="global_search", action="store_true",
                        help="differential evolution instead of Nelder-Mead (for solvers with few steps)")
    parser.add_argument("--generations", type=int, default=60, help="generations of --global (default 60)")
    args = parser.parse_args()
    try:
        import scipy  # noqa: F401
    except ImportError:
        print("this benchmark needs scipy for Nelder-Mead: pip install scipy")
        return 2
    torch.set_grad_enabled(False)
    demo_solver, demo_grid, demo_steps = BASELINES[args.demo]

    started = time.perf_counter()
    flows, refs, targets = {}, {}, {}
    for spec in FLOWS:
        flow = MixtureFlow(spec)
        refs[spec.name], _ = reference(flow, 256)
        flows[spec.name] = flow
        targets[spec.name] = run(flow, refs[spec.name], demo_solver, demo_grid, demo_steps)
    searched = {f: flow for f, flow in flows.items() if math.prod(flow.spec.shape) < 200_000}
    print(f"# Any grid at {args.evals} evaluations against the {args.demo} demo ({demo_solver} {demo_steps} steps, "
          f"{grid_name(demo_grid)})\n")

    rows = []
    for solver in args.solvers.split(","):
        if solver not in EVALS_PER_STEP or solver in ("dopri5",):
            raise SystemExit(f"unknown or adaptive solver {solver!r}; choose among {', '.join(EVALS_PER_STEP)}")
        steps = args.evals // EVALS_PER_STEP[solver]
        t0 = time.perf_counter()
        (worst, per_flow, grid), (start_worst, start) = search(searched, refs, targets, solver, steps, args.starts,
                                                               args.maxfev, demo_grid,
                                                               args.generations if args.global_search else 0)
        every = ratios(flows, refs, targets, solver, grid)
        rows.append([solver, steps * EVALS_PER_STEP[solver], f"{start_worst:.2f} ({grid_name(start)})",
                     f"{worst:.2f}", f"{max(every.values()):.2f}",
                     " ".join(f"{every[f]:.2f}" for f in flows), " ".join(f"{v:.3f}" for v in grid.tolist()[1:-1])])
        print(f"  {solver}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(table(["solver", "evaluations", "best power grid: worst ratio", "any grid: worst ratio (searched flows)",
                 "same grid, every flow", "per flow (" + ", ".join(flows) + ")", "interior grid points t"], rows))
    print(f"\n(ratio = the error / the demo's error on that flow; {time.perf_counter() - started:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
