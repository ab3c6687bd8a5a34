"""Peak memory and time of loading a LLaMA-2-7B-shaped text encoder with LlamaTextEncoder.from_folder.

Writes random bf16 weights in the layout of meta-llama/Llama-2-7b-hf (LlamaForCausalLM keys with the `model.`
prefix plus `lm_head.weight`, ~10 GB safetensors shards, an index json, its config.json) and a tiny tokenizer into
a temporary folder, then loads it in a fresh Python process, so the child's ru_maxrss is the loader's peak and
nothing else's. The target: peak < 1.15 x 13.5 GB, the bf16 size of the checkpoint.

    python tests/bench/bench_llama_load.py            # full size: ~13.5 GB on disk, ~14 GB of memory
    python tests/bench/bench_llama_load.py --small    # a ~0.6 GB model, seconds

Every tensor is generated and written on its own (a streaming safetensors writer), so the writer never holds more
than one tensor either. GB here is 10^9 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET_RATIO = 1.15
REFERENCE_GB = 13.5  # LLaMA-2-7B in bf16, LM head included

FULL = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000)
SMALL = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, intermediate_size=2816, vocab_size=32000)


def causal_lm_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every LlamaForCausalLM tensor, in the order Hugging Face checkpoints store them."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    tensors = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, f)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.weight", (h, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.weight", (h, h)),
        ]
    return tensors + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def write_safetensors_streaming(path: str, tensors: list[tuple[str, tuple[int, ...]]], generator) -> None:
    """A bf16 safetensors file written tensor by tensor: 8-byte header size, JSON header, then the raw data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * numel(shape)]}
        offset += 2 * numel(shape)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)
            f.write(t.view(torch.uint8).numpy().data)


def write_checkpoint(folder: str, shape: dict, shard_bytes: int) -> int:
    """Write the fake checkpoint; returns the bytes of all its tensors."""
    tensors = causal_lm_shapes(shape)
    shards, current, size = [], [], 0
    for name, s in tensors:
        if current and size + 2 * numel(s) > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, s))
        size += 2 * numel(s)
    shards.append(current)

    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(os.path.join(folder, file_name), shard, generator)
        weight_map.update({name: file_name for name, _ in shard})
    total = sum(2 * numel(s) for _, s in tensors)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    sys.path.insert(0, REPO_ROOT)
    from tests.helpers_llama import llama2_hf_config_json, make_tiny_tokenizer

    config = llama2_hf_config_json(**shape)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    make_tiny_tokenizer().save_pretrained(folder)
    return total


def child(folder: str) -> None:
    """Runs in the fresh process: load, measure, encode once, report one JSON line."""
    import resource

    sys.path.insert(0, REPO_ROOT)
    from lumina_core.text.llama import LlamaTextEncoder

    def peak_bytes() -> int:
        # ru_maxrss is in KiB on Linux, in bytes on macOS.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

    before = peak_bytes()
    start = time.perf_counter()
    encoder = LlamaTextEncoder.from_folder(folder, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    peak = peak_bytes()
    params = list(encoder.model.parameters())
    start = time.perf_counter()
    features, _ = encoder.encode("a red cat sat on the mat")
    encode_s = time.perf_counter() - start
    print(
        json.dumps(
            {
                "peak_bytes": peak,
                "peak_before_load_bytes": before,
                "load_s": load_s,
                "encode_s": encode_s,
                "param_bytes": sum(p.numel() * p.element_size() for p in params),
                "dtypes": sorted({str(p.dtype) for p in params}),
                "features": list(features.shape),
                "finite": bool(features.isfinite().all()),
            }
        )
    )


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", help="where to create the temporary model folder (default: the system temp dir)")
    parser.add_argument("--small", action="store_true", help="a smaller shape, for a quick run")
    parser.add_argument("--shard-gb", type=float, default=10.0, help="shard size in GB (Llama-2-7b-hf: 10)")
    parser.add_argument("--keep", action="store_true", help="keep the folder afterwards")
    parser.add_argument(
        "--drop-caches", action="store_true", help="empty the page cache before loading (Linux, root): a cold load"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0

    shape = SMALL if args.small else FULL
    folder = tempfile.mkdtemp(prefix="bench_llama_", dir=args.dir)
    try:
        needed = 2 * sum(numel(s) for _, s in causal_lm_shapes(shape))
        free = shutil.disk_usage(folder).free
        if free < needed * 1.05:
            raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, the checkpoint needs {needed / 1e9:.1f} GB")
        start = time.perf_counter()
        file_bytes = write_checkpoint(folder, shape, int(args.shard_gb * 1e9))
        write_s = time.perf_counter() - start
        n_files = len([n for n in os.listdir(folder) if n.endswith(".safetensors")])

        cache = "warm (what the write left in the page cache)"
        if args.drop_caches:
            cache = "dropped before the load" if drop_page_cache() else "could not be dropped (needs Linux and root)"
        run = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", folder],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
        )
        if run.returncode != 0:
            sys.stderr.write(run.stderr)
            return run.returncode
        result = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    peak_gb = result["peak_bytes"] / 1e9
    rows = [
        (
            "shape",
            "hidden {hidden_size}, {num_hidden_layers} layers, ffn {intermediate_size}, vocab {vocab_size}".format(
                **shape
            ),
        ),
        (
            "checkpoint on disk (bf16, LM head incl.)",
            f"{file_bytes / 1e9:.2f} GB in {n_files} shards (written in {write_s:.0f} s)",
        ),
        ("loaded LlamaModel weights (bf16)", f"{result['param_bytes'] / 1e9:.2f} GB, dtypes {result['dtypes']}"),
        ("child peak RSS before load (imports)", f"{result['peak_before_load_bytes'] / 1e9:.2f} GB"),
        ("child peak RSS after load", f"{peak_gb:.2f} GB"),
        (
            "(peak - import peak) / loaded weights",
            f"{(result['peak_bytes'] - result['peak_before_load_bytes']) / result['param_bytes']:.3f}",
        ),
        ("load time", f"{result['load_s']:.1f} s, page cache {cache}"),
        ("first encode (CPU)", f"{result['encode_s']:.1f} s, features {result['features']}, finite {result['finite']}"),
    ]
    if not args.small:
        ratio = peak_gb / REFERENCE_GB
        verdict = "ok" if ratio < TARGET_RATIO else "OVER TARGET"
        rows.append((f"peak / {REFERENCE_GB} GB", f"{ratio:.3f} (target < {TARGET_RATIO}: {verdict})"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
