"""`python -m lumina_core demo`: the whole Lumina-T2I pipeline from the command line.

With no model paths it is a smoke test: a tiny Flag-DiT and a tiny LLaMA with random weights are written to a
temporary folder and loaded back through the real loaders, so every stage runs in seconds on a CPU (the picture is
meaningless). With --dit and --llama it runs the released model the same way. It writes the latent as a `.latent`
file that ComfyUI's LoadLatent node reads (put it in ComfyUI/input, then VAEDecode with the SDXL VAE) and a preview
PNG made with the SDXL latent-to-RGB approximation.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import DTYPES, load_flag_dit
from .latent import latent_to_rgb, to_vae_space
from .sampling import EXTRAPOLATIONS, GUIDANCE_MODES, SOLVERS, make_noise, sample
from .text_encoder import LlamaTextEncoder, check_cap_feat_dim

DEFAULT_PROMPT = "a fluffy mouse holding a watermelon, in a magical and colorful setting"


def _out(message: str):
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def add_demo_parser(sub):
    p = sub.add_parser(
        "demo",
        help="generate one image latent (a smoke test with random tiny models unless --dit/--llama are given)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dit", help="Flag-DiT checkpoint (.safetensors), e.g. lumina_t2i_5b_bf16.safetensors")
    p.add_argument("--llama", help="LLaMA-2-7B Hugging Face folder (config.json, tokenizer, weights)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative", default="", help='negative prompt (the original uses "")')
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default 1024; smoke test 256)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default 1024; smoke test 256)")
    p.add_argument("--steps", type=int, default=None, help="solver steps (default 30; smoke test 8)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--shift", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--solver", choices=SOLVERS, default="euler")
    p.add_argument("--extrapolation", choices=EXTRAPOLATIONS, default="t2i")
    p.add_argument("--guidance", choices=GUIDANCE_MODES, default="faithful")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default="output", help="folder for lumina_demo.latent and lumina_demo_preview.png")
    p.set_defaults(func=run_demo)
    return p


def write_png(path: Path, rgb: torch.Tensor):
    """Write an [H, W, 3] uint8 tensor as an RGB PNG."""
    from PIL import Image

    Image.fromarray(rgb.contiguous().numpy()).save(path, format="PNG")


def save_latent_file(path: Path, raw_latent: torch.Tensor):
    """A `.latent` file as ComfyUI's SaveLatent writes it: raw VAE latents plus the format marker."""
    from safetensors.torch import save_file

    save_file(
        {"latent_tensor": raw_latent.detach().float().cpu().contiguous(), "latent_format_version_0": torch.tensor([])},
        str(path),
    )


def _resolve(args):
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = DTYPES[args.dtype]
    return device, dtype


def run_demo(args) -> int:
    smoke = args.dit is None and args.llama is None
    if (args.dit is None) != (args.llama is None):
        _out("error: give both --dit and --llama (or neither, for the smoke test)")
        return 2
    width = args.width or (256 if smoke else 1024)
    height = args.height or (256 if smoke else 1024)
    steps = args.steps or (8 if smoke else 30)
    bad = [f"{name} {v}" for name, v in (("width", width), ("height", height)) if v % 16 or v < 32]
    if bad:
        _out(f"error: {', '.join(bad)}: sizes must be multiples of 16 and at least 32 pixels")
        return 2
    device, dtype = _resolve(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []

    def stage(name, start):
        timings.append((name, time.perf_counter() - start))

    tmp = None
    if smoke:
        from .tiny import write_tiny_flag_dit, write_tiny_llama_folder

        _out("SMOKE TEST: tiny Flag-DiT and tiny LLaMA with RANDOM weights; the picture is noise-like by design.")
        _out("Pass --dit PATH --llama PATH to run the released Lumina-T2I model.")
        tmp = tempfile.TemporaryDirectory(prefix="lumina_demo_")
        start = time.perf_counter()
        llama_path = write_tiny_llama_folder(Path(tmp.name) / "tiny-llama")
        dit_path = write_tiny_flag_dit(Path(tmp.name) / "tiny_flag_dit.safetensors")
        stage("write tiny models", start)
    else:
        llama_path, dit_path = Path(args.llama), Path(args.dit)

    try:
        start = time.perf_counter()
        encoder = LlamaTextEncoder.from_folder(llama_path, dtype=dtype, device=device)
        stage("load text encoder", start)
        start = time.perf_counter()
        cond = encoder.encode([args.prompt], output_device=device)
        uncond = encoder.encode([args.negative], output_device=device)
        hidden = encoder.hidden_size
        stage("encode prompts", start)
        # The encoder is not needed any more: free its memory before the DiT arrives.
        del encoder
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        start = time.perf_counter()
        dit = load_flag_dit(dit_path, dtype=dtype, device=device)
        check_cap_feat_dim(hidden, dit.config.cap_feat_dim, encoder_name=str(llama_path), dit_name=str(dit_path))
        stage("load Flag-DiT", start)

        start = time.perf_counter()
        noise = make_noise(args.seed, (1, 4, height // 8, width // 8)).to(device)
        latent = sample(
            dit, noise, cond, uncond, steps=steps, cfg=args.cfg, shift=args.shift, solver=args.solver,
            extrapolation=args.extrapolation, guidance=args.guidance,
        )
        stage(f"sample ({steps} {args.solver} steps, {width}x{height})", start)
    finally:
        if tmp is not None:
            tmp.cleanup()

    start = time.perf_counter()
    latent_path = out_dir / "lumina_demo.latent"
    png_path = out_dir / "lumina_demo_preview.png"
    save_latent_file(latent_path, to_vae_space(latent))
    # One latent cell is 8x8 pixels: enlarge the preview to the image size.
    write_png(png_path, latent_to_rgb(latent)[0].repeat_interleave(8, 0).repeat_interleave(8, 1))
    stage("write outputs", start)

    _out(f"device {device}, dtype {str(dtype).replace('torch.', '')}, seed {args.seed}, cfg {args.cfg}, "
         f"shift {args.shift}, extrapolation {args.extrapolation}")
    for name, seconds in timings:
        _out(f"  {name:<40s} {seconds:8.2f} s")
    _out(f"latent: {latent_path} (copy it into ComfyUI/input and use LoadLatent -> VAEDecode with the SDXL VAE)")
    _out(f"preview: {png_path} ({width}x{height}, SDXL latent-to-RGB approximation, one colour per 8x8 cell)")
    return 0
