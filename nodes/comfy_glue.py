"""The one module of the pack that talks to ComfyUI (comfy.*, folder_paths, latent_preview).

Inside ComfyUI it turns the core's objects into ComfyUI citizens: the Flag-DiT becomes a native MODEL (a
`BaseModel` of type FLOW with the SDXL latent format, built from `comfy.ops` layers and wrapped in a ModelPatcher),
the LLaMA encoder gets a ModelPatcher so the memory manager moves it to the GPU only while it encodes, and sampling
reports progress and previews and honours the interrupt button.

Outside ComfyUI (tests, scripts) every function has a plain fallback: models load on the CPU from folders set with
`set_model_folders` (default `$LUMINA_MODELS_DIR/<kind>`, else `./models/<kind>`), and progress is not reported.
"""

from __future__ import annotations

import json
import logging
import os
import types
from typing import Callable, Optional

import torch

from lumina_core import families
from lumina_core.checkpoint import DTYPES, load_flag_dit, read_flag_dit_config
from lumina_core.model import FlagDiT
from lumina_core.text_encoder import LlamaTextEncoder

from .common import text_from_conditioning
from .flow_model import ComfyFlagDiT, comfy_dit_class

try:
    import comfy.cli_args
    import comfy.conds
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models_base
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
    return torch.bfloat16 if choice == "auto" else DTYPES[choice]


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


# ComfyUI's command-line text encoder dtypes that a torch.nn LlamaModel can compute in (not its fp8 ones).
_TEXT_ENCODER_FLAGS = (
    ("fp32_text_enc", torch.float32),
    ("bf16_text_enc", torch.bfloat16),
    ("fp16_text_enc", torch.float16),
)


def _text_encoder_dtype(choice: str, load_device: torch.device) -> torch.dtype:
    if choice != "auto":
        return DTYPES[choice]
    args = comfy.cli_args.args
    for flag, dtype in _TEXT_ENCODER_FLAGS:
        if getattr(args, flag, False):
            return dtype
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
    encoder = encoder_class.from_folder(folder, dtype=dtype, device=offload_device)
    # The plain (not dynamic-VRAM) patcher: LlamaModel (or GemmaModel) is built from torch.nn layers, not comfy.ops,
    # and is moved to the GPU whole for encoding and back when the DiT needs the memory.
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
        dtype = DTYPES[dtype_choice]
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
# Sampling


def prepare_sampling(model, latent_shape, guided: bool) -> torch.device:
    """Load the MODEL (and its patches) for sampling a latent of `latent_shape`; returns the device to sample on."""
    if not IN_COMFYUI:
        return model.load_device
    shape = list(latent_shape)
    batch = shape[0] * (2 if guided else 1)
    memory_required = model.memory_required([batch] + shape[1:])
    minimum = model.memory_required(shape)
    comfy.model_management.load_models_gpu([model], memory_required=memory_required, minimum_memory_required=minimum)
    return model.load_device


def step_callback(model, steps: int) -> Optional[Callable[[dict], None]]:
    """The sampler callback: interrupt check, progress bar and live preview after every step (None outside ComfyUI)."""
    if not IN_COMFYUI:
        return None
    preview = latent_preview.prepare_callback(model, steps)  # owns a comfy.utils.ProgressBar

    def callback(info: dict) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        preview(info["step"], info["denoised"], info["x"], info["steps"])

    return callback
