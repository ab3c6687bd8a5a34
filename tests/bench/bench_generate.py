"""`python -m lumina_core generate` against the sum of its stages, each run on its own through the core.

The command loads the text encoder, the Flag-DiT and the SDXL VAE, encodes the prompt and the negative prompt,
samples, decodes and writes PNGs with their metadata. Each of those stages is also timed alone, calling the core
directly (LlamaTextEncoder.from_folder, load_flag_dit, load_sdxl_vae, encode, sample, vae decode, Pillow save), and
the table shows the command's time over the sum of the stage times: above 1 is what the pipeline and the command
add (argument checks, moving tensors, the progress bar). Timings are medians of interleaved repeats in one process,
so on a shared machine compare the ratios, not the seconds.

Configs (random weights, written like the released files, fp32 on the CPU, 2 images):
- tiny: the test models (Flag-DiT dim 64, LLaMA hidden 32) and an SDXL-shaped VAE of widths 32-64;
- small: Flag-DiT dim 512, 4 layers; LLaMA hidden 256, 4 layers; the VAE in the released shapes (128-512 wide,
  read through the packaged SDXL configuration).

Needs diffusers (pip install ".[pipeline]").

    python tests/bench/bench_generate.py [--config tiny|small|both] [--size 256] [--steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import add_timing_args, apply_timing_args, interleaved, median, table, timed  # noqa: E402

from lumina_core.__main__ import main  # noqa: E402
from lumina_core.generate import png_info  # noqa: E402
from lumina_core.generation import sample  # noqa: E402
from lumina_core.image.latent import to_vae_space  # noqa: E402
from lumina_core.image.vae import decode, load_sdxl_vae, to_pil  # noqa: E402
from lumina_core.sampling.schedule import make_noise  # noqa: E402
from lumina_core.text.llama import LlamaTextEncoder  # noqa: E402
from lumina_core.tiny import TINY_VAE_WIDTHS, make_tiny_llama_folder, write_tiny_flag_dit, write_tiny_sdxl_vae  # noqa: E402
from lumina_core.weights.dit_files import load_flag_dit  # noqa: E402

CONFIGS = {
    "tiny": {"dit": {}, "llama": {"hidden_size": 32, "n_layers": 2}, "vae": TINY_VAE_WIDTHS},
    "small": {"dit": {"dim": 512, "n_layers": 4, "n_heads": 8, "cap_feat_dim": 256},
              "llama": {"hidden_size": 256, "n_layers": 4}, "vae": (128, 256, 512, 512)},
}
PROMPT = "a fluffy mouse holding a watermelon, in a magical and colorful setting"
NEGATIVE = "blurry"
BATCH = 2


def write_models(folder: Path, config: dict) -> dict:
    cap = config["llama"]["hidden_size"]
    dit = write_tiny_flag_dit(folder / "dit.safetensors", 0, **{"cap_feat_dim": cap, **config["dit"]})
    llama = Path(make_tiny_llama_folder(folder / "llama", **config["llama"]))
    vae, _ = write_tiny_sdxl_vae(folder / "sdxl_vae.safetensors", widths=config["vae"])
    return {"dit": dit, "llama": llama, "vae": vae}


def run_config(name: str, size: int, steps: int, repeats: int) -> list:
    config = CONFIGS[name]
    tmp = Path(tempfile.mkdtemp(prefix="lumina_bench_generate_"))
    try:
        paths = write_models(tmp, config)
        out = tmp / "out"
        argv = ["generate", "--dit", str(paths["dit"]), "--llama", str(paths["llama"]), "--vae", str(paths["vae"]),
                "--prompt", PROMPT, "--negative", NEGATIVE, "--width", str(size), "--height", str(size),
                "--steps", str(steps), "--seed", "1", "--batch", str(BATCH), "--dtype", "fp32", "--device", "cpu",
                "--out", str(out)]
        state = {}

        def command():
            shutil.rmtree(out, ignore_errors=True)
            with contextlib.redirect_stdout(io.StringIO()):  # its summary lines
                assert main(argv) == 0

        def load_encoder():
            state["encoder"] = LlamaTextEncoder.from_folder(paths["llama"], dtype=torch.float32)

        def load_dit():
            state["dit"] = load_flag_dit(paths["dit"], dtype=torch.float32)

        def load_vae():
            state["vae"] = load_sdxl_vae(paths["vae"])

        def encode():
            enc = state["encoder"]
            state["text"] = (enc.encode([PROMPT]), enc.encode([NEGATIVE]))

        def sampling():
            cond, uncond = state["text"]
            noise = make_noise(1, (BATCH, 4, size // 8, size // 8))
            state["raw"] = to_vae_space(sample(state["dit"], noise, cond, uncond, steps=steps, cfg=4.0, shift=4.0))

        def decoding():
            state["pixels"] = decode(state["vae"], state["raw"])

        def write():
            folder = tmp / "stage_png"
            folder.mkdir(exist_ok=True)
            settings = {"prompt": PROMPT, "negative": NEGATIVE, "steps": steps, "cfg": 4.0, "seed": 1, "batch": BATCH,
                        "width": size, "height": size, "shift": 4.0, "solver": "euler", "extrapolation": "t2i",
                        "guidance": "faithful", "dit": "dit", "llama": "llama", "vae": "vae", "dtype": "fp32"}
            for i, image in enumerate(to_pil(state["pixels"])):
                image.save(folder / f"{i}.png", pnginfo=png_info({**settings, "batch_index": i}))

        # Stages in order inside one function per stage; the interleaving alternates the command with them.
        stages = {"load text encoder": load_encoder, "load Flag-DiT": load_dit, "load VAE": load_vae,
                  "encode prompts": encode, "sample": sampling, "decode": decoding, "write PNGs": write}

        def all_stages():
            for name, fn in stages.items():
                state.setdefault("times", {}).setdefault(name, []).append(timed(fn))

        times = interleaved({"command": command, "stages": all_stages}, repeats)
        stage_times = {n: median(ts[-repeats:]) for n, ts in state["times"].items()}
        whole = median(times["command"])
        total = sum(stage_times.values())
        split = ", ".join(f"{n} {t / total:.0%}" for n, t in stage_times.items())
        return [name, f"{size}x{size}", steps, f"{whole:.2f}", f"{total:.2f}", f"{whole / total:.3f}", split]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main_bench() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "small", "both"), default="both")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    add_timing_args(parser)
    args = parser.parse_args()
    print(apply_timing_args(args))
    names = ("tiny", "small") if args.config == "both" else (args.config,)
    rows = [run_config(n, args.size, args.steps, args.repeats) for n in names]
    print(table(["config", "size", "steps", "command (s)", "sum of stages (s)", "command / stages",
                 "stage shares"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
