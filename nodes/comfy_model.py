"""The pack's DiTs as native ComfyUI MODELs: a `BaseModel` of type FLOW with the family's latent format, built from
`comfy.ops` layers, wrapped in a ModelPatcher with the Lumina sampling wrappers (see flow_model.py); outside
ComfyUI a PlainModel at the same attribute path."""

from __future__ import annotations

import types

import torch

from lumina_core import families
from lumina_core.dtypes import dtype_from_name, is_fp8
from lumina_core.models.flag_dit import FlagDiT
from lumina_core.weights.gguf_dit import load_gguf_weights
from lumina_core.weights.tensor_io import is_gguf

from . import comfy_gguf, flow_model
from .comfy_env import IN_COMFYUI, comfy, plain_dtype
from .common import text_from_conditioning
from .flow_model import comfy_dit_class
from .regions import GLOBAL_CAPTION_KEY, POOLED, POOLED_MASK, calc_cond_batch_wrapper

LUMINA_SHIFT = 4.0
WRAPPER_KEY = "lumina_t2i"


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
                global_caption = kwargs.get(GLOBAL_CAPTION_KEY)
                if global_caption is not None:  # LuminaRegionGrid's: it conditions adaLN (nodes/regions.py)
                    out[POOLED] = LuminaTextCond(global_caption[0])
                    out[POOLED_MASK] = LuminaTextCond(global_caption[1].to(torch.int64))
            return out


    _MODEL_CONFIGS: dict = {}
    # The registry's latent format names -> ComfyUI's latent formats.
    _LATENT_FORMATS = {"sdxl": comfy.latent_formats.SDXL, "flux": comfy.latent_formats.Flux}

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
    """A MODEL holding the DiT at `path`, whichever family its keys say it belongs to (Flag-DiT, Next-DiT or
    Unified Next-DiT)."""
    return load_flag_dit_model(path, dtype_choice, family=families.checkpoint_family(path))


def load_flag_dit_model(path: str, dtype_choice: str, family=None):
    """A MODEL holding the Flag-DiT at `path` (or the DiT of `family`, a lumina_core Family): a ComfyUI
    ModelPatcher inside ComfyUI, a PlainModel outside."""
    family = families.LUMINA_T2I if family is None else family
    if not IN_COMFYUI:
        return PlainModel(family.load_dit(path, dtype=plain_dtype(dtype_choice), device="cpu"))
    mm = comfy.model_management
    config = family.read_dit_config(path)  # refuses a foreign checkpoint before any weight is read
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    gguf = is_gguf(path)
    # A GGUF keeps its own types: the choice is the dtype it computes in, never fp8.
    if dtype_choice == "auto" or (gguf and is_fp8(dtype_from_name(dtype_choice))):
        supported = LuminaT2IConfig.supported_inference_dtypes
        dtype = mm.unet_dtype(model_params=_parameter_count(config, family.dit_class()), supported_dtypes=supported)
    else:
        dtype = dtype_from_name(dtype_choice)
    manual_cast_dtype = mm.unet_manual_cast(dtype, load_device, LuminaT2IConfig.supported_inference_dtypes)
    model_config = _model_config_class(family)({"dit_config": config, "family": family.name})
    model_config.set_inference_dtype(dtype, manual_cast_dtype)
    if gguf:
        return _load_gguf_model(path, family, model_config, dtype, manual_cast_dtype, load_device, offload_device)
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


def _load_gguf_model(path, family, model_config, dtype, manual_cast_dtype, load_device, offload_device):
    """The MODEL of a GGUF DiT: built from the GGUF comfy.ops layers, its quantized weights kept as blocks (read
    straight into the MODEL's layers), under ComfyUI's classic ModelPatcher (as ComfyUI-GGUF does): its low-VRAM
    partial loading moves whole layers, which the GGUF layers follow, where the dynamic-VRAM patcher stages weights
    through ComfyUI's own cast path, which a quantized layer does not take."""
    mm = comfy.model_management
    model_config.custom_operations = comfy_gguf.gguf_operations()
    model = LuminaT2I(model_config)
    load_gguf_weights(model.diffusion_model, path, dtype=dtype, device="cpu", families=(family.name,))
    model.diffusion_model.compute_dtype = manual_cast_dtype or dtype
    if not mm.is_device_cpu(offload_device):
        model.to(offload_device)
    patcher = comfy_gguf.gguf_model_patcher()(model, load_device=load_device, offload_device=offload_device)
    register_sampling_wrappers(patcher)
    return patcher


def lumina_dit(model):
    """The Lumina DiT (Flag-DiT, Next-DiT or Unified Next-DiT) inside a MODEL, or a ValueError saying which node
    to use."""
    inner = getattr(model, "model", None)
    dit = getattr(inner, "diffusion_model", None)
    family = getattr(dit, "family", None)
    if family not in families.FAMILIES or not isinstance(dit, families.get_family(family).dit_class()):
        what = type(inner).__name__ if inner is not None else type(model).__name__
        raise ValueError(
            f"The MODEL input is a {what} model, not a Lumina DiT loaded by this pack (Lumina-T2I, Lumina-Next or "
            f"Lumina-Image-2.0). Load the DiT with the Lumina Load DiT node (models/diffusion_models) and connect "
            f"that MODEL; ComfyUI's own Lumina 2 MODEL works with the Lumina CFG Guider and Lumina ODE Sampler."
        )
    return dit




def register_sampling_wrappers(patcher) -> None:
    """The Lumina per-step work (text prepared once per generation, sigma -> t, the step's extrapolation) as
    wrappers on the MODEL's patcher, registered at load: wrappers survive clone(), so every patched copy of the
    MODEL (TorchCompileModel, RenormCFG, other packs' patches) keeps them, under every ComfyUI sampler."""
    wrappers = comfy.patcher_extension.WrappersMP
    patcher.add_wrapper_with_key(wrappers.OUTER_SAMPLE, WRAPPER_KEY, flow_model.outer_sample_wrapper)
    patcher.add_wrapper_with_key(wrappers.APPLY_MODEL, WRAPPER_KEY, flow_model.apply_model_wrapper)
    # Area and mask conditioning as region captions in one forward (nodes/regions.py).
    patcher.add_wrapper_with_key(wrappers.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch_wrapper)


