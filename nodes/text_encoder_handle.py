"""The text encoder handle: what flows along a LUMINA_TEXT_ENCODER link (the core encoder and, inside ComfyUI, a
ModelPatcher so the memory manager moves it to the GPU only while it encodes)."""

from __future__ import annotations

import torch

from lumina_core import families
from lumina_core.dtypes import dtype_from_name, is_fp8
from lumina_core.text.llama import LlamaTextEncoder

from . import comfy_gguf
from .comfy_env import IN_COMFYUI, comfy, intermediate_device, plain_dtype


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
    """The text encoder in `folder` (or the single file at that path, a llama.cpp GGUF included): LLaMA-2
    (Lumina-T2I), or the encoder of `family` (a lumina_core Family)."""
    encoder_class = LlamaTextEncoder if family is None else family.text_encoder_class()
    # ComfyUI's single files (Gemma-2) and GGUF files have loaders of their own; folders are Hugging Face folders
    # (or hold one GGUF and its tokenizer files).
    load = families.text_encoder_loader(encoder_class, folder)
    if not IN_COMFYUI:
        return LuminaTextEncoderHandle(load(folder, dtype=plain_dtype(dtype_choice)))
    mm = comfy.model_management
    load_device, offload_device = mm.text_encoder_device(), mm.text_encoder_offload_device()
    dtype = _text_encoder_dtype(dtype_choice, load_device)
    compute_dtype = None
    if is_fp8(dtype):
        compute_dtype = torch.bfloat16 if mm.should_use_bf16(load_device, prioritize_performance=False) else torch.float32
    if families.gguf_text_encoder_path(folder) is not None:
        # A GGUF keeps its own types: the dtype is the one it computes in (an fp8 choice: that of fp8 storage). Its
        # linear layers are comfy.ops layers holding the blocks, so ComfyUI moves them as it moves any layer.
        linear_cls = comfy_gguf.gguf_operations().Linear
        encoder = load(folder, dtype=compute_dtype or dtype, device=offload_device, linear_cls=linear_cls)
    else:
        # The linear layers (all but a few percent of LLaMA's or Gemma's weights) become comfy.ops layers: they cast
        # fp8 weights per layer, and ComfyUI's low-VRAM mode can keep some of them in system memory and stream them
        # in.
        linear_cls = comfy.ops.pick_operations(dtype, compute_dtype, load_device=load_device).Linear
        encoder = load(folder, dtype=dtype, device=offload_device, compute_dtype=compute_dtype, linear_cls=linear_cls)
    # ModelPatcher moves the encoder to the GPU for encoding (partly, in low-VRAM mode) and back when the DiT needs
    # the memory.
    patcher = comfy.model_patcher.ModelPatcher(
        LuminaLlamaModule(encoder.model), load_device=load_device, offload_device=offload_device
    )
    return LuminaTextEncoderHandle(encoder, patcher)


def load_family_text_encoder(folder: str, dtype_choice: str) -> LuminaTextEncoderHandle:
    """The text encoder in `folder` (or single file), of the family its config.json or keys name (LLaMA-2, Gemma or
    Gemma-2)."""
    return load_text_encoder(folder, dtype_choice, family=families.text_encoder_family(folder))


def takes_system_prompt(handle: LuminaTextEncoderHandle) -> bool:
    """Whether the encoder prefixes a system prompt (Lumina-Image-2.0's Gemma-2 does; LLaMA-2 and Gemma do not)."""
    return getattr(handle.encoder, "system_prompts", None) is not None


def encode_text(
    handle: LuminaTextEncoderHandle, text: str, system_prompt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and mask of one prompt; system_prompt (a preset name or the text) only reaches encoders that take
    one, and is ignored by the others."""
    if handle.patcher is not None:
        comfy.model_management.load_models_gpu([handle.patcher])
    options = {"system_prompt": system_prompt} if takes_system_prompt(handle) else {}
    return handle.encoder.encode([text], output_device=intermediate_device(), **options)


