"""`python -m lumina_core demo`: the whole Lumina-T2I pipeline from the command line.

With no model paths it is a smoke test: a tiny Flag-DiT and a tiny LLaMA with random weights are written to a
temporary folder and loaded back through the real loaders, so every stage runs in seconds on a CPU (the picture is
meaningless). With --dit and --llama it runs the released model the same way. --save-cond also writes the two prompt
encodings; --cond/--negative-cond then take their place, so a later run needs no text encoder at all. It writes the latent as a `.latent`
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

from . import conditioning
from .dtypes import DTYPE_NAMES, dtype_from_name
from .generation import sample
from .image.latent import latent_to_rgb, to_vae_space
from .models.flag_dit import EXTRAPOLATIONS
from .sampling.guidance import GUIDANCE_MODES
from .sampling.schedule import make_noise
from .sampling.solvers import SOLVERS
from .weights.dit_files import load_flag_dit, read_flag_dit_config

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
    p.add_argument("--cond", help="a saved prompt encoding (from --save-cond or Lumina Save Conditioning), "
                   "instead of --llama")
    p.add_argument("--negative-cond", help="the saved encoding of the negative prompt (with --cond)")
    p.add_argument("--save-cond", action="store_true",
                   help="also write the prompt encodings to lumina_demo_cond.safetensors and "
                   "lumina_demo_negative_cond.safetensors in --out")
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
    p.add_argument("--dtype", choices=("auto",) + DTYPE_NAMES, default="auto",
                   help="weight dtype of both models (auto: bf16 on a GPU, fp32 on the CPU); fp8 stores the "
                   "weights in fp8 and computes in bf16 (fp32 on CPUs without bf16)")
    p.add_argument("--dit-dtype", choices=("auto",) + DTYPE_NAMES, default=None, help="overrides --dtype for the DiT")
    p.add_argument("--text-dtype", choices=("auto",) + DTYPE_NAMES, default=None,
                   help="overrides --dtype for the text encoder")
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

    def dtype(name):
        if name == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return dtype_from_name(name)

    return device, dtype(args.dit_dtype or args.dtype), dtype(args.text_dtype or args.dtype)


def _peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux/macOS; 0 where unknown)."""
    try:
        import resource
    except ImportError:
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 * (1 if sys.platform == "darwin" else 1024)


def _load_saved(path):
    saved = conditioning.load(path)
    return saved.features, saved.mask, saved.meta


def run_demo(args) -> int:
    smoke = args.dit is None and args.llama is None and args.cond is None
    if args.cond is not None:
        if args.llama is not None or args.dit is None or args.negative_cond is None:
            _out("error: --cond needs --dit and --negative-cond, and replaces --llama")
            return 2
    elif (args.dit is None) != (args.llama is None):
        _out("error: give both --dit and --llama (or neither, for the smoke test)")
        return 2
    if args.negative_cond is not None and args.cond is None:
        _out("error: --negative-cond needs --cond")
        return 2
    width = args.width or (256 if smoke else 1024)
    height = args.height or (256 if smoke else 1024)
    steps = args.steps or (8 if smoke else 30)
    bad = [f"{name} {v}" for name, v in (("width", width), ("height", height)) if v % 16 or v < 32]
    if bad:
        _out(f"error: {', '.join(bad)}: sizes must be multiples of 16 and at least 32 pixels")
        return 2
    try:
        device, dit_dtype, text_dtype = _resolve(args)
    except ValueError as err:
        _out(f"error: {err}")
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = []

    def stage(name, start):
        timings.append((name, time.perf_counter() - start, _peak_rss_gb()))

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
        llama_path, dit_path = (Path(args.llama) if args.llama else None), Path(args.dit)

    try:
        if args.cond is None:
            # Imported here: with saved encodings, transformers (0.3 GB resident once imported) is never loaded.
            from .text.hf_folder import check_cap_feat_dim
            from .text.llama import LlamaTextEncoder

            start = time.perf_counter()
            encoder = LlamaTextEncoder.from_folder(llama_path, dtype=text_dtype, device=device)
            stage("load text encoder", start)
            start = time.perf_counter()
            cond = encoder.encode([args.prompt], output_device=device)
            uncond = encoder.encode([args.negative], output_device=device)
            hidden = encoder.hidden_size
            stage("encode prompts", start)
            if args.save_cond:
                for name, (feats, mask), text in (("cond", cond, args.prompt), ("negative_cond", uncond, args.negative)):
                    conditioning.save(out_dir / f"lumina_demo_{name}.safetensors", feats, mask,
                                      family=conditioning.T2I_FAMILY, prompt=text)
            # The encoder is not needed any more: free its memory before the DiT arrives.
            del encoder
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            encoder_name = str(llama_path)
        else:
            start = time.perf_counter()
            try:
                cond_f, cond_m, cond_meta = _load_saved(args.cond)
                unc_f, unc_m, unc_meta = _load_saved(args.negative_cond)
            except (ValueError, OSError) as err:
                _out(f"error: {err}")
                return 2
            cond, uncond = (cond_f.to(device), cond_m.to(device)), (unc_f.to(device), unc_m.to(device))
            # Checked against the checkpoint's header, before 5-10 GB of weights are read.
            cap_feat_dim = read_flag_dit_config(dit_path).cap_feat_dim
            try:
                for path, meta in ((args.cond, cond_meta), (args.negative_cond, unc_meta)):
                    conditioning.check_family(meta, family=conditioning.T2I_FAMILY, width=cap_feat_dim,
                                              source=str(path))
            except ValueError as err:
                _out(f"error: {err}")
                return 2
            stage("load saved encodings", start)

        start = time.perf_counter()
        dit = load_flag_dit(dit_path, dtype=dit_dtype, device=device)
        if args.cond is None:
            check_cap_feat_dim(hidden, dit.config.cap_feat_dim, encoder_name=encoder_name, dit_name=str(dit_path))
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

    def name(dtype):
        return str(dtype).replace("torch.", "")

    _out(f"device {device}, DiT dtype {name(dit_dtype)}, text encoder dtype "
         f"{'(saved encodings)' if args.cond else name(text_dtype)}, seed {args.seed}, cfg {args.cfg}, "
         f"shift {args.shift}, extrapolation {args.extrapolation}")
    for stage_name, seconds, peak in timings:
        _out(f"  {stage_name:<40s} {seconds:8.2f} s   peak RSS {peak:6.2f} GB")
    _out(f"latent: {latent_path} (copy it into ComfyUI/input and use LoadLatent -> VAEDecode with the SDXL VAE)")
    _out(f"preview: {png_path} ({width}x{height}, SDXL latent-to-RGB approximation, one colour per 8x8 cell)")
    if args.save_cond and args.cond is None:
        _out(f"prompt encodings: {out_dir / 'lumina_demo_cond.safetensors'}, "
             f"{out_dir / 'lumina_demo_negative_cond.safetensors'} (use them with --cond/--negative-cond)")
    return 0
