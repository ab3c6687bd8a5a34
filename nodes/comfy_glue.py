"""The one module of the pack that talks to ComfyUI (comfy.*, folder_paths, latent_preview).

Inside ComfyUI it turns the core's objects into ComfyUI citizens: the Flag-DiT becomes a native MODEL (a
`BaseModel` of type FLOW with the SDXL latent format, built from `comfy.ops` layers and wrapped in a ModelPatcher),
the LLaMA encoder gets a ModelPatcher so the memory manager moves it to the GPU only while it encodes, and the
Lumina Sampler runs through ComfyUI's own sampling (a CFGGuider subclass with Lumina's guidance, a KSAMPLER with the
Lumina solvers, wrappers on the MODEL for the per-step Lumina work), with its progress, previews and interrupt.

Outside ComfyUI (tests, scripts) the loaders have a plain fallback: models load on the CPU from folders set with
`set_model_folders` (default `$LUMINA_MODELS_DIR/<kind>`, else `./models/<kind>`); GUIDER and SAMPLER objects exist
only inside ComfyUI.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import types
from typing import Optional

import torch

from lumina_core import families
from lumina_core.casting import dtype_from_name, is_fp8
from lumina_core.checkpoint import load_flag_dit, read_flag_dit_config
from lumina_core.conditioning import is_conditioning_file
from lumina_core.model import FlagDiT
from lumina_core.text_encoder import LlamaTextEncoder

from . import flow_model
from .common import text_from_conditioning
from .flow_model import comfy_dit_class
from .flow_sampler import keep_conditional_channels, lumina_ode

try:
    import comfy.cli_args
    import comfy.conds
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models_base
    import comfy.utils
    import folder_paths
    import latent_preview
except ImportError:
    IN_COMFYUI = False
else:
    IN_COMFYUI = True

logger = logging.getLogger(__name__)

DIFFUSION_MODELS = "diffusion_models"
TEXT_ENCODERS = "text_encoders"
CHECKPOINT_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin")
LUMINA_SHIFT = 4.0
_LLAMA_SEARCH_DEPTH = 3


# --------------------------------------------------------------------------------------------------------------
# Model folders


_plain_folders: dict[str, list[str]] = {}


def set_model_folders(kind: str, paths) -> None:
    """Outside ComfyUI: the folders searched for `kind` ("diffusion_models" or "text_encoders")."""
    _plain_folders[kind] = [os.fspath(p) for p in paths]


def model_folders(kind: str) -> list[str]:
    if IN_COMFYUI:
        return folder_paths.get_folder_paths(kind)
    if kind in _plain_folders:
        return list(_plain_folders[kind])
    return [os.path.join(os.environ.get("LUMINA_MODELS_DIR", "models"), kind)]


def diffusion_model_names() -> list[str]:
    if IN_COMFYUI:
        return folder_paths.get_filename_list(DIFFUSION_MODELS)
    names = set()
    for root in model_folders(DIFFUSION_MODELS):
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if f.lower().endswith(CHECKPOINT_EXTENSIONS):
                    names.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(names)


def diffusion_model_path(name: str) -> str:
    if IN_COMFYUI:
        return folder_paths.get_full_path_or_raise(DIFFUSION_MODELS, name)
    for root in model_folders(DIFFUSION_MODELS):
        path = os.path.join(root, _safe_relative(name))
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Flag-DiT checkpoint {name!r} not found in {model_folders(DIFFUSION_MODELS)}")


def _safe_relative(name: str) -> str:
    """A relative path that cannot climb out of its model folder."""
    return os.path.relpath(os.path.join(os.sep, name), os.sep)


def _is_llama_folder(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    return model_type == "llama" or (not model_type and any(a.startswith("Llama") for a in architectures))


def llama_folder_names() -> list[str]:
    """Folders (relative to a text_encoders model folder, "/"-separated) holding a LLaMA config.json."""
    return _text_encoder_folders(_is_llama_folder)


def text_encoder_folder_names() -> list[str]:
    """Folders under the text_encoders model folders holding the config.json of any Lumina family's text encoder."""
    return _text_encoder_folders(families.is_text_encoder_folder)


