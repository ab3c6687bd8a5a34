"""Peak memory and time of loading a full-size Lumina-T2I Flag-DiT checkpoint.

Writes a 5B fp32 safetensors file of random weights in the released key layout (20.2 GB) to a temporary folder,
loads it with `load_flag_dit(dtype=torch.bfloat16)` in a fresh process, and reports that process's peak resident
memory against the bf16 size of the weights. The file is deleted afterwards.

    python tests/bench/bench_flag_dit_load.py [--dir /big/disk] [--config 5b|tiny] [--dtype bf16|fp16|fp32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from lumina_core import FLAG_DIT_5B, FlagDiT, FlagDiTConfig  # noqa: E402
from lumina_core.weights.tensor_io import write_safetensors  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[3])
from lumina_core.weights.dit_files import load_flag_dit
start = time.perf_counter()
model = load_flag_dit(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": seconds, "weights_bytes": weights,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

BASELINE = r"""
import json, resource, torch
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def write_random_checkpoint(config: FlagDiTConfig, path: Path) -> int:
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), torch.float32) for k, v in FlagDiT(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = ((k, torch.randn(s, generator=gen) * 0.02) for k, (s, _) in shapes.items())
    write_safetensors(path, tensors, shapes=shapes, metadata={"format": "pt"})
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to write the temporary checkpoint (needs 21 GB free)")
    parser.add_argument("--config", choices=("5b", "tiny"), default="5b")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = parser.parse_args()
    config = FLAG_DIT_5B if args.config == "5b" else FlagDiTConfig.tiny()

    folder = Path(tempfile.mkdtemp(prefix="lumina_bench_", dir=args.dir))
    try:
        path = folder / "consolidated.00-of-01.safetensors"
        start = time.perf_counter()
        size = write_random_checkpoint(config, path)
        write_s = time.perf_counter() - start
        base = json.loads(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                         check=True).stdout)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), args.dtype, str(REPO)], capture_output=True, text=True
        )
        if out.returncode != 0:
            print(out.stderr)
            return 1
        res = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    gb = 1e9
    weights = res["weights_bytes"]
    peak = res["peak_rss_bytes"]
    print("| quantity | value |")
    print("| --- | --- |")
    print(f"| checkpoint file (fp32) | {size / gb:.2f} GB, written in {write_s:.0f} s |")
    print(f"| loaded weights ({args.dtype}) | {weights / gb:.2f} GB |")
    print(f"| load time | {res['seconds']:.1f} s |")
    print(f"| peak RSS of the loading process | {peak / gb:.2f} GB |")
    print(f"| peak RSS of a process that only imports torch | {base['peak_rss_bytes'] / gb:.2f} GB |")
    print(f"| peak / weights | {peak / weights:.3f} (target < 1.15) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
