"""`python -m lumina_core generate`: text to PNG files with the released models of any Lumina family, through the
family's pipeline (LuminaT2IPipeline, LuminaPipeline for Lumina-Next, Lumina2Pipeline for Lumina-Image-2.0; the
family is read from the DiT file).

Each PNG carries its settings in PNG text chunks: "parameters" (one readable block: prompt, negative prompt,
steps, cfg, seed, size, models) and "prompt", the equivalent ComfyUI API graph of this pack's nodes (as ComfyUI's
SaveImage stores the graph that made an image), so dropping the PNG on ComfyUI rebuilds the generation. Files are
numbered after the ones already in the output folder; nothing is overwritten. Settings left out take the family's
(its original demo's, as the Lumina Sampler node); Lumina-Image-2.0's cfg truncation and renormalisation are the
original's (`--cfg-trunc`, `--renorm-cfg`), which the node has.
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
from .families import checkpoint_family, get_family
from .image.latent import latent_format, to_vae_space
from .models.flag_dit import EXTRAPOLATIONS
from .sampling.guidance import GUIDANCE_MODES
from .sampling.solvers import SOLVERS

# The Lumina Text Encode node's choice for a system prompt of one's own, and the Lumina Sampler's value for "the
# family's default" of cfg_trunc and renorm_cfg (neutral for Lumina-T2I and Lumina-Next).
CUSTOM_SYSTEM_PROMPT = "custom"
FAMILY_DEFAULT = -1.0


def _out(message: str):
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def add_generate_parser(sub):
    p = sub.add_parser(
        "generate",
        help="generate PNG images from a prompt with a Lumina DiT, its text encoder and its VAE (needs diffusers)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dit", required=True, help="the DiT file (lumina_t2i_5b_bf16.safetensors, the Lumina-Next "
                   "Next-DiT, lumina_2_model_bf16.safetensors or ComfyUI's all-in-one lumina_2.safetensors, a GGUF, "
                   "...); its family is read from it")
    p.add_argument("--text-encoder", "--llama", dest="text_encoder", required=True,
                   help="the family's text encoder: the Llama-2-7b-hf or gemma-2b folder, or Gemma-2-2B (a folder, "
                   "gemma_2_2b_fp16.safetensors or the all-in-one lumina_2.safetensors)")
    p.add_argument("--vae", required=True, help="sdxl_vae.safetensors (Lumina-T2I, Lumina-Next) or the FLUX AE "
                   "ae.safetensors (Lumina-Image-2.0; the all-in-one lumina_2.safetensors holds it too)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help='negative prompt (the originals use "")')
    p.add_argument("--width", type=int, default=1024, help="pixels, multiple of 16")
    p.add_argument("--height", type=int, default=1024, help="pixels, multiple of 16")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (default: Lumina-T2I 30; Lumina-Next 29 and Lumina-Image-2.0 17, the original "
                   "demos' 30 and 18 grid points)")
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale; 1 skips the negative prompt")
    p.add_argument("--seed", type=int, default=1, help="the Lumina Sampler node's noise for this seed")
    p.add_argument("--batch", type=int, default=1, help="images of the prompt, generated as one batch")
    p.add_argument("--shift", type=float, default=None, help="time shift (default: the family's, 4 or 6)")
    p.add_argument("--solver", choices=SOLVERS, default=None,
                   help="default: the family's demo's (Lumina-T2I euler; Lumina-Next, Lumina-Image-2.0 midpoint)")
    p.add_argument("--extrapolation", choices=EXTRAPOLATIONS, default=None,
                   help="default: the family's (t2i, time_aware, off)")
    p.add_argument("--guidance", choices=GUIDANCE_MODES, default="faithful")
    p.add_argument("--system-prompt", default=None, help="Lumina-Image-2.0: a preset (superior, the default; "
                   "alignment, base, aesthetics, 4grid, empty) or a sentence of your own")
    p.add_argument("--cfg-trunc", type=float, default=None, help="Lumina-Image-2.0: guide while t < this (the "
                   "original's; default 0.25, 1 or more: always)")
    p.add_argument("--renorm-cfg", type=float, default=None, help="Lumina-Image-2.0: clamp the guided velocity's norm "
                   "to this times the prompt's (the original's; default 1.0, 0: off)")
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
    lumina2 = ""
    if s["family"] == "lumina2":
        lumina2 = (f"System prompt: {s['system_prompt']}, CFG trunc: {s['cfg_trunc']}, "
                   f"Renorm CFG: {s['renorm_cfg']}, ")
    return (
        f"{s['prompt']}\nNegative prompt: {s['negative']}\n"
        f"Steps: {s['steps']}, Sampler: {s['solver']}, CFG scale: {s['cfg']}, Seed: {s['seed']}, "
        f"Batch index: {s['batch_index']}, Size: {s['width']}x{s['height']}, Shift: {s['shift']}, "
        f"Extrapolation: {s['extrapolation']}, Guidance: {s['guidance']}, {lumina2}"
        f"Model family: {get_family(s['family']).title}, Model: {s['dit']}, "
        f"Text encoder: {s['text_encoder']}, VAE: {s['vae']}, Dtype: {s['dtype']}"
    )


def comfy_prompt(s: dict) -> dict:
    """The ComfyUI API graph of this pack's nodes that generates the same batch (same seed, so the same noise)."""
    dtype = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}.get(s["dtype"], "auto")
    if s["family"] == "lumina_t2i":
        loaders = {
            "1": {"class_type": "LuminaFlagDiTLoader", "inputs": {"dit_name": s["dit"], "weight_dtype": dtype}},
            "2": {"class_type": "LuminaLlamaLoader", "inputs": {"llama_folder": s["text_encoder"], "dtype": dtype}},
        }
        texts = ({"text": s["prompt"]}, {"text": s["negative"]})
        family_inputs = {"cfg_trunc": FAMILY_DEFAULT, "renorm_cfg": FAMILY_DEFAULT}
    else:
        loaders = {
            "1": {"class_type": "LuminaDiTLoader", "inputs": {"dit_name": s["dit"], "weight_dtype": dtype}},
            "2": {"class_type": "LuminaTextEncoderLoader",
                  "inputs": {"text_encoder_folder": s["text_encoder"], "dtype": dtype}},
        }
        if s["family"] == "lumina2":
            from .text.gemma2 import NO_SYSTEM_PROMPT

            preset, custom = system_prompt_choice(s["system_prompt"])
            # The negative prompt without system prompt, as the pipeline (and diffusers) encode it.
            texts = ({"text": s["prompt"], "system_prompt": preset, "custom_system_prompt": custom},
                     {"text": s["negative"], "system_prompt": NO_SYSTEM_PROMPT, "custom_system_prompt": ""})
            family_inputs = {"cfg_trunc": s["cfg_trunc"], "renorm_cfg": s["renorm_cfg"]}
        else:
            texts = ({"text": s["prompt"]}, {"text": s["negative"]})
            family_inputs = {"cfg_trunc": FAMILY_DEFAULT, "renorm_cfg": FAMILY_DEFAULT}
    return {
        **loaders,
        "3": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["2", 0], **texts[0]}},
        "4": {"class_type": "LuminaTextEncode", "inputs": {"text_encoder": ["2", 0], **texts[1]}},
        "5": {"class_type": "LuminaEmptyLatent", "inputs": {"resolution": "custom", "width": s["width"],
                                                             "height": s["height"], "batch_size": s["batch"]}},
        "6": {"class_type": "LuminaSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": s["seed"], "steps": s["steps"], "cfg": s["cfg"], "solver": s["solver"], "shift": s["shift"],
            "denoise": 1.0, "extrapolation": s["extrapolation"], "guidance": s["guidance"], **family_inputs}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": s["vae"]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "Lumina"}},
    }


