"""torch.compile on the Flag-DiT: graph breaks, fullgraph=True, compile time and CPU speed-up (issue #7, item 4).

1. Graph breaks, with torch._dynamo.explain, of the two entry points: `model(x, t, cap_feats, cap_mask)` (what
   ComfyUI's samplers and its TorchCompileModel node call) and `model.forward_with_text(x, t, text)` (what the
   Lumina sampler calls at each step), each with the lumina_core line that causes a break.
2. `torch.compile(..., fullgraph=True)` of both: success, or the first line of the error and the lumina_core frame.
3. Speed-up of the compiled step over eager after warm-up (inductor, default mode), the compile time (the first
   call) and the largest difference to eager. The compiled step is `forward_with_text` when it compiles in one
   graph, else `forward` with its breaks allowed.
4. Whether `sample()` profits from `torch.compile(model)`: it calls forward_with_text, which an OptimizedModule
   passes through to the eager module, so only compiling the method itself reaches the sampler (shown by the number
   of graphs dynamo compiles during the call).

Compile times are cold (a fresh inductor cache directory) unless --warm-cache.

Config: dim 512, 4 layers, 8 heads, cap_feat_dim 4096 (--config mid: the step-efficiency model, dim 1024,
8 layers), fp32, batch 2, 40 text tokens (graph checks on the tiny config: the graph structure does not depend on
the width).

    python tests/bench/bench_compile.py [--quick] [--latent 32 64] [--repeats 5] [--config small|mid] [--no-sampler]
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

if "--warm-cache" not in sys.argv:
    # A cold compile: inductor's on-disk caches would otherwise make a second run's "compile time" a cache read.
    _CACHE = tempfile.mkdtemp(prefix="lumina_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, True)

import torch  # noqa: E402
import torch._dynamo as dynamo  # noqa: E402
from _common import (  # noqa: E402
    MID,
    SMALL,
    TEXT_LEN,
    add_timing_args,
    apply_timing_args,
    build_model,
    interleaved,
    median,
    random_text,
    table,
)
from torch._dynamo.utils import counters  # noqa: E402

from lumina_core.generation import sample  # noqa: E402
from lumina_core.models.config import FlagDiTConfig  # noqa: E402
from lumina_core.sampling.schedule import make_noise  # noqa: E402

CORE = str(Path(__file__).resolve().parents[2] / "lumina_core")


def core_frame(frames) -> str:
    """The innermost lumina_core frame of a stack, as 'file:line: source'."""
    for fr in reversed(list(frames)):
        if str(fr.filename).startswith(CORE):
            return f"{Path(fr.filename).name}:{fr.lineno}: `{(fr.line or '').strip()}`"
    return "(no lumina_core frame)"


def explain_rows(model, x, t, feats, mask):
    rows = []
    with torch.no_grad():
        text = model.prepare_text(feats, mask)
        for name, fn, fargs in (
            ("forward(x, t, feats, mask)", model, (x, t, feats, mask)),
            ("forward_with_text(x, t, text)", model.forward_with_text, (x, t, text)),
        ):
            dynamo.reset()
            e = dynamo.explain(fn)(*fargs)
            reasons = sorted({f"{core_frame(r.user_stack)} ({r.reason.splitlines()[0].strip()})"
                              for r in e.break_reasons})
            rows.append([name, e.graph_count, e.graph_break_count, "; ".join(reasons) or "-"])
    return rows


def fullgraph_rows(model, x, t, feats, mask):
    rows = []
    with torch.no_grad():
        text = model.prepare_text(feats, mask)
        for name, fn, fargs in (
            ("torch.compile(model, fullgraph=True)", model, (x, t, feats, mask)),
            ("torch.compile(model.forward_with_text, fullgraph=True)", model.forward_with_text, (x, t, text)),
        ):
            dynamo.reset()
            try:
                torch.compile(fn, fullgraph=True)(*fargs)
                rows.append([name, "**compiles**", "-"])
            except Exception as exc:  # report, do not crash: this is what the benchmark is for
                first = str(exc).strip().splitlines()[0][:140]
                frames = traceback.extract_tb(exc.__traceback__)
                where = core_frame(frames)
                if where == "(no lumina_core frame)":
                    # Dynamo names the user frame in its message: 'File ".../lumina_core/x.py", line N, in f'.
                    lines = [ln.strip() for ln in str(exc).splitlines()]
                    for i in reversed(range(len(lines))):
                        m = re.match(r'File "(.+)", line (\d+), in (\w+)', lines[i])
                        if m and m.group(1).startswith(CORE):
                            src = lines[i + 1] if i + 1 < len(lines) else ""
                            where = f"{Path(m.group(1)).name}:{m.group(2)} ({m.group(3)}): `{src}`"
                            break
                rows.append([name, f"FAILS: {type(exc).__name__}: {first}", where])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one latent size, 3 repeats, no sampler check")
    parser.add_argument("--no-sampler", action="store_true", help="skip the sample() comparison (part 4)")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (default: cold)")
    parser.add_argument("--latent", type=int, nargs="+", default=None, help="latent sizes (default 32 64; quick 32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--config", choices=("small", "mid"), default="small",
                        help="small: dim 512, 4 layers; mid: dim 1024, 8 layers (the step-efficiency model)")
    add_timing_args(parser)
    args = parser.parse_args()
    timing = apply_timing_args(args)
    latents = args.latent or ([32] if args.quick else [32, 64])
    repeats = 3 if args.quick else args.repeats

    print(f"torch.compile on the Flag-DiT; {timing}\n")
    tiny = build_model(FlagDiTConfig.tiny())
    tf, tm = random_text(2, 7, tiny.config.cap_feat_dim, real=5)
    tx, tt = torch.randn(2, 4, 16, 16), torch.rand(2)
    print("1. Graph breaks (torch._dynamo.explain, tiny config):\n")
    print(table(["entry point", "graphs", "breaks", "break at (reason)"], explain_rows(tiny, tx, tt, tf, tm)))
    print("\n2. fullgraph=True:\n")
    full = fullgraph_rows(tiny, tx, tt, tf, tm)
    print(table(["call", "result", "lumina_core line"], full))
    fwt_ok = full[1][1] == "**compiles**"

    cfg = SMALL if args.config == "small" else MID
    model = build_model(cfg)
    feats, mask = random_text(2, TEXT_LEN, cfg.cap_feat_dim)
    rows = []
    with torch.no_grad():
        text = model.prepare_text(feats, mask)
        dynamo.reset()
        if fwt_ok:
            label = "forward_with_text, fullgraph=True"
            compiled = torch.compile(model.forward_with_text, fullgraph=True)

            def eager_fn(x, t):
                return model.forward_with_text(x, t, text)

            def comp_fn(x, t):
                return compiled(x, t, text)
        else:
            label = "forward, breaks allowed"
            compiled = torch.compile(model)

            def eager_fn(x, t):
                return model(x, t, feats, mask)

            def comp_fn(x, t):
                return compiled(x, t, feats, mask)

        for lh in latents:
            x = torch.randn(2, 4, lh, lh)
            t = torch.full((2,), 0.5)
            start = time.perf_counter()
            out_c = comp_fn(x, t)
            compile_s = time.perf_counter() - start
            err = (out_c - eager_fn(x, t)).abs().max().item()
            times = interleaved({"eager": lambda: eager_fn(x, t), "compiled": lambda: comp_fn(x, t)}, repeats)
            e, c = median(times["eager"]), median(times["compiled"])
            rows.append([f"{lh}x{lh}", label, f"{compile_s:.1f}", f"{e:.3f}", f"{c:.3f}", f"**{e / c:.2f}x**",
                         f"{err:.1e}"])
    print(f"\n3. Speed-up after warm-up (config dim {cfg.dim}, {cfg.n_layers} layers; medians of {repeats}):\n")
    print(table(["latent", "compiled", "compile (first call, wall s)", "eager step (s)", "compiled step (s)",
                 "speed-up", "max |diff|"], rows))

    if not (args.quick or args.no_sampler):
        lh = latents[0]
        noise = make_noise(0, (1, 4, lh, lh))
        cond = random_text(1, TEXT_LEN, cfg.cap_feat_dim, seed=1)
        uncond = random_text(1, 2, cfg.cap_feat_dim, seed=2)
        kw = dict(steps=3, cfg=4.0, shift=4.0)
        dynamo.reset()
        wrapped = torch.compile(model)  # what a user (or ComfyUI's TorchCompileModel) would do
        patched = build_model(cfg)
        patched.forward_with_text = torch.compile(patched.forward_with_text)
        graphs = {}
        with torch.no_grad():
            counters.clear()
            sample(wrapped, noise, cond, uncond, **kw)
            graphs["compile(model)"] = counters["stats"]["unique_graphs"]
            counters.clear()
            sample(patched, noise, cond, uncond, **kw)  # compiles
            sample(patched, noise, cond, uncond, **kw)  # the second call finds the RoPE table in the TextContext
            graphs["compiled forward_with_text"] = counters["stats"]["unique_graphs"]
            graphs["eager"] = 0
            times = interleaved({
                "eager": lambda: sample(model, noise, cond, uncond, **kw),
                "compile(model)": lambda: sample(wrapped, noise, cond, uncond, **kw),
                "compiled forward_with_text": lambda: sample(patched, noise, cond, uncond, **kw),
            }, repeats)
        e = median(times["eager"])
        print(f"\n4. sample() at latent {lh}x{lh}, 3 euler steps, cfg 4 (medians of {repeats}):\n")
        print(table(["model passed to sample()", "graphs dynamo compiled during sample()", "s",
                     "speed-up over eager"],
                    [[k, graphs[k], f"{median(v):.3f}", f"{e / median(v):.2f}x"] for k, v in times.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
