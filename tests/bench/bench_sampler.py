"""Sampler overhead, the cost of classifier-free guidance, and the saving of per-generation text caching
(issue #7, items 2 and 3).

0. The Lumina Sampler node as it runs inside ComfyUI (Lumina CFG Guider + Lumina ODE Sampler through ComfyUI's
   sampling, text cached per generation by the MODEL's wrappers): the whole node call divided by the time of the
   DiT's forwards inside it, at 30 steps, target <= 1.03. Needs ComfyUI: run with its python and `--comfyui DIR`
   (or COMFYUI_DIR set); without it this part is skipped with a note.

1. Overhead: a whole `sample()` call (text preparation, time grid, guidance, solver, finiteness checks) divided by
   (number of model evaluations x one `forward_with_text` of the same batch). Target <= 1.03. The forwards are
   timed inside the same call by a delegating wrapper, so the ratio is the call's time over its own forwards' time
   (immune to load changes between runs); the ratio against a forward timed on its own is shown beside it. The
   sampler's own work is also measured alone, with a null model whose forward returns zeros (real text
   preparation), per evaluation and as a fraction of one real forward.
2. CFG: `sample()` with cfg = 1 (batch 1, no unconditional pass) against cfg = 4 (batch 2). Expected about 0.5.
3. Caching: one step with the text prepared once (`forward_with_text` + a TextContext, what `sample()` does)
   against `model(x, t, feats, mask)`, which redoes caption pooling, every layer's text keys/values and the RoPE
   table at each call. Shown with the FLOP share of the text work from the formula of `_common.forward_flops`,
   and that share for the released 5B model at 1024x1024.

Config: dim 512, 4 layers, 8 heads, cap_feat_dim 4096 (small, but a forward costs 0.1-2 s, far above the noise
of a Python loop). fp32 on the CPU, euler, shift 4, extrapolation "t2i" (the default). All timings are medians of
interleaved repeats: on a shared machine compare the ratios, not the seconds.

    python tests/bench/bench_sampler.py [--quick] [--steps 4] [--repeats 3] [--comfyui DIR] [--node-only]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import torch  # noqa: E402
from _common import (  # noqa: E402
    SMALL,
    TEXT_LEN,
    add_timing_args,
    apply_timing_args,
    build_model,
    forward_flops,
    interleaved,
    median,
    random_text,
    seq_len,
    table,
)

from lumina_core.generation import sample  # noqa: E402
from lumina_core.models.config import FLAG_DIT_5B  # noqa: E402
from lumina_core.models.flag_dit import extrapolation_kwargs  # noqa: E402
from lumina_core.sampling.schedule import make_noise  # noqa: E402
from lumina_core.sampling.solvers import EVALS_PER_STEP  # noqa: E402

CFG = 4.0
SHIFT = 4.0
TARGET = 1.03
DEFAULT_STEPS = 30  # the original demo's default (euler)


class NullModel:
    """The real text preparation, a free forward: what is left of a sample() call is the sampler's own work."""

    def __init__(self, model):
        self.model = model

    def prepare_text(self, feats, mask):
        return self.model.prepare_text(feats, mask)

    def forward_with_text(self, x, t, text, **kwargs):
        return torch.zeros_like(x)


class TimedModel:
    """Delegates to a FlagDiT and adds up the time spent in its forwards, so that the time of a sample() call
    splits exactly into model evaluations and everything else, within the same call (no cross-run noise)."""

    def __init__(self, model):
        self.model = model
        self.forward_s = 0.0
        self.calls = 0

    def prepare_text(self, feats, mask):
        return self.model.prepare_text(feats, mask)

    def forward_with_text(self, x, t, text, **kwargs):
        start = _common.now()
        out = self.model.forward_with_text(x, t, text, **kwargs)
        self.forward_s += _common.now() - start
        self.calls += 1
        return out


def per_round(a, b, scale=1.0):
    """Median over rounds of a[r] / (scale * b[r]): ratios of neighbouring measurements."""
    return median([x / (scale * y) for x, y in zip(a, b)])