def system_prompt_choice(system_prompt: str) -> tuple[str, str]:
    """The Lumina Text Encode node's (system_prompt, custom_system_prompt) for a preset name or a sentence."""
    from .text.gemma2 import SYSTEM_PROMPT_ALIASES, SYSTEM_PROMPTS

    name = system_prompt.strip().lower()
    name = SYSTEM_PROMPT_ALIASES.get(name, name)
    if name in SYSTEM_PROMPTS:
        return name, ""
    return CUSTOM_SYSTEM_PROMPT, system_prompt


def png_info(settings: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters_text(settings))
    info.add_text("prompt", json.dumps(comfy_prompt(settings)))
    return info


def family_settings(family, args) -> dict:
    """The sampling settings of a run: the arguments given, the family's for the others (Lumina-T2I's steps: 30)."""
    from .text.gemma2 import DEFAULT_SYSTEM_PROMPT

    d = family.defaults
    lumina2 = family.name == "lumina2"
    return {
        "steps": args.steps if args.steps is not None else (30 if family.name == "lumina_t2i" else d.steps),
        "solver": args.solver or d.solver,
        "shift": d.shift if args.shift is None else args.shift,
        "extrapolation": args.extrapolation or d.extrapolation,
        "guidance": args.guidance,
        "system_prompt": (args.system_prompt if args.system_prompt is not None else DEFAULT_SYSTEM_PROMPT)
        if lumina2 else None,
        "cfg_trunc": (d.cfg_trunc if args.cfg_trunc is None else args.cfg_trunc) if lumina2 else None,
        "renorm_cfg": (d.renorm_cfg if args.renorm_cfg is None else args.renorm_cfg) if lumina2 else None,
    }


def _check_args(args, family) -> str | None:
    """A message for arguments the family cannot take, else None."""
    if family.name != "lumina2":
        given = [flag for flag, value in (("--system-prompt", args.system_prompt), ("--cfg-trunc", args.cfg_trunc),
                                          ("--renorm-cfg", args.renorm_cfg)) if value is not None]
        if given:
            return f"{', '.join(given)}: Lumina-Image-2.0 settings, but {args.dit} is a {family.title} model"
    elif args.system_prompt is not None:
        from .text.gemma2 import system_prompt_text

        try:
            system_prompt_text(args.system_prompt)
        except ValueError as err:
            return f"--system-prompt: {err}"
    if family.name != "lumina_t2i" and args.cfg < 1.0:
        return (f"--cfg {args.cfg}: the {family.title} pipeline guides only above 1, as diffusers' does (1 skips the "
                f"negative prompt)")
    return None