def text_encoder_folder_path(name: str) -> str:
    roots = model_folders(TEXT_ENCODERS)
    for root in roots:
        path = os.path.join(root, _safe_relative(name))
        if os.path.isdir(path):
            return path
    wanted = " or ".join(f.text_encoder_source for f in families.FAMILIES.values())
    raise FileNotFoundError(f"Text encoder folder {name!r} not found in {roots}: put {wanted} there.")


def _text_encoder_folders(accept: Callable[[str], bool]) -> list[str]:
    names = set()
    for root in model_folders(TEXT_ENCODERS):
        if not os.path.isdir(root):
            continue
        for dirpath, dirs, _files in os.walk(root, followlinks=True):
            depth = os.path.relpath(dirpath, root).count(os.sep) + 1
            if depth >= _LLAMA_SEARCH_DEPTH:
                dirs[:] = []
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if dirpath != root and accept(dirpath):
                names.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return sorted(names)


def llama_folder_path(name: str) -> str:
    roots = model_folders(TEXT_ENCODERS)
    for root in roots:
        path = os.path.join(root, _safe_relative(name))
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(
        f"LLaMA folder {name!r} not found in {roots}: put the whole Hugging Face folder of LLaMA-2-7B "
        f"(meta-llama/Llama-2-7b-hf) there."
    )


# --------------------------------------------------------------------------------------------------------------
# Devices


def intermediate_device() -> torch.device:
    return comfy.model_management.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def intermediate_dtype() -> torch.dtype:
    return comfy.model_management.intermediate_dtype() if IN_COMFYUI else torch.float32


def _plain_dtype(choice: str) -> torch.dtype:
    # Outside ComfyUI "auto" is bf16, the dtype Lumina-T2I was trained and released for use in.
    return torch.bfloat16 if choice == "auto" else dtype_from_name(choice)


def check_interrupted() -> None:
    if IN_COMFYUI:
        comfy.model_management.throw_exception_if_processing_interrupted()


# --------------------------------------------------------------------------------------------------------------
# Text encoder


