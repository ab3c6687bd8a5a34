"""Host memory of whole generations on the CPU (issue #7, item 5).

1. Peak RSS (resource.getrusage ru_maxrss of a fresh subprocess) of one generation: build the Flag-DiT with random
   weights (fp32), prepare the text once, sample 1024x1024 (latent 128x128) with a few euler steps at cfg 4 (batch
   2), for the tiny and the mid-size model (dim 1024, 8 layers, 16 heads, cap_feat_dim 4096). Shown beside the
   RSS of a process that only imports torch and lumina_core, the weights' bytes, and what is left for activations,
   also in units of s = 2 * N * dim * 4 bytes (one fp32 residual stream of the cfg batch, N tokens).
2. Leaks: 50 consecutive generations with the tiny model in one process (model built once, a new seed and new
   text each time, as in a ComfyUI session), current RSS (/proc/self/statm) after generations 1, 10 and 50.
   Must not grow: the growth from 10 to 50 is the leak signal (1 to 10 includes allocator warm-up).

    python tests/bench/bench_generation_memory.py [--quick] [--steps 2] [--loop 50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MID, TEXT_LEN, seq_len, table  # noqa: E402

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from lumina_core.models.config import FlagDiTConfig
from lumina_core.models.blocks import init_random_weights
from lumina_core.models.flag_dit import FlagDiT
from lumina_core.generation import sample
from lumina_core.sampling.schedule import make_noise

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

args = json.loads(sys.argv[2])
out = {"import_rss": rss(), "import_peak": peak()}
if args["mode"] == "baseline":
    print(json.dumps(out)); sys.exit(0)
cfg = FlagDiTConfig(**args["config"])
model = init_random_weights(FlagDiT(cfg), seed=0).eval().requires_grad_(False)
out["weights"] = sum(p.numel() * p.element_size() for p in model.parameters())
out["model_rss"] = rss()
out["model_peak"] = peak()

def generate(seed):
    g = torch.Generator().manual_seed(seed)
    n = args["text_len"]
    cond = (torch.randn(1, n, cfg.cap_feat_dim, generator=g), torch.ones(1, n, dtype=torch.bool))
    uncond = (torch.randn(1, 2, cfg.cap_feat_dim, generator=g), torch.ones(1, 2, dtype=torch.bool))
    noise = make_noise(seed, (1, 4, args["latent"], args["latent"]))
    return sample(model, noise, cond, uncond, steps=args["steps"], cfg=4.0, shift=4.0)

start = time.perf_counter()
if args["mode"] == "one":
    generate(0)
    out["seconds"] = time.perf_counter() - start
    out["peak"] = peak()
    out["end_rss"] = rss()
else:
    out["rss"] = {}
    for i in range(1, args["loop"] + 1):
        generate(i)
        if i in args["marks"]:
            out["rss"][i] = rss()
    out["seconds"] = time.perf_counter() - start
    out["peak"] = peak()
print(json.dumps(out))
"""


def run_child(spec: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(REPO), json.dumps(spec)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child failed ({spec}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def config_dict(cfg) -> dict:
    return {f: getattr(cfg, f) for f in ("dim", "n_layers", "n_heads", "multiple_of", "cap_feat_dim")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 step per generation; the loop at 512x512")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="image size of the single generations (pixels)")
    parser.add_argument("--loop", type=int, default=50)
    parser.add_argument("--skip-mid", action="store_true", help="tiny model only")
    args = parser.parse_args()
    steps = 1 if args.quick else args.steps
    latent = args.size // 8
    loop_latent = 64 if args.quick else latent

    from lumina_core.models.config import FlagDiTConfig

    tiny = FlagDiTConfig.tiny()
    gb = 1e9
    base = run_child({"mode": "baseline"})
    rows = []
    configs = [("tiny (dim 64, 2 layers)", tiny)] + ([] if args.skip_mid else [
        (f"mid (dim {MID.dim}, {MID.n_layers} layers)", MID)])
    for name, cfg in configs:
        r = run_child({"mode": "one", "config": config_dict(cfg), "latent": latent, "steps": steps,
                       "text_len": TEXT_LEN})
        act = r["peak"] - r["model_rss"]
        s = 2 * seq_len(cfg, latent, latent) * cfg.dim * 4
        rows.append([name, f"{args.size}x{args.size}, {steps} step(s), cfg 4", f"{r['weights'] / gb:.3f}",
                     f"{r['model_rss'] / gb:.2f}", f"**{r['peak'] / gb:.2f}**", f"{act / gb:.2f} ({act / s:.1f} s)",
                     f"{r['seconds']:.0f}"])
    print(f"1. Peak RSS of one generation in a fresh process (fp32, CPU); a process that only imports torch and "
          f"lumina_core: {base['import_peak'] / gb:.2f} GB peak\n")
    print(table(["model", "generation", "weights (GB)", "RSS after building the model (GB)", "peak RSS (GB)",
                 "peak - model RSS (GB; in s = 2*N*dim*4 B)", "time (s)"], rows))

    marks = sorted({1, min(10, args.loop), args.loop})
    r = run_child({"mode": "loop", "config": config_dict(tiny), "latent": loop_latent, "steps": steps,
                   "text_len": TEXT_LEN, "loop": args.loop, "marks": marks})
    rss = {int(k): v for k, v in r["rss"].items()}
    mb = 1e6
    first, mid, last = rss[marks[0]], rss[marks[1]], rss[marks[-1]]
    growth = last - mid
    print(f"\n2. {args.loop} consecutive generations, tiny model, {loop_latent * 8}x{loop_latent * 8}, "
          f"{steps} step(s), cfg 4, one process ({r['seconds']:.0f} s):\n")
    print(table(["after generation"] + [str(m) for m in marks] + [f"growth {marks[1]} -> {marks[-1]}",
                                                                  f"growth {marks[0]} -> {marks[-1]}", "peak RSS"],
                [["RSS (MB)"] + [f"{rss[m] / mb:.1f}" for m in marks]
                 + [f"**{growth / mb:+.1f} MB** ({growth / max(1, marks[-1] - marks[1]) / 1e3:+.1f} kB/generation)",
                    f"{(last - first) / mb:+.1f} MB", f"{r['peak'] / mb:.0f} MB"]]))
    ok = growth < 0.02 * last
    print(f"\nno growth (10 -> {args.loop} below 2% of the RSS): {'yes' if ok else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
