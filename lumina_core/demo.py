"""`python -m lumina_core demo`: the whole pipeline of a Lumina family from the command line, on the core functions.

With no model paths it is a smoke test: a tiny DiT and a tiny text encoder of the family (--family: lumina_t2i, the
default, a Flag-DiT and a LLaMA; lumina_next, a Next-DiT and a Gemma; lumina2, a Unified Next-DiT and a Gemma-2) with
random weights are written to a temporary folder and loaded back through the real loaders, so every stage runs in
seconds on a CPU (the picture is meaningless). With --dit and --text-encoder it runs the released model the same way
(the family read from the DiT file). --save-cond also writes the two prompt encodings; --cond/--negative-cond then
take their place, so a later run needs no text encoder at all. It writes the latent as a `.latent` file that
ComfyUI's LoadLatent node reads (put it in ComfyUI/input, then VAEDecode with the family's VAE: the SDXL VAE, or the
FLUX AE for Lumina-Image-2.0) and a preview PNG made with the latent format's latent-to-RGB approximation.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import conditioning
from .dtypes import DTYPE_NAMES, dtype_from_name
from .families import FAMILIES, checkpoint_family, get_family, load_text_encoder, text_encoder_family
from .generation import sample
from .image.latent import latent_format, latent_to_rgb, to_vae_space
from .memory import release_memory
from .models.flag_dit import EXTRAPOLATIONS
from .sampling.guidance import GUIDANCE_MODES
from .sampling.schedule import make_noise
from .sampling.solvers import SOLVERS
from .weights.layouts import CheckpointError

DEFAULT_PROMPT = "a fluffy mouse holding a watermelon, in a magical and colorful setting"


def _out(message: str):
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def add_demo_parser(sub):
    p = sub.add_parser(
        "demo",
        help="generate one image latent (a smoke test with random tiny models unless --dit/--text-encoder are given)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--family", choices=tuple(FAMILIES), default=None,
                   help="the smoke test's family (default lumina_t2i); with --dit, read from the file")
    p.add_argument("--dit", help="the DiT checkpoint, e.g. lumina_t2i_5b_bf16.safetensors")
    p.add_argument("--text-encoder", "--llama", dest="text_encoder",
                   help="the family's text encoder (the Llama-2-7b-hf or gemma-2b folder, Gemma-2-2B's folder or file)")
    p.add_argument("--cond", help="a saved prompt encoding (from --save-cond or Lumina Save Conditioning), "
                   "instead of --text-encoder")
    p.add_argument("--negative-cond", help="the saved encoding of the negative prompt (with --cond)")
    p.add_argument("--save-cond", action="store_true",
                   help="also write the prompt encodings to lumina_demo_cond.safetensors and "
                   "lumina_demo_negative_cond.safetensors in --out")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative", default="", help='negative prompt (the originals use "")')
    p.add_argument("--system-prompt", default=None,
                   help="Lumina-Image-2.0: a preset (superior, the default) or a sentence of your own")
    p.add_argument("--width", type=int, default=None, help="pixels, multiple of 16 (default 1024; smoke test 256)")
    p.add_argument("--height", type=int, default=None, help="pixels, multiple of 16 (default 1024; smoke test 256)")
    p.add_argument("--steps", type=int, default=None,
                   help="solver steps (default Lumina-T2I 30, else the family's demo's; smoke test 8)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--shift", type=float, default=None, help="default: the family's (4, or 6 for Lumina-Image-2.0)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--solver", choices=SOLVERS, default=None, help="default: the family's demo's")
    p.add_argument("--extrapolation", choices=EXTRAPOLATIONS, default=None, help="default: the family's")
    p.add_argument("--guidance", choices=GUIDANCE_MODES, default="faithful")
    p.add_argument("--cfg-trunc", type=float, default=None,
                   help="guide while t < this (Lumina-Image-2.0's option; default the family's)")
    p.add_argument("--renorm-cfg", type=float, default=None,
                   help="clamp the guided velocity's norm (Lumina-Image-2.0's option; default the family's)")
    p.add_argument("--unbatched-cfg", dest="batch_cfg", action="store_false",
                   help="run the negative prompt as its own evaluation instead of batched with the positive: less "
                        "memory, more time (on the CPU with a GGUF DiT, 0.17 GB less for the 5B Flag-DiT at 512x512, "
                        "about 20%% slower)")
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


def _family(args):
    """The run's family: the DiT file's, else --family, else Lumina-T2I; (family, error message or None)."""
    if args.dit is None:
        return get_family(args.family or "lumina_t2i"), None
    try:
        found = checkpoint_family(args.dit)
    except (CheckpointError, OSError) as err:
        return None, f"--dit: {err}"
    if args.family is not None and args.family != found.name:
        return None, f"--family {args.family}, but {args.dit} is a {found.title} {found.dit_title}"
    return found, None


def _write_tiny_models(family, folder: Path):
    """(DiT path, text encoder path) of random tiny models of `family` written under `folder`."""
    from . import tiny

    if family.name == "lumina_next":
        return (tiny.write_tiny_next_dit(folder / "tiny_next_dit.safetensors"),
                tiny.make_tiny_gemma_folder(folder / "tiny-gemma"))
    if family.name == "lumina2":
        return (tiny.write_tiny_unified_next_dit(folder / "tiny_unified_next_dit.safetensors"),
                tiny.make_tiny_gemma2_folder(folder / "tiny-gemma2"))
    return tiny.write_tiny_flag_dit(folder / "tiny_flag_dit.safetensors"), tiny.write_tiny_llama_folder(folder / "tiny-llama")


def _encode(encoder, family, text: str, system_prompt):
    """A prompt's features and mask as the family's demo encodes it (Lumina-Image-2.0: the system prompt in front,
    none for an empty text)."""
    if family.name != "lumina2":
        return encoder.encode([text])
    return encoder.encode([text], system_prompt=system_prompt if text else "empty")


def run_demo(args) -> int:
    smoke = args.dit is None and args.text_encoder is None and args.cond is None
    if args.cond is not None:
        if args.text_encoder is not None or args.dit is None or args.negative_cond is None:
            _out("error: --cond needs --dit and --negative-cond, and replaces --text-encoder")
            return 2
    elif (args.dit is None) != (args.text_encoder is None):
        _out("error: give both --dit and --text-encoder (or neither, for the smoke test)")
        return 2
    if args.negative_cond is not None and args.cond is None:
        _out("error: --negative-cond needs --cond")
        return 2
    family, problem = _family(args)
    if problem:
        _out(f"error: {problem}")
        return 2
    if family.name != "lumina2" and args.system_prompt is not None:
        _out(f"error: --system-prompt is Lumina-Image-2.0's; this run is {family.title}")
        return 2
    fmt = latent_format(family.latent_format)
    width = args.width or (256 if smoke else 1024)
    height = args.height or (256 if smoke else 1024)
    steps = args.steps or (8 if smoke else 30 if family.name == "lumina_t2i" else family.defaults.steps)
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
        _out(f"SMOKE TEST: a tiny {family.dit_title} and a tiny {family.text_encoder_title} with RANDOM weights; the "
             "picture is noise-like by design.")
        _out(f"Pass --dit PATH --text-encoder PATH to run the released {family.title} model.")
        tmp = tempfile.TemporaryDirectory(prefix="lumina_demo_")
        start = time.perf_counter()
        dit_path, encoder_path = _write_tiny_models(family, Path(tmp.name))
        stage("write tiny models", start)
    else:
        encoder_path, dit_path = (Path(args.text_encoder) if args.text_encoder else None), Path(args.dit)

    try:
        if args.cond is None:
            # Imported here: with saved encodings, transformers (0.3 GB resident once imported) is never loaded.
            from .text.hf_folder import check_cap_feat_dim

            start = time.perf_counter()
            te_family = text_encoder_family(encoder_path)
            if te_family.name != family.name:
                _out(f"error: {encoder_path} holds {te_family.text_encoder_title} ({te_family.title}); a "
                     f"{family.title} DiT needs {family.text_encoder_source}")
                return 2
            encoder = load_text_encoder(encoder_path, dtype=text_dtype, device=device)
            stage("load text encoder", start)
            start = time.perf_counter()
            cond = _encode(encoder, family, args.prompt, args.system_prompt)
            uncond = _encode(encoder, family, args.negative, args.system_prompt)
            cond, uncond = [(f.to(device), m.to(device)) for f, m in (cond, uncond)]
            hidden = encoder.hidden_size
            stage("encode prompts", start)
            if args.save_cond:
                for name, (feats, mask), text in (("cond", cond, args.prompt), ("negative_cond", uncond, args.negative)):
                    conditioning.save(out_dir / f"lumina_demo_{name}.safetensors", feats, mask, family=family.name,
                                      prompt=text)
            # The encoder is not needed any more: free its memory before the DiT arrives.
            del encoder
            release_memory(device)
            encoder_name = str(encoder_path)
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
            cap_feat_dim = family.read_dit_config(dit_path).cap_feat_dim
            try:
                for path, meta in ((args.cond, cond_meta), (args.negative_cond, unc_meta)):
                    conditioning.check_family(meta, family=family.name, width=cap_feat_dim, source=str(path))
            except ValueError as err:
                _out(f"error: {err}")
                return 2
            stage("load saved encodings", start)

        start = time.perf_counter()
        dit = family.load_dit(dit_path, dtype=dit_dtype, device=device)
        if args.cond is None:
            check_cap_feat_dim(hidden, dit.config.cap_feat_dim, encoder_name=encoder_name, dit_name=str(dit_path))
        stage(f"load {family.dit_title}", start)

        start = time.perf_counter()
        noise = make_noise(args.seed, (1, fmt.channels, height // 8, width // 8)).to(device)
        latent = sample(
            dit, noise, cond, uncond, steps=steps, cfg=args.cfg, shift=args.shift, solver=args.solver,
            extrapolation=args.extrapolation, guidance=args.guidance, cfg_trunc=args.cfg_trunc,
            renorm_cfg=args.renorm_cfg, batch_cfg=args.batch_cfg,
        )
        solver = args.solver or family.defaults.solver
        stage(f"sample ({steps} {solver} steps, {width}x{height})", start)
    finally:
        if tmp is not None:
            tmp.cleanup()

    start = time.perf_counter()
    latent_path = out_dir / "lumina_demo.latent"
    png_path = out_dir / "lumina_demo_preview.png"
    save_latent_file(latent_path, to_vae_space(latent, fmt.name))
    # One latent cell is 8x8 pixels: enlarge the preview to the image size.
    write_png(png_path, latent_to_rgb(latent, fmt.name)[0].repeat_interleave(8, 0).repeat_interleave(8, 1))
    stage("write outputs", start)

    def name(dtype):
        return str(dtype).replace("torch.", "")

    shift = family.defaults.shift if args.shift is None else args.shift
    extrapolation = args.extrapolation or family.defaults.extrapolation
    _out(f"{family.title}: device {device}, DiT dtype {name(dit_dtype)}, text encoder dtype "
         f"{'(saved encodings)' if args.cond else name(text_dtype)}, seed {args.seed}, cfg {args.cfg}, "
         f"shift {shift}, extrapolation {extrapolation}")
    for stage_name, seconds, peak in timings:
        _out(f"  {stage_name:<40s} {seconds:8.2f} s   peak RSS {peak:6.2f} GB")
    _out(f"latent: {latent_path} (copy it into ComfyUI/input and use LoadLatent -> VAEDecode with {fmt.vae})")
    _out(f"preview: {png_path} ({width}x{height}, {fmt.name.upper()} latent-to-RGB approximation, one colour per 8x8 "
         f"cell)")
    if args.save_cond and args.cond is None:
        _out(f"prompt encodings: {out_dir / 'lumina_demo_cond.safetensors'}, "
             f"{out_dir / 'lumina_demo_negative_cond.safetensors'} (use them with --cond/--negative-cond)")
    return 0