class LuminaLlamaModule(torch.nn.Module):
    """Gives the LlamaModel a parent that ModelPatcher may set attributes on (`device` is read-only on HF models)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


class LuminaTextEncoderHandle:
    """What flows along a LUMINA_TEXT_ENCODER link: the core encoder and, inside ComfyUI, its ModelPatcher."""

    def __init__(self, encoder: LlamaTextEncoder, patcher=None):
        self.encoder = encoder
        self.patcher = patcher


# ComfyUI's command-line text encoder dtypes, in the order ComfyUI itself checks them (fp8: storage, computed in
# bf16 or fp32 through casting layers).
_TEXT_ENCODER_FLAGS = (
    ("fp8_e4m3fn_text_enc", "fp8_e4m3fn"),
    ("fp8_e5m2_text_enc", "fp8_e5m2"),
    ("fp32_text_enc", "fp32"),
    ("bf16_text_enc", "bf16"),
    ("fp16_text_enc", "fp16"),
)


def _text_encoder_dtype(choice: str, load_device: torch.device) -> torch.dtype:
    if choice != "auto":
        return dtype_from_name(choice)
    args = comfy.cli_args.args
    for flag, name in _TEXT_ENCODER_FLAGS:
        if getattr(args, flag, False):
            return dtype_from_name(name)
    mm = comfy.model_management
    if mm.should_use_bf16(load_device, prioritize_performance=False):
        return torch.bfloat16
    if mm.should_use_fp16(load_device, prioritize_performance=False):
        return torch.float16
    return torch.float32


def load_text_encoder(folder: str, dtype_choice: str, family=None) -> LuminaTextEncoderHandle:
    """The text encoder in `folder`: LLaMA-2 (Lumina-T2I), or the encoder of `family` (a lumina_core Family)."""
    encoder_class = LlamaTextEncoder if family is None else family.text_encoder_class()
    if not IN_COMFYUI:
        return LuminaTextEncoderHandle(encoder_class.from_folder(folder, dtype=_plain_dtype(dtype_choice)))
    mm = comfy.model_management
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = _text_encoder_dtype(dtype_choice, load_device)
    compute_dtype = None
    if is_fp8(dtype):
        compute_dtype = torch.bfloat16 if mm.should_use_bf16(load_device, prioritize_performance=False) else torch.float32
    # The linear layers (all but a few percent of LLaMA's or Gemma's weights) become comfy.ops layers: they cast fp8
    # weights per layer, and ComfyUI's low-VRAM mode can keep some of them in system memory and stream them in.
    linear_cls = comfy.ops.pick_operations(dtype, compute_dtype, load_device=load_device).Linear
    encoder = encoder_class.from_folder(
        folder, dtype=dtype, device=offload_device, compute_dtype=compute_dtype, linear_cls=linear_cls
    )
    # ModelPatcher moves the encoder to the GPU for encoding (partly, in low-VRAM mode) and back when the DiT needs
    # the memory.
    patcher = comfy.model_patcher.ModelPatcher(
        LuminaLlamaModule(encoder.model), load_device=load_device, offload_device=offload_device
    )
    return LuminaTextEncoderHandle(encoder, patcher)


def load_family_text_encoder(folder: str, dtype_choice: str) -> LuminaTextEncoderHandle:
    """The text encoder in `folder`, of the family its config.json names (LLaMA-2 or Gemma)."""
    return load_text_encoder(folder, dtype_choice, family=families.text_encoder_family(folder))


def encode_text(handle: LuminaTextEncoderHandle, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    if handle.patcher is not None:
        comfy.model_management.load_models_gpu([handle.patcher])
    return handle.encoder.encode([text], output_device=intermediate_device())


# --------------------------------------------------------------------------------------------------------------
# Flag-DiT as a MODEL


class PlainModel:
    """The MODEL outside ComfyUI: the DiT at the same attribute path as in ComfyUI's ModelPatcher."""

    def __init__(self, dit: FlagDiT):
        self.model = types.SimpleNamespace(diffusion_model=dit)
        self.load_device = next(dit.parameters()).device


def _build_dit(dit_config, dtype=None, device=None, operations=None, family: str = "lumina_t2i"):
    # Built on the meta device: the weights are assigned from the checkpoint right after, never allocated twice.
    dit_class = comfy_dit_class(families.get_family(family))
    return dit_class(dit_config, operations=operations, device="meta", dtype=dtype)


