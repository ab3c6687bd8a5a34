"""What fp8 weight storage costs in accuracy: relative error of fp8 against bf16 (and of both against fp32).

A mid-size random Flag-DiT (the 5B architecture at dim 1024, 8 layers, cap_feat_dim 4096) is written as an fp32
file and loaded through `load_flag_dit` in fp32, bf16, fp8_e4m3fn and fp8_e5m2 (fp8 computes in bf16 here when the
CPU has bf16, as on a GPU). Measured: the velocity of one forward (512x512, cfg batch of 2, 40 text tokens) and the
latent after a few Euler steps with cfg 4. A small random LLaMA (hidden 1024) gives the text-feature error.
Relative error = ||a - b|| / ||b||. Random weights: trained weights have other distributions, so treat these as
the order of magnitude, not the released model's figure.

    python tests/bench/bench_fp8_error.py [--steps 4] [--size 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import MID, build_model, random_text, table  # noqa: E402

from lumina_core.dtypes import compute_dtype_for as fp8_compute_dtype  # noqa: E402
from lumina_core.generation import sample  # noqa: E402
from lumina_core.sampling.schedule import make_noise  # noqa: E402
from lumina_core.text.llama import LlamaTextEncoder  # noqa: E402
from lumina_core.tiny import make_tiny_llama_folder  # noqa: E402
from lumina_core.weights.dit_files import load_flag_dit, save_flag_dit  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn,
          "fp8_e5m2": torch.float8_e5m2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    latent = args.size // 8

    with tempfile.TemporaryDirectory(prefix="lumina_fp8_") as tmp:
        path = Path(tmp) / "mid.safetensors"
        save_flag_dit(build_model(MID, seed=0), path)
        feats, mask = random_text(2, 40, MID.cap_feat_dim, seed=1)
        x = torch.randn(2, 4, latent, latent, generator=torch.Generator().manual_seed(2))
        t = torch.tensor([0.3, 0.3])
        cond, uncond = (feats[:1], mask[:1]), (feats[1:], mask[1:])
        velocity, final = {}, {}
        for name, dtype in DTYPES.items():
            model = load_flag_dit(path, dtype=dtype)
            with torch.no_grad():
                velocity[name] = model(x, t, feats, mask)
                final[name] = sample(model, make_noise(0, (1, 4, latent, latent)), cond, uncond, steps=args.steps,
                                     cfg=4.0, shift=4.0)
            del model

        llama = make_tiny_llama_folder(Path(tmp) / "llama", hidden_size=1024, n_layers=4)
        prompts = ["a photo of an astronaut riding a horse on the moon", ""]
        features = {}
        for name, dtype in DTYPES.items():
            enc = LlamaTextEncoder.from_folder(llama, dtype=dtype)
            f, m = enc.encode(prompts)
            features[name] = f[m]
            del enc

    rows = []
    for name in DTYPES:
        if name == "fp32":
            continue
        rows.append([
            name,
            f"{rel(velocity[name], velocity['bf16']):.4f}" if name != "bf16" else "-",
            f"{rel(velocity[name], velocity['fp32']):.4f}",
            f"{rel(final[name], final['bf16']):.4f}" if name != "bf16" else "-",
            f"{rel(final[name], final['fp32']):.4f}",
            f"{rel(features[name], features['bf16']):.4f}" if name != "bf16" else "-",
            f"{rel(features[name], features['fp32']):.4f}",
            str(bool(velocity[name].isfinite().all() and final[name].isfinite().all()
                     and features[name].isfinite().all())),
        ])
    print(f"Flag-DiT dim {MID.dim}, {MID.n_layers} layers (random), {args.size}x{args.size}, {args.steps} Euler "
          f"steps at cfg 4; LLaMA hidden 1024, 4 layers (random); fp8 computed in "
          f"{str(fp8_compute_dtype('cpu')).replace('torch.', '')}; torch {torch.__version__}\n")
    print(table(["weights", "velocity vs bf16", "velocity vs fp32", f"latent after {args.steps} steps vs bf16",
                 "latent vs fp32", "LLaMA features vs bf16", "features vs fp32", "finite"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
