"""`python -m lumina_core generate`: text to PNG files with the released models, through LuminaT2IPipeline.

Each PNG carries its settings in PNG text chunks: "parameters" (one readable block: prompt, negative prompt,
steps, cfg, seed, size, models) and "prompt", the equivalent ComfyUI API graph of this pack's nodes (as ComfyUI's
SaveImage stores the graph that made an image), so dropping the PNG on ComfyUI rebuilds the generation. Files are
numbered after the ones already in the output folder; nothing is overwritten.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from .dtypes import DTYPES
from .models.flag_dit import EXTRAPOLATIONS
from .sampling.guidance import GUIDANCE_MODES
from .sampling.solvers import SOLVERS


def _out(message: str):
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def add_generate_parser(sub):
    p = sub.add_parser(
        "generate",
        help="generate PNG images from a prompt with the Flag-DiT, LLaMA-2-7B and the SDXL VAE (needs diffusers)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dit", required=True, help="Flag-DiT checkpoint, e.g. lumina_t2i_5b_bf16.safetensors")
    p.add_argument("--llama", required=True, help="LLaMA-2-7B Hugging Face folder (config.json, tokenizer, weights)")
    p.add_argument("--vae", required=True, help="sdxl_vae.safetensors (stabilityai/sdxl-vae)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help='negative prompt (the original uses "")')
    p.add_argument("--width", type=int, default=1024, help="pixels, multiple of 16")
    p.add_argument("--height", type=int, default=1024, help="pixels, multiple of 16")
    p.add_argument("--steps", type=int, default=30, help="solver steps (the original demo's 30 points = 29 steps)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale; 1 skips the negative prompt")
    p.add_argument("--seed", type=int, default=1, help="the Lumina Sampler node's noise for this seed")
    p.add_argument("--batch", type=int, default=1, help="images of the prompt, generated as one batch")
    p.add_argument("--shift", type=float, default=4.0)
    p.add_argument("--solver", choices=SOLVERS, default="euler")
    p.add_argument("--extrapolation", choices=EXTRAPOLATIONS, default="t2i")
    p.add_argument("--guidance", choices=GUIDANCE_MODES, default="faithful")
    p.add_argument("--dtype", choices=("auto",) + tuple(DTYPES), default="auto", help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--offload", action="store_true", help="keep each model on the GPU only while it runs")
    p.add_argument("--name", default="lumina", help="file name prefix (letters, digits, - and _)")
    p.add_argument("--save-latent", action="store_true", help="also write each image's raw latent as a .latent file "
                   "(ComfyUI's LoadLatent reads it)")
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.set_defaults(func=run_generate)
    return p


def resolve_device_dtype(device_arg: str, dtype_arg: str) -> tuple[torch.device, torch.dtype]:
    """"auto" device: cuda when available, else cpu; "auto" dtype: bf16 on cuda, fp32 on the CPU."""
    if device_arg == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
    if dtype_arg == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, DTYPES[dtype_arg]


def next_free_paths(folder: Path, prefix: str, count: int) -> list[Path]:
    """`count` names prefix_00001.png, ... numbered after the highest number already in `folder`."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.(png|latent)$")
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    start = max(numbers, default=0) + 1
    return [folder / f"{prefix}_{start + i:05d}.png" for i in range(count)]


def parameters_text(s: dict) -> str:
    """The readable settings block ("parameters"): prompt, negative prompt, then one line of settings."""
    return (
        f"{s['prompt']}\nNegative prompt: {s['negative']}\n"
        f"Steps: {s['steps']}, Sampler: {s['solver']}, CFG scale: {s['cfg']}, Seed: {s['seed']}, "
        f"Batch index: {s['batch_index']}, Size: {s['width']}x{s['height']}, Shift: {s['shift']}, "
        f"Extrapolation: {s['extrapolation']}, Guidance: {s['guidance']}, Model: {s['dit']}, "
        f"Text encoder: {s['llama']}, VAE: {s['vae']}, Dtype: {s['dtype']}"
    )