if IN_COMFYUI:

    class LuminaTextCond(comfy.conds.CONDRegular):
        """Per-token text tensors [B, L, ...] (features, or the mask as int64) that batch with texts of other
        lengths by right-padding with zeros: padded tokens are masked out, so cond and uncond of different lengths
        run in one batch with unchanged results (CONDCrossAttn would repeat the tokens, which breaks the mask)."""

        def can_concat(self, other):
            a, b = self.cond.shape, other.cond.shape
            return a[0] == b[0] and a[2:] == b[2:] and self.cond.device == other.cond.device

        def concat(self, others):
            conds = [self.cond] + [o.cond for o in others]
            length = max(c.shape[1] for c in conds)
            padded = []
            for c in conds:
                if c.shape[1] < length:
                    c = torch.cat([c, c.new_zeros((c.shape[0], length - c.shape[1]) + tuple(c.shape[2:]))], dim=1)
                padded.append(c)
            return torch.cat(padded)

    class LuminaT2IConfig(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {}
        sampling_settings = {"multiplier": 1.0, "shift": LUMINA_SHIFT}
        latent_format = comfy.latent_formats.SDXL
        # Lumina-T2I was trained in bf16; fp16 activations of a 5B DiT risk overflow, so neither "auto" nor manual
        # casting picks fp16 (it is used only when chosen explicitly as the weight dtype).
        supported_inference_dtypes = [torch.bfloat16, torch.float32]
        memory_usage_factor = 2.0

    class LuminaT2I(comfy.model_base.BaseModel):
        """Lumina-T2I in ComfyUI: rectified flow (FLOW, shift 4, multiplier 1), SDXL latents, LLaMA text."""

        def __init__(self, model_config, device=None):
            super().__init__(model_config, comfy.model_base.ModelType.FLOW, device=device, unet_model=_build_dit)

        def process_timestep(self, timestep, **kwargs):
            # ComfyUI hands the network sigma * multiplier; the DiT wants sigma whatever patch (AuraFlow's
            # multiplier 1, SD3's 1000) set the multiplier.
            return timestep / getattr(self.model_sampling, "multiplier", 1.0)

        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)
            features = kwargs.get("cross_attn")
            if features is not None:
                which = kwargs.get("prompt_type") or "text"
                cap_feat_dim = self.diffusion_model.config.cap_feat_dim
                family = self.diffusion_model.family
                features, mask = text_from_conditioning([[features, kwargs]], cap_feat_dim, which, family=family)
                out["c_crossattn"] = LuminaTextCond(features)
                # int64 so that BaseModel passes it on uncast (float conds are cast to the weights' dtype).
                out["attention_mask"] = LuminaTextCond(mask.to(torch.int64))
            return out


    _MODEL_CONFIGS: dict = {}
    # The registry's latent format names -> ComfyUI's latent formats.
    _LATENT_FORMATS = {"sdxl": comfy.latent_formats.SDXL}

    def _model_config_class(family):
        """LuminaT2IConfig with the family's default shift and latent format."""
        if family.name not in _MODEL_CONFIGS:
            attrs = {
                "sampling_settings": {"multiplier": 1.0, "shift": family.defaults.shift},
                "latent_format": _LATENT_FORMATS[family.latent_format],
            }
            name = family.title.replace("-", "") + "Config"
            _MODEL_CONFIGS[family.name] = type(name, (LuminaT2IConfig,), attrs)
        return _MODEL_CONFIGS[family.name]


def _parameter_count(config, dit_class=FlagDiT) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in dit_class(config).parameters())


def load_dit_model(path: str, dtype_choice: str):
    """A MODEL holding the DiT at `path`, whichever family its keys say it belongs to (Flag-DiT or Next-DiT)."""
    return load_flag_dit_model(path, dtype_choice, family=families.checkpoint_family(path))


def load_flag_dit_model(path: str, dtype_choice: str, family=None):
    """A MODEL holding the Flag-DiT at `path` (or the DiT of `family`, a lumina_core Family): a ComfyUI
    ModelPatcher inside ComfyUI, a PlainModel outside."""
    family = families.LUMINA_T2I if family is None else family
    if not IN_COMFYUI:
        return PlainModel(family.load_dit(path, dtype=_plain_dtype(dtype_choice), device="cpu"))
    mm = comfy.model_management
    config = family.read_dit_config(path)  # refuses a foreign checkpoint before any weight is read
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    if dtype_choice == "auto":
        supported = LuminaT2IConfig.supported_inference_dtypes
        dtype = mm.unet_dtype(model_params=_parameter_count(config, family.dit_class()), supported_dtypes=supported)
    else:
        dtype = dtype_from_name(dtype_choice)
    manual_cast_dtype = mm.unet_manual_cast(dtype, load_device, LuminaT2IConfig.supported_inference_dtypes)
    model_config = _model_config_class(family)({"dit_config": config, "family": family.name})
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    model = LuminaT2I(model_config)
    patcher = comfy.model_patcher.CoreModelPatcher(model, load_device=load_device, offload_device=offload_device)
    # The core loads the released layout (memory-mapped, cast as read) into torch.nn layers; its tensors are then
    # assigned to the comfy.ops layers of the same names, so there is one copy of the weights.
    weights = family.load_dit(path, dtype=dtype, device="cpu")
    model.diffusion_model.load_state_dict(weights.state_dict(), strict=True, assign=True)
    del weights
    model.diffusion_model.compute_dtype = manual_cast_dtype
    if not mm.is_device_cpu(offload_device):
        model.to(offload_device)
    register_sampling_wrappers(patcher)
    return patcher


