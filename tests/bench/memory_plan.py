"""GPU memory plan of a Lumina-T2I generation, computed from the configuration (issue #7, item 6).

Every number printed is an ESTIMATE, to be measured on a GPU. Sources:
- weights: parameter counts of FlagDiT(FLAG_DIT_5B) (built on the meta device) and of LLaMA-2-7B's LlamaModel
  (vocab 32000, hidden 4096, FFN 11008, 32 layers; `lm_head` is never loaded: 13.2 GB, 13.5 GB with it), times the
  bytes per parameter of the storage dtype.
- DiT activations: the largest set of tensors alive at once inside one transformer block during an inference
  forward (no autograd), read off lumina_core/model.py and layers.py, with s = B*N*dim*2 bytes (one bf16 residual
  stream, B = 2 for cond + uncond, N = (H/16)*(W/16 + 1) tokens). SDPA is assumed to use a fused kernel (flash /
  memory-efficient: no N x N matrix); the materialised matrix of a math fallback is shown for contrast.
  Unless --quick, the analytic count is checked by running one 5B-width block in bf16 on the CPU at small latent
  sizes (peak RSS above the inputs, in units of s), and the larger of the two is used.
- text K/V cache (TextContext): 32 layers x (K, V) x B x T x n_kv_heads*head_dim in bf16.
- SDXL VAE decode: ComfyUI's own budget for AutoencoderKL decoding, 2178 * h * w * 64 * dtype_size bytes (h, w the
  latent size; `comfy/sd.py` VAE.memory_used_decode), which its memory manager reserves before decoding and beyond
  which it decodes in tiles.
- CUDA context and allocator slack: a flat 0.5 GB and 10% of the activations (assumed).

    python tests/bench/memory_plan.py [--text-tokens 128] [--sizes 1024 2048] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import REPO, seq_len, table  # noqa: E402

from lumina_core.models.config import FLAG_DIT_5B, FlagDiTConfig  # noqa: E402
from lumina_core.models.flag_dit import FlagDiT  # noqa: E402

GB = 1e9
BF16 = 2
FP8 = 1
CONTEXT = 0.5 * GB  # CUDA context, cuBLAS workspaces (assumed)
SLACK = 0.10  # caching-allocator fragmentation on the activations (assumed)

# LLaMA-2-7B as LlamaModel (what lumina_core.text.llama loads).
LLAMA = dict(vocab=32000, hidden=4096, ffn=11008, layers=32)


def llama_params(with_lm_head: bool = False) -> int:
    h, f, n, v = LLAMA["hidden"], LLAMA["ffn"], LLAMA["layers"], LLAMA["vocab"]
    per_layer = 4 * h * h + 3 * h * f + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
    return v * h + n * per_layer + h + (v * h if with_lm_head else 0)


def llama_layer_bytes(dtype_bytes: int) -> int:
    h, f = LLAMA["hidden"], LLAMA["ffn"]
    return (4 * h * h + 3 * h * f + 2 * h) * dtype_bytes


def dit_params(cfg: FlagDiTConfig) -> tuple[int, int]:
    """(all parameters, parameters of one transformer block)."""
    with torch.device("meta"):
        model = FlagDiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.layers[0].parameters())
    return total, block


# One 5B-width block in bf16 on the CPU, in a fresh process whose freed tensors go straight back to the system
# (glibc mmap threshold 64 kB), so the peak RSS above the inputs is the peak of live activations.
BLOCK_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch
from lumina_core.models.config import FLAG_DIT_5B as cfg
from lumina_core.models.flag_dit import TransformerBlock
from lumina_core.models.layers import rope_cos_sin

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

latent, T, B, dt = int(sys.argv[2]), int(sys.argv[3]), 2, torch.bfloat16
N = (latent // 2) * (latent // 2 + 1)
with torch.no_grad():
    block = TransformerBlock(cfg, dtype=dt)
    for p in block.parameters():
        p.normal_(0, 0.02)
    x = torch.randn(B, N, cfg.dim, dtype=dt)
    c = torch.randn(B, cfg.adaln_dim, dtype=dt)
    cos, sin = rope_cos_sin(N, cfg.head_dim)
    text_k, text_v = block.text_kv(torch.randn(B, T, cfg.cap_feat_dim, dtype=dt))
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    base = rss()
    out = block(x, c, cos, sin, cfg.head_dim ** -0.5, text_k, text_v, mask)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"N": N, "above_inputs": peak - base, "s": B * N * cfg.dim * 2}))
"""