def _generate(pipe, family, args, run: dict):
    """(model-space latents, raw VAE latents) of the run."""
    common = dict(negative_prompt=args.negative, num_inference_steps=run["steps"], guidance_scale=args.cfg,
                  height=args.height, width=args.width, num_images_per_prompt=args.batch, seed=args.seed,
                  solver=run["solver"], shift=run["shift"], output_type="latent")
    if family.name == "lumina_t2i":
        raw = pipe(args.prompt, extrapolation=run["extrapolation"], guidance=run["guidance"], **common).images
        return raw * latent_format("sdxl").scale, raw
    if family.name == "lumina_next":
        latents = pipe(args.prompt, extrapolation=run["extrapolation"], guidance=run["guidance"], **common).images
    else:
        latents = pipe(args.prompt, system_prompt=run["system_prompt"], cfg_trunc=run["cfg_trunc"],
                       renorm_cfg=run["renorm_cfg"], **common).images
    return latents, to_vae_space(latents, family.latent_format)


def run_generate(args) -> int:
    from .image.vae import import_autoencoder_kl
    from .pipeline import size_error
    from .weights.layouts import CheckpointError

    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.name):
        _out(f"error: --name {args.name!r}: use letters, digits, - and _ only")
        return 2
    problem = size_error(args.width, args.height, "Lumina")
    if problem:
        _out(f"error: {problem}")
        return 2
    if args.batch < 1 or (args.steps is not None and args.steps < 1):
        _out(f"error: --batch {args.batch} and --steps {args.steps} must be at least 1")
        return 2
    try:
        import_autoencoder_kl()  # before minutes of loading: the PNGs need the VAE
    except ImportError as err:
        _out(f"error: {err}")
        return 2
    for flag, path in (("--dit", args.dit), ("--text-encoder", args.text_encoder), ("--vae", args.vae)):
        if not Path(path).exists():
            _out(f"error: {flag} {path}: no such file or folder")
            return 2
    if not Path(args.vae).is_file():
        _out(f"error: --vae {args.vae}: not a file")
        return 2
    try:
        family = checkpoint_family(args.dit)
    except CheckpointError as err:
        _out(f"error: --dit: {err}")
        return 2
    problem = _check_args(args, family)
    if problem:
        _out(f"error: {problem}")
        return 2
    run = family_settings(family, args)
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    pipe = pipeline_class(family.name).from_files(dit=args.dit, text_encoder=args.text_encoder, vae=args.vae,
                                                  torch_dtype=dtype)
    if args.offload:
        pipe.enable_model_cpu_offload(device=device if device.type != "cpu" else None)
    else:
        pipe.to(device)
    pipe.load_vae()  # now rather than at the first decode, so that its time counts as loading
    loaded = time.perf_counter()
    latents, raw = _generate(pipe, family, args, run)
    sampled = time.perf_counter()
    images = pipe.decode_latents(raw if family.name == "lumina_t2i" else latents)
    decoded = time.perf_counter()

    settings = {
        "family": family.name, "prompt": args.prompt, "negative": args.negative, "cfg": args.cfg, "seed": args.seed,
        "batch": args.batch, "width": args.width, "height": args.height, **run, "dit": Path(args.dit).name,
        "text_encoder": Path(args.text_encoder).name, "vae": Path(args.vae).name,
        "dtype": {v: k for k, v in DTYPES.items()}[dtype],
    }
    paths = next_free_paths(out_dir, args.name, len(images))
    for i, (image, path) in enumerate(zip(images, paths)):
        image.save(path, pnginfo=png_info({**settings, "batch_index": i}))
        if args.save_latent:
            from .demo import save_latent_file

            save_latent_file(path.with_suffix(".latent"), raw[i : i + 1])
    _out(f"{family.title}: device {device}, dtype {settings['dtype']}, seed {args.seed}, {run['steps']} "
         f"{run['solver']} steps, cfg {args.cfg}, {args.width}x{args.height}: load {loaded - start:.1f} s, sample "
         f"{sampled - loaded:.1f} s, decode {decoded - sampled:.1f} s, write {time.perf_counter() - decoded:.1f} s")
    for path in paths:
        _out(f"wrote {path}")
    return 0


def pipeline_class(family_name: str):
    """The script pipeline of a family."""
    if family_name == "lumina_t2i":
        from .pipeline import LuminaT2IPipeline

        return LuminaT2IPipeline
    if family_name == "lumina_next":
        from .pipeline_next import LuminaPipeline

        return LuminaPipeline
    from .pipeline_lumina2 import Lumina2Pipeline

    return Lumina2Pipeline
