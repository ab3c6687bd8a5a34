"""GPU check of the whole pipeline, ready to run on the first CUDA machine: speed, memory, attention backend, accuracy.

    python tests/bench/gpu_check.py --out DIR

With CUDA it writes random weights in the released shapes (5B Flag-DiT and LLaMA-2-7B in bf16, about 24 GB; a
mid-size model when GPU memory or disk is short) under DIR/weights, deletes them at the end, and measures:

- seconds per CFG step at 1024x1024 with bf16 weights and with fp8 weights (fp8_e4m3fn, computed in bf16);
- peak GPU memory of encode -> offload the encoder -> sample, at 1024x1024 and 2048x2048 (bf16) and at 1024x1024
  with fp8 weights for both models;
- which scaled_dot_product_attention backend runs the Flag-DiT's self-attention (no mask) and its text
  cross-attention (boolean mask), at head_dim 96 in bf16;
- the largest difference between a small model's output on the GPU (bf16) and on the CPU (fp32).

It prints a markdown table and writes DIR/gpu_check.json. Without CUDA it prints one line saying so and exits 0.
`--device cpu --size tiny` runs the same code on the CPU with a tiny model (the test does this), so the script is
known to work before it ever meets a GPU. Budget: under 8 minutes on one large GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lumina_core import FLAG_DIT_5B, FlagDiT, FlagDiTConfig  # noqa: E402
from lumina_core.generation import sample  # noqa: E402
from lumina_core.sampling.schedule import make_noise  # noqa: E402
from lumina_core.text.llama import LlamaTextEncoder  # noqa: E402
from lumina_core.weights.dit_files import load_flag_dit  # noqa: E402
from lumina_core.weights.tensor_io import write_safetensors  # noqa: E402

GB = 1e9
PROMPT = "a fluffy mouse holding a watermelon, in a magical and colorful setting"
SIZES = {
    # Flag-DiT config, LLaMA shape
    "full": (FLAG_DIT_5B, dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                               intermediate_size=11008, vocab_size=32000)),
    "mid": (FlagDiTConfig(dim=1536, n_layers=12, n_heads=16, cap_feat_dim=4096),
            dict(hidden_size=4096, num_hidden_layers=4, num_attention_heads=32, intermediate_size=11008,
                 vocab_size=32000)),
    "tiny": (FlagDiTConfig.tiny(), dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, vocab_size=160)),
}


# --------------------------------------------------------------------------------------------------------------
# Random weights in the released layouts


def _random(shape, gen, device, name: str) -> torch.Tensor:
    if name.endswith("norm.weight") or name.endswith("cap_embedder.0.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = 1 / math.sqrt(fan_in) if len(shape) > 1 else 0.02
    return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()


def write_dit(config: FlagDiTConfig, path: Path, device) -> None:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FlagDiT(config).state_dict().items()}
    gen = torch.Generator(device).manual_seed(0)
    write_safetensors(path, ((k, _random(s, gen, device, k)) for k, s in shapes.items()),
                      shapes={k: (s, torch.bfloat16) for k, s in shapes.items()}, metadata={"format": "pt"})


def write_llama(shape: dict, folder: Path, device) -> None:
    from bench_llama_load import causal_lm_shapes

    from tests.helpers_llama import llama2_hf_config_json, make_tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tensors = causal_lm_shapes(shape)
    gen = torch.Generator(device).manual_seed(1)
    write_safetensors(folder / "model.safetensors", ((k, _random(s, gen, device, k)) for k, s in tensors),
                      shapes={k: (s, torch.bfloat16) for k, s in tensors}, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(llama2_hf_config_json(**shape)))
    make_tiny_tokenizer().save_pretrained(folder)


# --------------------------------------------------------------------------------------------------------------
# Measurements


class Memory:
    """Peak memory of the device: CUDA's allocator statistics, or this process's peak RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / GB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def encode(llama_dir: Path, dtype, device):
    enc = LlamaTextEncoder.from_folder(llama_dir, dtype=dtype, device=device)
    cond, uncond = enc.encode([PROMPT], output_device=device), enc.encode([""], output_device=device)
    return enc, cond, uncond