def overhead_rows(model, latents, steps, solver, repeats):
    cond = random_text(1, TEXT_LEN, SMALL.cap_feat_dim, seed=1)
    uncond = random_text(1, 2, SMALL.cap_feat_dim, seed=2)  # "" is [BOS, EOS]
    rows, cfg_rows = [], []
    for lh in latents:
        noise = make_noise(0, (1, 4, lh, lh))
        # The batch sample() builds for cfg: cond and uncond, right-padded to the longer one.
        pad = TEXT_LEN - uncond[0].shape[1]
        feats = torch.cat([cond[0], torch.cat([uncond[0], uncond[0].new_zeros(1, pad, SMALL.cap_feat_dim)], dim=1)])
        mask = torch.cat([cond[1], torch.cat([uncond[1], uncond[1].new_zeros(1, pad)], dim=1)])
        text2 = model.prepare_text(feats, mask)
        kwargs = extrapolation_kwargs("t2i", lh, lh, 0.5)
        x2 = noise.repeat(2, 1, 1, 1)
        t2 = torch.full((2,), 0.5)
        timed_model = TimedModel(model)
        inside = {CFG: [], 1.0: []}

        def run(cfg, m=model):
            return sample(m, noise, cond, uncond, steps=steps, cfg=cfg, shift=SHIFT, solver=solver)

        def run_timed(cfg):
            timed_model.forward_s, timed_model.calls = 0.0, 0
            out = run(cfg, timed_model)
            inside[cfg].append((timed_model.forward_s, timed_model.calls))
            return out

        with torch.no_grad():
            times = interleaved(
                {
                    "sample cfg": lambda: run_timed(CFG),
                    "forward b2": lambda: model.forward_with_text(x2, t2, text2, **kwargs),
                    "sample cfg1": lambda: run_timed(1.0),
                    "null sample": lambda: run(CFG, NullModel(model)),
                    "prepare_text": lambda: model.prepare_text(feats, mask),
                },
                repeats,
            )
        n = inside[CFG][-1][1]
        assert n == steps * EVALS_PER_STEP[solver], (n, steps, solver)
        # The warm-up call is the first entry of `inside`; rounds follow.
        fwd_in = [f for f, _ in inside[CFG][1:]]
        fwd_in1 = [f for f, _ in inside[1.0][1:]]
        ratio = per_round(times["sample cfg"], fwd_in)
        ratio1 = per_round(times["sample cfg1"], fwd_in1)
        ratio_standalone = per_round(times["sample cfg"], times["forward b2"], n)
        fwd_each = median([f / n for f in fwd_in])
        prep = median(times["prepare_text"])
        # The sampler's own work per evaluation: a null-model call less its one text preparation.
        per_eval = max(0.0, median([(a - b) / n for a, b in zip(times["null sample"], times["prepare_text"])]))
        at_default = 1 + prep / (DEFAULT_STEPS * EVALS_PER_STEP[solver] * fwd_each) + per_eval / fwd_each
        rows.append([
            f"{lh}x{lh} ({lh * 8}px)", seq_len(SMALL, lh, lh), f"{solver} x{steps}", n, f"{fwd_each:.3f}",
            f"{median(times['sample cfg']):.2f}", f"**{ratio:.3f}**", "yes" if ratio <= TARGET else "NO",
            f"{ratio_standalone:.2f}", f"{ratio1:.3f}", f"{prep * 1e3:.0f} ms ({prep / fwd_each:.0%} of a forward)",
            f"{per_eval * 1e3:.1f} ms ({per_eval / fwd_each:.2%})", f"**{at_default:.3f}**",
        ])
        cfg_rows.append([f"{lh}x{lh} ({lh * 8}px)", f"{median(times['sample cfg1']):.2f}",
                         f"{median(times['sample cfg']):.2f}",
                         f"**{per_round(times['sample cfg1'], times['sample cfg']):.2f}**",
                         f"{per_round(fwd_in1, fwd_in):.2f}"])
    return rows, cfg_rows