def comfy_prompt(s: dict) -> dict:
    """The ComfyUI API graph of this pack's nodes that generates the same batch (same seed, so the same noise)."""
    dtype = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}.get(s["dtype"], "auto")
    return {
        "1": {"class_type": "LuminaFlagDiTLoader", "inputs": {"dit_name": s["dit"], "weight_dtype": dtype}},
        "2": {"class_type": "LuminaLlamaLoader", "inputs": {"llama_folder": s["llama"], "dtype": dtype}},
        "3": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["2", 0], "text": s["prompt"]}},
        "4": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["2", 0], "text": s["negative"]}},
        "5": {"class_type": "LuminaEmptyLatent", "inputs": {"resolution": "custom", "width": s["width"],
                                                             "height": s["height"], "batch_size": s["batch"]}},
        "6": {"class_type": "LuminaSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": s["seed"], "steps": s["steps"], "cfg": s["cfg"], "solver": s["solver"], "shift": s["shift"],
            "denoise": 1.0, "extrapolation": s["extrapolation"], "guidance": s["guidance"]}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": s["vae"]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "Lumina"}},
    }


def png_info(settings: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(settings))
    info.add_text("prompt", json.dumps(comfy_prompt(settings)))
    return info


def run_generate(args) -> int:
    from .image.vae import import_autoencoder_kl
    from .pipeline import LuminaT2IPipeline, size_error

    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        _out(f"error: --name {args.name!r}: use letters, digits, - and _ only")
        return 2
    problem = size_error(args.width, args.height)
    if problem:
        _out(f"error: {problem}")
        return 2
    if args.batch < 1 or args.steps < 1:
        _out(f"error: --batch {args.batch} and --steps {args.steps} must be at least 1")
        return 2
    try:
        import_autoencoder_kl()  # before minutes of loading: the PNGs need the VAE
    except ImportError as err:
        _out(f"error: {err}")
        return 2
    for flag, path, kind in (("--dit", args.dit, "file"), ("--llama", args.llama, "folder"), ("--vae", args.vae, "file")):
        p = Path(path)
        if not (p.is_file() if kind == "file" else p.is_dir()):
            _out(f"error: {flag} {path}: no such {kind}")
            return 2
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    pipe = LuminaT2IPipeline.from_files(dit=args.dit, text_encoder=args.llama, vae=args.vae, torch_dtype=dtype)
    if args.offload:
        pipe.enable_model_cpu_offload(device=device if device.type != "cpu" else None)
    else:
        pipe.to(device)
    pipe.load_vae()  # now rather than at the first decode, so that its time counts as loading
    loaded = time.perf_counter()
    raw = pipe(
        args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.cfg,
        height=args.height, width=args.width, num_images_per_prompt=args.batch, seed=args.seed, solver=args.solver,
        shift=args.shift, extrapolation=args.extrapolation, guidance=args.guidance, output_type="latent",
    ).images
    sampled = time.perf_counter()
    images = pipe.decode_latents(raw)
    decoded = time.perf_counter()

    settings = {
        "prompt": args.prompt, "negative": args.negative, "steps": args.steps, "cfg": args.cfg, "seed": args.seed,
        "batch": args.batch, "width": args.width, "height": args.height, "shift": args.shift, "solver": args.solver,
        "extrapolation": args.extrapolation, "guidance": args.guidance, "dit": Path(args.dit).name,
        "llama": Path(args.llama).name, "vae": Path(args.vae).name,
        "dtype": {v: k for k, v in DTYPES.items()}[dtype],
    }
    paths = next_free_paths(out_dir, args.name, len(images))
    for i, (image, path) in enumerate(zip(images, paths)):
        image.save(path, pnginfo=png_info({**settings, "batch_index": i}))
        if args.save_latent:
            from .demo import save_latent_file

            save_latent_file(path.with_suffix(".latent"), raw[i : i + 1])
    _out(f"device {device}, dtype {settings['dtype']}, seed {args.seed}, {args.steps} {args.solver} steps, "
         f"cfg {args.cfg}, {args.width}x{args.height}: load {loaded - start:.1f} s, sample {sampled - loaded:.1f} s, "
         f"decode {decoded - sampled:.1f} s, write {time.perf_counter() - decoded:.1f} s")
    for path in paths:
        _out(f"wrote {path}")
    return 0