def pipeline_peak(llama_dir, dit_path, dtype, pixels, device, mem: Memory) -> float:
    """Peak memory of: encoder on the device, encode, encoder offloaded to the CPU, DiT on the device, one CFG step."""
    mem.reset()
    enc, cond, uncond = encode(llama_dir, dtype, device)
    enc.to("cpu")  # offload, as ComfyUI's memory manager does before the DiT needs the room
    del enc
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dit = load_flag_dit(dit_path, dtype=dtype, device=device)
    latent = pixels // 8
    sample(dit, make_noise(0, (1, 4, latent, latent)).to(device), cond, uncond, steps=1, cfg=4.0, shift=4.0)
    peak = mem.peak_gb()
    del dit
    return peak


def seconds_per_step(dit_path, dtype, cond, uncond, pixels, steps, device, mem: Memory) -> float:
    dit = load_flag_dit(dit_path, dtype=dtype, device=device)
    latent = pixels // 8
    noise = make_noise(0, (1, 4, latent, latent)).to(device)
    sample(dit, noise, cond, uncond, steps=1, cfg=4.0, shift=4.0)  # warm-up: kernels, allocator
    mem.sync()
    start = time.perf_counter()
    out = sample(dit, noise, cond, uncond, steps=steps, cfg=4.0, shift=4.0)
    mem.sync()
    seconds = (time.perf_counter() - start) / steps
    assert torch.isfinite(out).all(), "non-finite output"
    del dit
    return seconds


def sdpa_backends(device, head_dim: int = 96, heads: int = 32, tokens: int = 4160, text: int = 40) -> dict:
    """The first backend (flash, efficient, cudnn, math) that runs each attention call of the Flag-DiT."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype)
    k = torch.randn_like(q)
    ty = torch.randn(2, heads, text, head_dim, device=device, dtype=dtype)
    mask = torch.ones(2, 1, 1, text, dtype=torch.bool, device=device)
    mask[1, ..., text // 2:] = False
    calls = {"self-attention (no mask)": lambda: F.scaled_dot_product_attention(q, k, k),
             "cross-attention (bool mask)": lambda: F.scaled_dot_product_attention(q, ty, ty, attn_mask=mask)}
    order = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
             ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]
    found = {}
    for name, call in calls.items():
        found[name] = "none"
        for backend_name, backend in order:
            try:
                with sdpa_kernel([backend]):
                    call()
                found[name] = backend_name
                break
            except RuntimeError:
                continue
    return found


def gpu_vs_cpu(device) -> dict:
    """Max and relative difference between a small Flag-DiT's velocity in bf16 on `device` and in fp32 on the CPU."""
    from lumina_core.models.blocks import init_random_weights

    config = FlagDiTConfig(dim=512, n_layers=4, n_heads=8, cap_feat_dim=512)
    model = init_random_weights(FlagDiT(config), seed=0).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=gen)
    feats = torch.randn(2, 24, 512, generator=gen)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 12:] = False
    t = torch.tensor([0.25, 0.75])
    with torch.no_grad():
        ref = model(x, t, feats, mask)
        fast = model.to(device=device, dtype=torch.bfloat16)(x.to(device), t.to(device), feats.to(device),
                                                             mask.to(device)).float().cpu()
    return {"max_abs_diff": float((fast - ref).abs().max()), "ref_max_abs": float(ref.abs().max()),
            "relative_diff": float((fast - ref).norm() / ref.norm())}


# --------------------------------------------------------------------------------------------------------------


