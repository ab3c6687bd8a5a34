"""Peak resident memory and time per stage of the whole Lumina-T2I pipeline, bf16 against fp8 and saved encodings.

Writes random weights in the released shapes (the 5B Flag-DiT as the fp32 release file, 20.2 GB; a LLaMA-2-7B-shaped
Hugging Face folder in bf16, 13.5 GB) into a temporary folder, then runs each configuration in a fresh process:

- two loads alone: the fp32 release into fp8 (target < 1.15 x 5.05 GB) and the LLaMA folder into fp8
  (target < 1.15 x 6.7 GB);
- the whole pipeline through `python -m lumina_core demo` (encode, free the encoder, load the DiT, 2 Euler steps
  with cfg at 512x512): bf16/bf16, fp8 DiT, fp8 DiT + fp8 encoder, and saved encodings + fp8 DiT (the encodings
  written by the bf16 run, so no text encoder is loaded; target < 6 GB; fp8 + fp8 target < 7.5 GB).

Each process's peak RSS comes from os.wait4 (the kernel's ru_maxrss of that child alone). The last column compares
each final latent with the bf16 run's. The folder is deleted at the end. Needs ~34 GB of disk and ~14 GB of memory
at full size (run it under `flock /tmp/bigmem.lock` on a shared machine); `--size small` checks the script in a
minute.

    python tests/bench/bench_lowmem_pipeline.py [--size full|small] [--dir DIR] [--json FILE]
    python tests/bench/bench_lowmem_pipeline.py --only-saved    # the DiT file and random encodings only

--only-saved runs just "saved encodings + fp8 DiT" (random 4096-wide encodings stand in for the bf16 run's), once
as is and once with glibc's MALLOC_MMAP_THRESHOLD_=65536, which returns every freed block over 64 KB to the system
at once instead of keeping it in the heap.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_flag_dit_load import write_random_checkpoint  # noqa: E402
from bench_llama_load import FULL as LLAMA_FULL  # noqa: E402
from bench_llama_load import write_checkpoint as write_llama_folder

from lumina_core import FLAG_DIT_5B, FlagDiTConfig  # noqa: E402

GB = 1e9
SMALL_DIT = FlagDiTConfig(dim=512, n_layers=4, n_heads=8, cap_feat_dim=1024)
SMALL_LLAMA = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=2816,
                   vocab_size=32000)
# Acceptance targets (GB) at full size.
TARGETS = {
    "load DiT: fp32 release -> fp8": 1.15 * 5.05,
    "load LLaMA: bf16 folder -> fp8": 1.15 * 6.7,
    "pipeline: fp8 DiT + fp8 encoder": 7.5,
    "pipeline: saved encodings + fp8 DiT": 6.0,
}

LOAD_DIT = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from lumina_core.weights.dit_files import load_flag_dit
start = time.perf_counter()
model = load_flag_dit(sys.argv[2], dtype=torch.float8_e4m3fn)
print(json.dumps({"load": time.perf_counter() - start,
                  "weights_gb": sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9}))
"""

LOAD_LLAMA = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
from lumina_core.text.llama import LlamaTextEncoder
start = time.perf_counter()
enc = LlamaTextEncoder.from_folder(sys.argv[2], dtype=torch.float8_e4m3fn)
load = time.perf_counter() - start
start = time.perf_counter()
feats, _ = enc.encode("a red cat sat on the mat")
print(json.dumps({"load": load, "encode": time.perf_counter() - start, "finite": bool(feats.isfinite().all()),
                  "weights_gb": sum(p.numel() * p.element_size() for p in enc.model.parameters()) / 1e9}))
"""

IMPORT_ONLY = "import torch, transformers"


def run_child(argv: list[str]) -> tuple[str, float, float]:
    """Run a process; returns (stdout, its own peak RSS in GB, wall seconds). Raises on failure."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=REPO, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({proc.returncode}):\n{stderr[-3000:]}\n{stdout[-2000:]}")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / GB
    return stdout, peak, time.perf_counter() - start