def lumina_dit(model):
    """The Lumina DiT (Flag-DiT or Next-DiT) inside a MODEL, or a ValueError saying which node to use."""
    inner = getattr(model, "model", None)
    dit = getattr(inner, "diffusion_model", None)
    family = getattr(dit, "family", None)
    if family not in families.FAMILIES or not isinstance(dit, families.get_family(family).dit_class()):
        what = type(inner).__name__ if inner is not None else type(model).__name__
        raise ValueError(
            f"The MODEL input is a {what} model, not a Lumina-T2I Flag-DiT (nor a Lumina-Next Next-DiT). Load the "
            f"DiT with the Lumina Load DiT node (or Lumina Load Flag-DiT; models/diffusion_models) and connect that "
            f"MODEL."
        )
    return dit


# --------------------------------------------------------------------------------------------------------------
# Sampling through ComfyUI's own machinery: wrappers on the MODEL, the Lumina guider and ODE sampler

WRAPPER_KEY = "lumina_t2i"


def register_sampling_wrappers(patcher) -> None:
    """The Lumina per-step work (text prepared once per generation, sigma -> t, the step's extrapolation) as
    wrappers on the MODEL's patcher, registered at load: wrappers survive clone(), so every patched copy of the
    MODEL (TorchCompileModel, RenormCFG, other packs' patches) keeps them, under every ComfyUI sampler."""
    wrappers = comfy.patcher_extension.WrappersMP
    patcher.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, flow_model.outer_sample_wrapper)
    patcher.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, flow_model.apply_model_wrapper)


if IN_COMFYUI:

    class LuminaGuider(comfy.samplers.CFGGuider):
        """CFGGuider with Lumina-T2I's faithful guidance (channel 3 from the conditional prediction) and the
        resolution extrapolation passed to Lumina DiTs through the model options.

        Guidance stays in ComfyUI's steps: calc_cond_batch, the pre-CFG functions, `cfg_function` (a MODEL's
        sampler_cfg_function such as RenormCFG, and the post-CFG functions); only then are the channels past the
        third taken from the conditional prediction. At cfg 1 the negative is not evaluated, as in CFGGuider.
        """

        def __init__(self, model_patcher, guidance: str = "faithful", extrapolation: Optional[str] = None):
            super().__init__(model_patcher)
            if guidance not in ("faithful", "all"):
                raise ValueError(f"unknown guidance {guidance!r}; use 'faithful' or 'all'")
            self.guidance = guidance
            # Our own copy: CFGGuider shares the patcher's dict, which the option must not leak into.
            self.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
            if extrapolation is not None:
                options = self.model_options.setdefault("transformer_options", {})
                options[flow_model.EXTRAPOLATION_OPTION] = extrapolation

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            cond, uncond = self.conds.get("positive"), self.conds.get("negative")
            if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
                uncond = None
            conds = [cond, uncond]
            model = self.inner_model
            if "sampler_calc_cond_batch_function" in model_options:
                args = {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options}
                out = model_options["sampler_calc_cond_batch_function"](args)
            else:
                out = comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)
            for fn in model_options.get("sampler_pre_cfg_function", []):
                args = {"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep, "input": x,
                        "sigma": timestep, "model": model, "model_options": model_options}
                out = fn(args)
            guided = comfy.samplers.cfg_function(model, out[0], out[1], self.cfg, x, timestep,
                                                 model_options=model_options, cond=cond, uncond=uncond)
            if self.guidance == "faithful":
                guided = keep_conditional_channels(guided, out[0])
            return guided