def pick_size(requested: str, device: torch.device, work: Path) -> str:
    if requested != "auto":
        return requested
    free_disk = shutil.disk_usage(work).free
    gpu = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    return "full" if gpu >= 48e9 and free_disk >= 30e9 else "mid"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json (and the temporary weights)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, ...; cpu only for testing the script")
    parser.add_argument("--size", choices=("auto",) + tuple(SIZES), default="auto")
    parser.add_argument("--sizes", type=int, nargs=2, default=(1024, 2048), metavar=("BASE", "LARGE"),
                        help="the two image sizes in pixels (default 1024 2048)")
    parser.add_argument("--steps", type=int, default=5, help="timed CFG steps per dtype")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"SKIP gpu_check: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
              f"nothing measured")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "weights"
    work.mkdir(exist_ok=True)
    size = pick_size(args.size, device, out)
    dit_config, llama_shape = SIZES[size]
    base, large = args.sizes
    mem = Memory(device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "size": size, "timings_s": {}}
    start_all = time.perf_counter()
    try:
        start = time.perf_counter()
        dit_path, llama_dir = work / "dit_bf16.safetensors", work / "llama"
        gen_device = device if device.type == "cuda" else torch.device("cpu")
        write_dit(dit_config, dit_path, gen_device)
        write_llama(llama_shape, llama_dir, gen_device)
        result["timings_s"]["write weights"] = time.perf_counter() - start

        start = time.perf_counter()
        # The released model's 1024x1024 sequence on a GPU; a short one on the CPU, where only the code is tested.
        result["sdpa_backend"] = sdpa_backends(device, tokens=4160 if device.type == "cuda" else 128)
        result["gpu_bf16_vs_cpu_fp32"] = gpu_vs_cpu(device)
        result["timings_s"]["backends and accuracy"] = time.perf_counter() - start

        start = time.perf_counter()
        enc, cond, uncond = encode(llama_dir, torch.bfloat16, device)
        del enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
        step = {}
        for name, dtype in (("bf16", torch.bfloat16), ("fp8_e4m3fn", torch.float8_e4m3fn)):
            step[name] = seconds_per_step(dit_path, dtype, cond, uncond, base, args.steps, device, mem)
        result["seconds_per_cfg_step"] = {f"{base}x{base} {k}": v for k, v in step.items()}
        result["timings_s"]["step timing"] = time.perf_counter() - start

        start = time.perf_counter()
        peaks = {}
        for name, dtype, pixels in (("bf16", torch.bfloat16, base), ("bf16", torch.bfloat16, large),
                                    ("fp8_e4m3fn", torch.float8_e4m3fn, base)):
            peaks[f"{pixels}x{pixels} {name}"] = pipeline_peak(llama_dir, dit_path, dtype, pixels, device, mem)
        result["peak_memory_gb"] = peaks
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process RSS"
        result["timings_s"]["memory"] = time.perf_counter() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["timings_s"]["total"] = time.perf_counter() - start_all

    rows = [("device", result["device"]), ("model size", size), ("torch", result["torch"])]
    rows += [(f"s per CFG step, {k}", f"{v:.3f}") for k, v in result["seconds_per_cfg_step"].items()]
    rows += [(f"peak memory (GB) encode -> offload -> sample, {k}", f"{v:.2f}")
             for k, v in result["peak_memory_gb"].items()]
    rows += [(f"SDPA backend, {k}", v) for k, v in result["sdpa_backend"].items()]
    acc = result["gpu_bf16_vs_cpu_fp32"]
    rows.append(("small model, device bf16 vs CPU fp32",
                 f"max abs diff {acc['max_abs_diff']:.4f} (outputs up to {acc['ref_max_abs']:.2f}), "
                 f"relative {acc['relative_diff']:.4f}"))
    rows += [(f"time: {k}", f"{v:.0f} s") for k, v in result["timings_s"].items()]
    print("| quantity | value |\n| --- | --- |")
    for key, value in rows:
        print(f"| {key} | {value} |")
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