def demo_stages(stdout: str) -> dict:
    """{stage name: seconds} from the demo's timing lines."""
    stages = {}
    for line in stdout.splitlines():
        m = re.match(r"\s+(.+?)\s+([\d.]+) s\s+peak RSS", line)
        if m:
            stages[m.group(1)] = float(m.group(2))
    return stages


def read_latent(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


def only_saved(args) -> int:
    from lumina_core import conditioning

    full = args.size == "full"
    folder = Path(tempfile.mkdtemp(prefix="lumina_lowmem_", dir=args.dir))
    rows = []
    try:
        dit_path = folder / "consolidated.00-of-01.safetensors"
        write_random_checkpoint(FLAG_DIT_5B if full else SMALL_DIT, dit_path)
        width = (FLAG_DIT_5B if full else SMALL_DIT).cap_feat_dim
        gen = torch.Generator().manual_seed(0)
        for name, tokens in (("cond", 20), ("negative_cond", 2)):
            conditioning.save(folder / f"{name}.safetensors", torch.randn(1, tokens, width, generator=gen),
                              torch.ones(1, tokens, dtype=torch.bool))
        argv = [sys.executable, "-m", "lumina_core", "demo", "--dit", str(dit_path), "--width", str(args.width),
                "--height", str(args.width), "--steps", str(args.steps), "--device", "cpu",
                "--cond", str(folder / "cond.safetensors"), "--negative-cond", str(folder / "negative_cond.safetensors"),
                "--dit-dtype", "fp8_e4m3fn", "--out", str(folder / "out")]
        for label, env in (("default glibc malloc", {}), ("MALLOC_MMAP_THRESHOLD_=65536", {"MALLOC_MMAP_THRESHOLD_": "65536"})):
            old = dict(os.environ)
            os.environ.update(env)
            try:
                stdout, peak, wall = run_child(argv)
            finally:
                os.environ.clear()
                os.environ.update(old)
            rows.append((label, peak, demo_stages(stdout), wall))
            sys.stdout.write(f"{label}: peak {peak:.2f} GB, {wall:.0f} s\n")
            sys.stdout.flush()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    sys.stdout.write("\n| saved encodings + fp8 DiT | peak RSS (GB) | stage times (s) |\n| --- | --- | --- |\n")
    for label, peak, stages, _ in rows:
        sys.stdout.write(f"| {label} | {peak:.2f} | {', '.join(f'{k} {v:.1f}' for k, v in stages.items())} |\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--dir", default=None, help="where to write the temporary models (full size: 34 GB free)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only-saved", action="store_true", help="only the saved-encodings configuration")
    args = parser.parse_args()
    if args.only_saved:
        return only_saved(args)
    full = args.size == "full"
    dit_config, llama_shape = (FLAG_DIT_5B, LLAMA_FULL) if full else (SMALL_DIT, SMALL_LLAMA)

    folder = Path(tempfile.mkdtemp(prefix="lumina_lowmem_", dir=args.dir))
    results = []
    try:
        start = time.perf_counter()
        dit_path = folder / "consolidated.00-of-01.safetensors"
        write_random_checkpoint(dit_config, dit_path)
        llama_dir = folder / "Llama-2-7b-hf"
        llama_dir.mkdir()
        write_llama_folder(str(llama_dir), llama_shape, int(10e9))
        sys.stdout.write(f"wrote the random models in {time.perf_counter() - start:.0f} s "
                         f"(DiT {dit_path.stat().st_size / GB:.2f} GB fp32)\n")
        sys.stdout.flush()

        _, base_peak, _ = run_child([sys.executable, "-c", IMPORT_ONLY])
        results.append({"name": "import torch + transformers only", "peak_gb": base_peak, "stages": {}})

        for name, code, path in (
            ("load DiT: fp32 release -> fp8", LOAD_DIT, dit_path),
            ("load LLaMA: bf16 folder -> fp8", LOAD_LLAMA, llama_dir),
        ):
            stdout, peak, _ = run_child([sys.executable, "-c", code, str(REPO), str(path)])
            info = json.loads(stdout.strip().splitlines()[-1])
            results.append({"name": name, "peak_gb": peak, "stages": {k: v for k, v in info.items()
                                                                       if k in ("load", "encode")},
                            "weights_gb": info["weights_gb"]})
            sys.stdout.write(f"{name}: peak {peak:.2f} GB\n")
            sys.stdout.flush()

        common = ["--dit", str(dit_path), "--width", str(args.width), "--height", str(args.width),
                  "--steps", str(args.steps), "--device", "cpu"]
        bf16_out = folder / "out_bf16"
        pipelines = (
            ("pipeline: bf16 DiT + bf16 encoder", bf16_out,
             ["--llama", str(llama_dir), "--dtype", "bf16", "--save-cond"]),
            ("pipeline: fp8 DiT + bf16 encoder", folder / "out_fp8dit",
             ["--llama", str(llama_dir), "--dit-dtype", "fp8_e4m3fn", "--text-dtype", "bf16"]),
            ("pipeline: fp8 DiT + fp8 encoder", folder / "out_fp8both",
             ["--llama", str(llama_dir), "--dtype", "fp8_e4m3fn"]),
            ("pipeline: saved encodings + fp8 DiT", folder / "out_saved",
             ["--cond", str(bf16_out / "lumina_demo_cond.safetensors"),
              "--negative-cond", str(bf16_out / "lumina_demo_negative_cond.safetensors"),
              "--dit-dtype", "fp8_e4m3fn"]),
        )
        latents = {}
        for name, out, extra in pipelines:
            stdout, peak, wall = run_child([sys.executable, "-m", "lumina_core", "demo", *common, *extra,
                                            "--out", str(out)])
            latents[name] = read_latent(out / "lumina_demo.latent")
            results.append({"name": name, "peak_gb": peak, "stages": demo_stages(stdout), "wall": wall})
            sys.stdout.write(f"{name}: peak {peak:.2f} GB, {wall:.0f} s\n")
            sys.stdout.flush()
        ref = latents[pipelines[0][0]].float()
        for r in results:
            if r["name"] in latents:
                lat = latents[r["name"]].float()
                r["latent_rel_diff_vs_bf16"] = float((lat - ref).norm() / ref.norm())
                r["finite"] = bool(lat.isfinite().all())
        saved, fresh = latents[pipelines[3][0]], latents[pipelines[1][0]]
        saved_equals_fresh = bool(torch.equal(saved, fresh))
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    sys.stdout.write(
        f"\nsize {args.size}: {args.width}x{args.width}, {args.steps} Euler steps with cfg, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; GB = 1e9 bytes\n\n"
    )
    rows = ["| configuration | peak RSS (GB) | target | stage times (s) | latent vs bf16 (rel.) |",
            "| --- | --- | --- | --- | --- |"]
    for r in results:
        target = TARGETS.get(r["name"]) if full else None
        verdict = "" if target is None else f"< {target:.2f} {'ok' if r['peak_gb'] < target else 'OVER'}"
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
        diff = r.get("latent_rel_diff_vs_bf16")
        rows.append(f"| {r['name']} | {r['peak_gb']:.2f} | {verdict} | {stages} | "
                    f"{'' if diff is None else f'{diff:.4f}'} |")
    sys.stdout.write("\n".join(rows) + "\n")
    sys.stdout.write(f"\nsaved encodings + fp8 DiT gives the same latent as fresh encodings + fp8 DiT: "
                     f"{saved_equals_fresh}\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "results": results,
                                               "saved_equals_fresh": saved_equals_fresh}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