def measure_block(latent: int, text_tokens: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", BLOCK_CHILD, str(REPO), str(latent), str(text_tokens)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def block_activation_terms(cfg: FlagDiTConfig, batch: int, tokens: int) -> list[tuple[str, float]]:
    """Peak live tensors of one block, in units of s = batch*tokens*dim*2 bytes, at its two high-water marks.

    Attention, while the keys are rotated (Attention.forward): residual x (1) + modulated input h (1) + q rotated,
    back in bf16 (1) + k after its fp32 LayerNorm (2) + v (1) + apply_rope's fp32 temporaries: the two products of
    a half (2 x 0.5 x 2), their difference and sum (2 x 0.5 x 2), the stacked result (2) = 10.
    Feed-forward (FeedForward.forward): x (1) + h (1) + silu(w1 h) (r) + w3 h (r) + their product (r), with
    r = ffn_hidden_dim/dim (8192/3072 = 2.67 for the 5B): 2 + 3r = 10.
    RMSNorm (layers.RMSNorm): x (1) + two fp32 copies x.float() (2 + 2) + the fp32 square (2) = 7.
    """
    r = cfg.ffn_hidden_dim / cfg.dim
    return [("attention (q, k fp32 LayerNorm, RoPE temporaries)", 10.0), ("feed-forward (3 hidden tensors)", 2 + 3 * r),
            ("RMSNorm fp32 temporaries", 7.0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the CPU measurement of one block's activations")
    parser.add_argument("--measure-latents", type=int, nargs="+", default=[32, 64],
                        help="latent sizes of the CPU check of one 5B block's peak activations (bf16)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="square image sizes in pixels")
    parser.add_argument("--text-tokens", type=int, default=128, help="caption length incl. BOS/EOS (padded batch)")
    args = parser.parse_args()

    cfg = FLAG_DIT_5B
    n_params, block_params = dit_params(cfg)
    llama = llama_params()
    batch, T = 2, args.text_tokens
    kv_dim = cfg.kv_heads * cfg.head_dim
    dit_bf16 = n_params * BF16
    dit_fp8 = n_params * FP8
    llama_bf16 = llama * BF16
    vae_params = 83_653_863  # SDXL VAE (encoder + decoder), as in the published file
    vae_w = vae_params * BF16

    print("Lumina-T2I GPU memory plan: ALL NUMBERS ARE ESTIMATES computed from the configuration, to be measured on a "
          "GPU.\n")
    print(table(["weights", "params", "GB (estimate)"], [
        ["Flag-DiT 5B, bf16", f"{n_params:,}", f"{dit_bf16 / GB:.2f}"],
        ["Flag-DiT 5B, fp8 storage (bf16 compute, cast per layer)", "", f"{dit_fp8 / GB:.2f}"],
        ["one Flag-DiT block, bf16 (the unit of partial loading)", f"{block_params:,}",
         f"{block_params * BF16 / GB:.3f}"],
        ["LLaMA-2-7B LlamaModel, bf16 (lm_head not loaded)", f"{llama:,}", f"{llama_bf16 / GB:.2f}"],
        ["LLaMA-2-7B with lm_head, bf16 (for comparison)", f"{llama_params(True):,}",
         f"{llama_params(True) * BF16 / GB:.2f}"],
        ["one LLaMA decoder layer, bf16", "", f"{llama_layer_bytes(BF16) / GB:.3f}"],
        ["SDXL VAE, bf16", f"{vae_params:,}", f"{vae_w / GB:.2f}"],
    ]))

    analytic = max(u for _, u in block_activation_terms(cfg, batch, 1))
    measured = None
    if not args.quick:
        checks = []
        for lat in args.measure_latents:
            m = measure_block(lat, T)
            units = 1 + m["above_inputs"] / m["s"]  # + 1: the block's input x is live throughout
            checks.append([f"{lat * 8}x{lat * 8}", m["N"], f"{m['s'] / 1e6:.1f} MB", f"{units:.1f} s",
                           f"{analytic:.1f} s"])
            measured = max(measured or 0.0, units)
        print("\nCheck of the per-block activation model: one 5B-width block (dim 3072, FFN 8192) in bf16 on the CPU, "
              "peak RSS above its inputs (fresh process, glibc returns freed tensors at once):\n")
        print(table(["image", "tokens N", "s", "measured peak, input x included", "analytic estimate"], checks))
    units_used = max(analytic, measured or 0.0)

    act, rows = {}, []
    for size in args.sizes:
        lh = size // 8
        N = seq_len(cfg, lh, lh)
        s = batch * N * cfg.dim * BF16
        terms = block_activation_terms(cfg, batch, N)
        dit_act = units_used * s * (1 + SLACK)
        text_kv = cfg.n_layers * 2 * batch * T * kv_dim * BF16
        vae_dec = 2178 * lh * lh * 64 * BF16
        vae_tiled = 2178 * 64 * 64 * 64 * BF16  # ComfyUI's tiled decode, 512x512-pixel tiles
        math_attn = batch * cfg.n_heads * N * N * BF16 * 2  # scores + softmax output, one layer
        act[size] = dict(N=N, s=s, dit=dit_act, kv=text_kv, vae=vae_dec, vae_tiled=vae_tiled, math=math_attn)
        rows.append([f"{size}x{size}", N, f"{s / GB:.3f}", " / ".join(f"{u:.1f}" for _, u in terms),
                     f"{dit_act / GB:.2f}", f"{text_kv * 1e3 / GB:.0f} MB", f"{vae_dec / GB:.2f}",
                     f"{math_attn / GB:.1f}"])
    print(f"\nActivations, batch 2 (cfg), bf16, SDPA without a materialised attention matrix, {T} text tokens:\n")
    print(table(["image", "tokens N", "s = B*N*dim*2 (GB)", "block peaks in s: attention / FFN / RMSNorm",
                 f"DiT activations ({units_used:.1f} s + 10%)", "text K/V cache (32 layers)",
                 "SDXL VAE decode (ComfyUI budget)",
                 "if attention were materialised (one layer)"], rows))

    def gb(x):
        return f"{x / GB:.1f}"

    plan = []
    for size in args.sizes:
        a = act[size]
        sampling_extra = a["dit"] + a["kv"]
        encode = 0.2 * GB  # LLaMA activations for a ~128-token prompt, batch 2 (small)
        # 1. everything resident.
        all_gpu = CONTEXT + dit_bf16 + llama_bf16 + vae_w + max(sampling_extra, a["vae"])
        # 2. encoder offloaded after encoding: three phases, the peak is the largest.
        #    At decode time the memory manager evicts the DiT if the VAE reservation does not fit beside it, so the
        #    decode phase counts the VAE alone (keeping the DiT resident adds its weights when there is room).
        ph = dict(encode=CONTEXT + llama_bf16 + encode, sample=CONTEXT + dit_bf16 + sampling_extra,
                  decode=CONTEXT + vae_w + a["vae"])
        # 3. fp8 DiT, encoder offloaded; one Linear is cast to bf16 at a time (w1: 8192 x 3072).
        cast = cfg.ffn_hidden_dim * cfg.dim * BF16
        ph8 = dict(encode=ph["encode"], sample=CONTEXT + dit_fp8 + cast + sampling_extra,
                   decode=CONTEXT + vae_w + a["vae"])
        # 3b. fp8 DiT and fp8 LLaMA (linear weights fp8, embedding and norms bf16; one layer's largest matrix
        #     cast to bf16 at a time), encoder offloaded.
        h, f_ = LLAMA["hidden"], LLAMA["ffn"]
        llama_fp8 = (llama - LLAMA["vocab"] * h) * FP8 + LLAMA["vocab"] * h * BF16
        ph88 = dict(encode=CONTEXT + llama_fp8 + h * f_ * BF16 + encode, sample=ph8["sample"], decode=ph8["decode"])
        # 3c. saved encodings: no text encoder is loaded at all.
        saved = dict(sample=ph8["sample"], decode=ph8["decode"])
        # 4. low VRAM: nothing resident but what the step needs: one block (DiT) or one layer (LLaMA) in flight,
        #    double-buffered; the VAE decodes in tiles.
        low = dict(encode=CONTEXT + 2 * llama_layer_bytes(BF16) + LLAMA["vocab"] * LLAMA["hidden"] * BF16 + encode,
                   sample=CONTEXT + 2 * block_params * BF16 + sampling_extra,
                   decode=CONTEXT + vae_w + a["vae_tiled"])
        plan.append([f"{size}x{size}", "all on GPU (bf16 DiT + LLaMA + VAE resident)", "-", "-", "-",
                     f"**{gb(all_gpu)}**"])
        for label, phases in (("encoder offloaded after encoding (ComfyUI memory manager)", ph),
                              ("fp8 DiT, encoder offloaded", ph8),
                              ("fp8 DiT + fp8 encoder, encoder offloaded", ph88),
                              ("saved encodings + fp8 DiT (no text encoder)", saved),
                              ("low-VRAM partial loading (minimum: one block / layer in flight, tiled VAE)", low)):
            plan.append([f"{size}x{size}", label, gb(phases["encode"]) if "encode" in phases else "-",
                         gb(phases["sample"]), gb(phases["decode"]),
                         f"**{gb(max(phases.values()))}**"])
    print("\nPeak GPU memory per setting (GB, ESTIMATES to be measured on a GPU; includes 0.5 GB CUDA context):\n")
    print(table(["image", "setting", "encode phase", "sampling phase", "VAE decode phase", "peak"], plan))

    n_stream = dit_bf16
    print(f"\nNotes (estimates):\n"
          f"- SPEC §7 reports about 49 GB for the original demo with all models on one GPU; the all-on-GPU row is "
          f"this pack's estimate for bf16 weights and fused SDPA, to be compared with a measurement.\n"
          f"- Decode phases count the VAE alone: ComfyUI evicts the DiT when the VAE reservation does not fit "
          f"beside it (add the DiT's weights where it stays resident).\n"
          f"- With the encoder offloaded, LLaMA-2-7B ({gb(llama_bf16)} GB) sets the peak, not the DiT: an fp8 or "
          f"partially loaded text encoder is what lowers it further.\n"
          f"- Low-VRAM streaming moves the non-resident weights over PCIe at every model evaluation: "
          f"{gb(n_stream)} GB bf16 at ~25 GB/s (PCIe 4 x16) is ~{n_stream / 25e9:.2f} s per evaluation, against a "
          f"compute floor of ~0.12 s per step on an H100 (SPEC §7); fp8 storage halves the transfer.\n"
          f"- The VAE row is ComfyUI's reservation, not a measurement; beyond it ComfyUI decodes in 512x512 tiles "
          f"(budget {act[args.sizes[0]]['vae_tiled'] / GB:.2f} GB).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