def ode_sampler(solver: str, rtol: float = 1e-3, atol: float = 1e-6):
    """A ComfyUI SAMPLER running a Lumina solver on any flow model (see nodes/flow_sampler.py)."""
    if not IN_COMFYUI:
        raise RuntimeError("a SAMPLER is a ComfyUI object: the Lumina ODE Sampler runs only inside ComfyUI")
    return comfy.samplers.KSAMPLER(lumina_ode, extra_options={"solver": solver, "rtol": rtol, "atol": atol})


def sample_with_guider(model, positive, negative, latent_image: dict, *, seed: int, sigmas: torch.Tensor,
                       cfg: float, solver: str, guidance: str, extrapolation: str) -> torch.Tensor:
    """The Lumina Sampler inside ComfyUI: Lumina guider + Lumina ODE sampler + sigmas through ComfyUI's own sampling
    (every MODEL patch and wrapper, ComfyUI's noise, progress bar, preview and interrupt). Returns raw VAE latents
    on the intermediate device."""
    guider = cfg_guider(model, positive, negative, cfg, guidance, extrapolation)
    samples = latent_image["samples"]
    noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    out = guider.sample(noise, samples, ode_sampler(solver), sigmas, callback=callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return out.to(intermediate_device())


def cfg_guider(model, positive, negative, cfg: float, guidance: str, extrapolation: Optional[str]):
    """The GUIDER of the Lumina CFG Guider node."""
    if not IN_COMFYUI:
        raise RuntimeError("a GUIDER is a ComfyUI object: the Lumina CFG Guider runs only inside ComfyUI")
    guider = LuminaGuider(model, guidance, extrapolation)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


# --------------------------------------------------------------------------------------------------------------
# Saved conditioning files (Lumina Save / Load Conditioning)

CONDITIONING_SUFFIX = ".safetensors"
_OUTPUT_TAG = " [output]"


def output_directory() -> str:
    if IN_COMFYUI:
        return folder_paths.get_output_directory()
    return os.environ.get("LUMINA_OUTPUT_DIR", "output")


def input_directory() -> str:
    if IN_COMFYUI:
        return folder_paths.get_input_directory()
    return os.environ.get("LUMINA_INPUT_DIR", "input")


def conditioning_save_path(prefix: str) -> tuple[str, str]:
    """(full path, name relative to the output folder) of the next `<prefix>_NNNNN_.safetensors`."""
    out = output_directory()
    if IN_COMFYUI:
        folder, base, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, out)
    else:
        subfolder, base = os.path.split(_safe_relative(prefix))
        folder = os.path.join(out, subfolder)
        os.makedirs(folder, exist_ok=True)
        taken = [int(m.group(1)) for f in os.listdir(folder)
                 if (m := re.fullmatch(re.escape(base) + r"_(\d+)_\.safetensors", f))]
        counter = max(taken, default=0) + 1
    os.makedirs(folder, exist_ok=True)
    name = f"{base}_{counter:05}_{CONDITIONING_SUFFIX}"
    return os.path.join(folder, name), "/".join(p for p in (subfolder, name) if p)


def conditioning_file_names() -> list[str]:
    """Loadable encodings: every .safetensors at the top of the input folder (uploads), and the saved Lumina
    conditionings anywhere under the output folder, tagged " [output]" as ComfyUI's annotated names are."""
    names = []
    inp = input_directory()
    if os.path.isdir(inp):
        names += sorted(f for f in os.listdir(inp)
                        if f.endswith(CONDITIONING_SUFFIX) and os.path.isfile(os.path.join(inp, f)))
    out = output_directory()
    found = []
    for dirpath, _dirs, files in os.walk(out):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith(CONDITIONING_SUFFIX) and is_conditioning_file(path):
                found.append(os.path.relpath(path, out).replace(os.sep, "/") + _OUTPUT_TAG)
    return names + sorted(found)


def conditioning_file_path(name: str) -> str:
    if IN_COMFYUI:
        return folder_paths.get_annotated_filepath(name)
    if name.endswith(_OUTPUT_TAG):
        return os.path.join(output_directory(), _safe_relative(name[: -len(_OUTPUT_TAG)]))
    return os.path.join(input_directory(), _safe_relative(name))