def caching_rows(model, latents, text_lens, repeats):
    rows = []
    for lh in latents:
        for tl in text_lens:
            feats, mask = random_text(2, tl, SMALL.cap_feat_dim, real=tl)
            x = torch.randn(2, 4, lh, lh)
            t = torch.full((2,), 0.5)
            with torch.no_grad():
                text = model.prepare_text(feats, mask)
                times = interleaved(
                    {
                        "cached": lambda: model.forward_with_text(x, t, text),
                        "uncached": lambda: model(x, t, feats, mask),
                        "prepare": lambda: model.prepare_text(feats, mask),
                    },
                    repeats,
                )
            cached, uncached, prep = (median(times[k]) for k in ("cached", "uncached", "prepare"))
            saving = 1 - per_round(times["cached"], times["uncached"])
            fl = forward_flops(SMALL, 2, lh, lh, tl)
            share = fl["text (cap_embedder, text K/V)"] / fl["total"]
            rows.append([
                f"{lh}x{lh}", tl, f"{uncached:.3f}", f"{cached:.3f}", f"{(uncached - cached) * 1e3:.0f} ms",
                f"**{saving:.1%}**", f"{prep * 1e3:.0f} ms", f"{share:.1%}",
            ])
    return rows


def node_rows(comfyui_dir, latents, steps, repeats):
    """The Lumina Sampler node inside ComfyUI: whole call / forwards timed inside it, cfg 4 and cfg 1."""
    import importlib.util
    import os
    import tempfile

    sys.path.insert(0, os.path.abspath(comfyui_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("ComfyUI_Lumina", repo / "__init__.py",
                                                  submodule_search_locations=[str(repo)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["ComfyUI_Lumina"] = pack
    spec.loader.exec_module(pack)
    from ComfyUI_Lumina.nodes import NODE_CLASS_MAPPINGS, comfy_model
    from ComfyUI_Lumina.nodes.common import make_conditioning

    from lumina_core.weights.dit_files import save_flag_dit

    folder = tempfile.mkdtemp(prefix="lumina_bench_")
    path = Path(folder) / "small.safetensors"
    save_flag_dit(build_model(SMALL), path)
    model = comfy_model.load_flag_dit_model(str(path), "fp32")
    path.unlink()
    dit = comfy_model.lumina_dit(model)
    timed = {"s": 0.0, "n": 0}
    forward = dit.forward_with_text

    def timed_forward(*a, **k):
        start = _common.now()
        out = forward(*a, **k)
        timed["s"] += _common.now() - start
        timed["n"] += 1
        return out

    dit.forward_with_text = timed_forward
    pos = make_conditioning(*random_text(1, TEXT_LEN, SMALL.cap_feat_dim, seed=1))
    neg = make_conditioning(*random_text(1, 2, SMALL.cap_feat_dim, seed=2))
    node = NODE_CLASS_MAPPINGS["LuminaSampler"]()
    rows = []
    for lh in latents:
        latent = {"samples": torch.zeros(1, 4, lh, lh)}
        for cfg in (CFG, 1.0):
            ratios, calls, forwards = [], [], []
            for _ in range(repeats + 1):  # the first is a warm-up
                timed["s"], timed["n"] = 0.0, 0
                start = _common.now()
                node.sample(model, pos, neg, latent, 0, steps, cfg, "euler", SHIFT, 1.0, "t2i", "faithful")
                call = _common.now() - start
                ratios.append(call / timed["s"])
                calls.append(call)
                forwards.append(timed["s"] / timed["n"])
            n = timed["n"]
            assert n == steps, (n, steps)
            ratio = median(ratios[1:])
            rows.append([f"{lh}x{lh} ({lh * 8}px)", cfg, f"euler x{steps}", n, f"{median(forwards[1:]):.3f}",
                         f"{median(calls[1:]):.2f}", f"**{ratio:.3f}**", "yes" if ratio <= TARGET else "NO"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two latent sizes, 3 repeats (about 2 min)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--solver", default="euler", choices=sorted(EVALS_PER_STEP))
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"),
                        help="a ComfyUI checkout: also measure the Lumina Sampler node inside ComfyUI (run this script "
                        "with ComfyUI's python)")
    parser.add_argument("--node-only", action="store_true", help="only part 0 (the node inside ComfyUI)")
    parser.add_argument("--node-steps", type=int, default=DEFAULT_STEPS)
    add_timing_args(parser)
    args = parser.parse_args()
    timing = apply_timing_args(args)
    latents = [32, 64] if args.quick else [32, 64, 96]
    cache_latents = [32] if args.quick else [32, 64]
    text_lens = [40, 128] if args.quick else [40, 128, 256]

    torch.manual_seed(0)
    model = build_model(SMALL)
    with torch.no_grad():  # warm-up
        model(torch.randn(2, 4, 16, 16), torch.rand(2), *random_text(2, 8, SMALL.cap_feat_dim))
    print(f"Sampler benchmarks, config dim {SMALL.dim}, {SMALL.n_layers} layers, {SMALL.n_heads} heads, cap "
          f"{SMALL.cap_feat_dim}, fp32; {timing}; medians of {args.repeats} interleaved repeats\n")

    node_latents = [32] if args.quick else [32, 64]
    if args.comfyui:
        rows = node_rows(args.comfyui, node_latents, args.node_steps, args.repeats)
        print(f"0. The Lumina Sampler node inside ComfyUI (guider + ODE sampler through ComfyUI's sampling): whole "
              f"call / the DiT forwards inside it, target <= {TARGET}:\n")
        print(table(["latent", "cfg", "solver", "evals", "forward (s, inside)", "node call (s)", "ratio",
                     f"<= {TARGET}"], rows))
        print()
    else:
        print("0. The Lumina Sampler node inside ComfyUI: skipped (pass --comfyui DIR and run with ComfyUI's "
              "python).\n")
    if args.node_only:
        return 0

    rows, cfg_rows = overhead_rows(model, latents, args.steps, args.solver, args.repeats)
    print(f"1. sample() / (evaluations x forward_with_text of the same batch), cfg {CFG}, target <= {TARGET}:\n")
    print(table(["latent", "tokens", "solver", "evals", "forward b=2 (s, inside)", "sample() (s)",
                 "ratio (forwards timed inside the call)", f"<= {TARGET}", "ratio (forward timed alone)",
                 "ratio at cfg 1 (b=1)", "prepare_text (once per call)", "sampler work per eval (null model)",
                 f"predicted ratio at {DEFAULT_STEPS} steps"], rows))
    print(f"\nPredicted ratio = 1 + prepare_text / ({DEFAULT_STEPS} evals x forward) + per-eval work / forward: "
          f"the text preparation is paid once per generation, so it weighs {args.steps / DEFAULT_STEPS:.2f}x as "
          f"much at the default {DEFAULT_STEPS} steps as at the {args.steps} steps timed here.")
    print("\n2. cfg = 1 (batch 1) against cfg = 4 (batch 2), whole sample() calls:\n")
    print(table(["latent", "cfg 1 (s)", f"cfg {CFG:g} (s)", "cfg1 / cfg4 (whole calls)",
                 "forward b=1 / b=2 (inside the calls)"], cfg_rows))

    crow = caching_rows(model, cache_latents, text_lens, args.repeats)
    print("\n3. per-step cost with the text prepared once (forward_with_text) vs model(x, t, feats, mask), batch 2:\n")
    print(table(["latent", "text tokens", "uncached step (s)", "cached step (s)", "saved per step",
                 "saving", "prepare_text once", "text FLOP share (formula)"], crow))
    fl5 = forward_flops(FLAG_DIT_5B, 2, 128, 128, 128)
    fl5s = forward_flops(FLAG_DIT_5B, 2, 128, 128, TEXT_LEN)
    print(f"\nReleased 5B model at 1024x1024, batch 2: text work is "
          f"{fl5s['text (cap_embedder, text K/V)'] / 1e9:.0f} GFLOP of {fl5s['total'] / 1e12:.1f} TFLOP per step with "
          f"{TEXT_LEN} tokens ({fl5s['text (cap_embedder, text K/V)'] / fl5s['total']:.2%}), "
          f"{fl5['text (cap_embedder, text K/V)'] / 1e9:.0f} GFLOP with 128 tokens "
          f"({fl5['text (cap_embedder, text K/V)'] / fl5['total']:.2%}); the cache also saves one [L, head_dim/2] "
          f"RoPE table and 32 layers' K/V launches per step.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
