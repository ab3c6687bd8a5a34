"""Peak memory and time of loading a full-size Lumina-Next Next-DiT or Lumina-Image-2.0 Unified Next-DiT checkpoint.

Writes an fp32 safetensors file of random weights in the released shapes (the original key layout, or the diffusers
layout: for the Next-DiT with its duplicated cross-attention query tensors, for the Unified Next-DiT with qkv split
into to_q/to_k/to_v and no norm_final) to a temporary folder, loads it with `load_dit(dtype=torch.bfloat16)` in a
fresh process, and reports that process's peak resident memory against the bf16 size of the weights. The file is
deleted afterwards. The 32-kv-head Next-DiT 2B file is 7.95 GB, the grouped-query one (the Lumina-Next-SFT release)
6.51 GB, the Lumina-Image-2.0 one 10.44 GB.

    python tests/bench/bench_dit_load.py [--dir /big/disk] [--config 2b|2b-gqa|lumina2|tiny|lumina2-tiny]
        [--layout original|diffusers] [--dtype bfloat16|float16|float32]
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

from lumina_core.models.config import (  # noqa: E402
    NEXT_DIT_2B,
    NEXT_DIT_2B_GQA,
    UNIFIED_NEXT_DIT_2B,
    NextDiTConfig,
    UnifiedNextDiTConfig,
)
from lumina_core.models.next_dit import NextDiT  # noqa: E402
from lumina_core.models.unified_next_dit import UnifiedNextDiT  # noqa: E402
from lumina_core.weights.layouts import original_to_diffusers, unified_original_to_diffusers  # noqa: E402
from lumina_core.weights.tensor_io import write_safetensors  # noqa: E402

CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, sys.argv[3])
from lumina_core.families import load_dit
start = time.perf_counter()
model = load_dit(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": seconds, "weights_bytes": weights, "family": model.family,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

BASELINE = r"""
import json, resource, torch
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

CONFIGS = {"2b": NEXT_DIT_2B, "2b-gqa": NEXT_DIT_2B_GQA, "tiny": NextDiTConfig.tiny(), "lumina2": UNIFIED_NEXT_DIT_2B,
           "lumina2-tiny": UnifiedNextDiTConfig.tiny()}


def write_random_checkpoint(config, path: Path, layout: str) -> int:
    """Random fp32 weights in the given layout; the diffusers copies hold the same values as their originals, the
    Unified Next-DiT's q/k/v blocks are the rows of its qkv."""
    unified = isinstance(config, UnifiedNextDiTConfig)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in (UnifiedNextDiT if unified else NextDiT)(config).state_dict().items()}
    rename = unified_original_to_diffusers if unified else original_to_diffusers
    names = {k: [k] if layout == "original" else rename(k) for k in shapes}
    split = [config.dim, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim]

    def blocks(key, tensor):
        """(name, tensor) of each file tensor holding `key`: copies, or row blocks of a split qkv."""
        if unified and key.endswith(".qkv.weight") and len(names[key]) == 3:
            return list(zip(names[key], tensor.split(split)))
        return [(name, tensor) for name in names[key]]

    with torch.device("meta"):
        file_shapes = {n: (tuple(t.shape), torch.float32) for k, s in shapes.items()
                       for n, t in blocks(k, torch.empty(s))}
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for key, shape in shapes.items():
            tensor = torch.randn(shape, generator=gen) * 0.02
            for name, block in blocks(key, tensor):
                yield name, block.contiguous()

    write_safetensors(path, tensors(), shapes=file_shapes, metadata={"format": "pt"})
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where to write the temporary checkpoint (needs 11 GB free)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="2b")
    parser.add_argument("--layout", choices=("original", "diffusers"), default="original")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = parser.parse_args()
    config = CONFIGS[args.config]

    folder = Path(tempfile.mkdtemp(prefix="lumina_dit_bench_", dir=args.dir))
    try:
        original = args.layout == "original"
        name = "consolidated.00-of-01.safetensors" if original else "diffusion_pytorch_model.safetensors"
        path = folder / name
        start = time.perf_counter()
        size = write_random_checkpoint(config, path, args.layout)
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
    print(f"DiT {args.config} ({config.kv_heads} kv heads), {args.layout} layout, loaded as {res['family']}")
    print()
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
