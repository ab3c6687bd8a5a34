"""What the Lumina text encoders share: a Hugging Face decoder model loaded from its folder on the meta device, its
weights read one tensor at a time in the storage dtype (`hf_weights`), its tokenizer, and the checks that name
what a wrong folder holds. Each encoder module (`llama`, `gemma`) says only what differs: the config check, the
tokenization, which hidden state.

Loading follows the meta-device pattern of flux's `load_flow_model`: the model is built on the `meta` device, every
tensor is read on its own and cast to the target dtype as it is read, then assigned with
`load_state_dict(strict=True, assign=True)`, so the peak memory is about one copy of the weights in the target
dtype. With an fp8 dtype the linear layers of the meta model are swapped for casting layers before any weight is
read (`lumina_core.weights.fp8`): their weights are stored in fp8 and cast per layer; the embedding and the norms
are kept in the compute dtype, which is then also the dtype of the hidden states.
"""

from __future__ import annotations

import json
import logging
import os
import time

import torch

from ..dtypes import compute_dtype_for, is_fp8
from ..weights.fp8 import CastLinear, storage_dtypes, swap_linear_layers
from .hf_weights import LLAMA2_7B, TextEncoderError, find_weight_files, index_weights, read_weights

logger = logging.getLogger(__name__)


def check_cap_feat_dim(hidden_size: int, cap_feat_dim: int, *, encoder_name: str = "", dit_name: str = "") -> None:
    """Raise ValueError unless the text encoder's features have the width the DiT's caption layers expect."""
    if hidden_size == cap_feat_dim:
        return
    encoder = f"text encoder {encoder_name!r}" if encoder_name else "text encoder"
    dit = f"DiT {dit_name!r}" if dit_name else "DiT"
    raise ValueError(
        f"The {encoder} produces {hidden_size}-dim features but the {dit} expects cap_feat_dim={cap_feat_dim}. "
        f"Load a text encoder with hidden size {cap_feat_dim} (for Lumina-T2I's 5B DiT: {LLAMA2_7B}, hidden size "
        "4096), or the DiT that was trained with this text encoder."
    )




class HFTextEncoder:
    """A Hugging Face decoder model (`model`, with `embed_tokens`) and its tokenizer: what the Lumina text encoders
    share. `model` may be moved between devices by a caller (ComfyUI's memory manager); `encode` always runs it where
    its parameters are."""

    family: str = ""
    title = ""  # "LLaMA", in the load log
    source = LLAMA2_7B  # the repository the folder should be a copy of, named in the errors
    get_hint = ""  # which folder the model needs, appended to the errors
    gguf_architecture = ""  # general.architecture of this model's llama.cpp GGUF files

    @classmethod
    def from_folder(
        cls,
        path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device="cpu",
        compute_dtype: torch.dtype | None = None,
        linear_cls=None,
    ):
        """Load the Hugging Face folder at `path` (bare model or *ForCausalLM weights) as published; never downloads.

        dtype: the storage dtype; an fp8 dtype keeps the linear weights in fp8, computed in `compute_dtype` (default
        bf16, or fp32 on a CPU without bf16: `lumina_core.dtypes.compute_dtype_for`). linear_cls: the casting linear
        layer used for fp8 (default the core's CastLinear; ComfyUI passes its own), or, when given for another
        dtype, for every linear layer.
        """
        device, _fp8, compute_dtype = storage_plan(dtype, device, compute_dtype)
        start = time.perf_counter()
        folder = os.fspath(path)
        check_folder(folder, cls.get_hint)
        cls.check_config(folder)
        tokenizer_folder = cls.tokenizer_folder(folder)
        files = find_weight_files(folder, cls.source)
        tokenizer = cls.load_tokenizer(tokenizer_folder)
        config = read_hf_config(cls.config_class(), folder, tokenizer, cls.get_hint)
        cls.check_model_config(config, folder)
        model = load_hf_weights(cls.model_class(), config, folder, files, dtype=dtype, compute_dtype=compute_dtype,
                                linear_cls=linear_cls, device=device, source=cls.source)
        cls.rebuild_buffers(model, device)
        model.eval().requires_grad_(False)

        encoder = cls(model, tokenizer, folder)
        encoder.storage_dtype = dtype
        log_loaded(cls.title, encoder, dtype, compute_dtype, device, start)
        return encoder

    @classmethod
    def from_gguf(
        cls,
        path,
        *,
        dtype: torch.dtype | None = torch.bfloat16,
        device="cpu",
        compute_dtype: torch.dtype | None = None,
        linear_cls=None,
    ):
        """Load a llama.cpp GGUF of this model (the .gguf file, or a folder holding one .gguf and the tokenizer
        files), its linear weights and embedding kept quantized: see `gguf_text`. dtype: the compute dtype (None:
        fp32); linear_cls: a linear layer with `load_quantized` (ComfyUI's GGUF layer), default GGUFLinear."""
        from .gguf_text import load_gguf_text_encoder  # the gguf package, for these files only
        from .single_file import gguf_in_folder

        if os.path.isdir(path):
            found = gguf_in_folder(path)
            if found is None:
                raise TextEncoderError(
                    f"{path} is not a GGUF text encoder folder (one .gguf file, the tokenizer files, and no other "
                    f"weights). {cls.get_hint}"
                )
            path = found
        return load_gguf_text_encoder(cls, path, dtype=dtype, device=device, compute_dtype=compute_dtype,
                                      linear_cls=linear_cls)

    # What each encoder says for itself.
    @classmethod
    def check_config(cls, folder: str) -> None:
        """Raise unless config.json describes this encoder's model, saying what it holds otherwise."""
        raise NotImplementedError

    @classmethod
    def tokenizer_folder(cls, folder: str) -> str:
        check_tokenizer_files(folder, cls.source)
        return folder

    @classmethod
    def load_tokenizer(cls, folder: str):
        raise NotImplementedError

    @classmethod
    def check_model_config(cls, config, folder: str) -> None:
        pass

    @classmethod
    def rebuild_buffers(cls, model, device: torch.device) -> None:
        rebuild_rotary_buffers(model, device)

    def __init__(self, model, tokenizer, folder: str):
        self.model = model
        self.tokenizer = tokenizer
        self.folder = folder
        self.hidden_size = int(model.config.hidden_size)
        self.storage_dtype = self.dtype  # the linear weights' dtype (fp8 when loaded so); `dtype` is the compute dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the hidden states)."""
        embed = self.model.embed_tokens
        return getattr(embed, "compute_dtype", embed.weight.dtype)  # a GGUF embedding holds bytes

    def to(self, device):
        self.model.to(device)
        return self


def storage_plan(dtype, device, compute_dtype):
    """(device, fp8, compute_dtype) of a text-encoder load: fp8 storage computes in bf16 (fp32 on a CPU without
    bf16) unless compute_dtype is given; other dtypes compute in themselves."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    device = torch.device(device)
    fp8 = is_fp8(dtype)
    if compute_dtype is None:
        compute_dtype = compute_dtype_for(device) if fp8 else dtype
    return device, fp8, compute_dtype


def read_hf_config(config_cls, folder: str, tokenizer, get_hint: str):
    """The folder's config.json as `config_cls` (SDPA attention), checked against the tokenizer's size."""
    try:
        config = config_cls.from_pretrained(folder, attn_implementation="sdpa", local_files_only=True)
    except Exception as err:  # a config.json transformers cannot parse: name the file
        raise TextEncoderError(f"Could not read {os.path.join(folder, 'config.json')}: {err}") from err
    if config.vocab_size < len(tokenizer):
        raise TextEncoderError(
            f"The tokenizer in {folder} has {len(tokenizer)} tokens but config.json declares vocab_size="
            f"{config.vocab_size}: the tokenizer and the model are from different checkpoints. {get_hint}"
        )
    return config


def load_hf_weights(model_cls, config, folder: str, files: list[str], *, dtype, compute_dtype, linear_cls, device,
                    source: str = LLAMA2_7B):
    """`model_cls(config)` built on the meta device and filled from `files`, one tensor at a time in its storage
    dtype (fp8: linear weights in fp8 through `linear_cls`, default CastLinear; the rest in compute_dtype).
    Non-persistent buffers are the caller's to rebuild."""
    # Parameters on the meta device cost nothing; every real tensor comes from the files.
    with torch.device("meta"):
        model = model_cls(config)
    if is_fp8(dtype) or linear_cls is not None:
        swap_linear_layers(model, linear_cls or CastLinear)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    sources = index_weights(folder, files, expected, source, model_cls.__name__)
    state_dict = read_weights(sources, storage_dtypes(model, dtype, compute_dtype), device, source)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def log_loaded(what: str, encoder: HFTextEncoder, dtype, compute_dtype, device, start: float) -> None:
    computed = f" computed in {str(compute_dtype).removeprefix('torch.')}" if is_fp8(dtype) else ""
    logger.info(
        "Loaded %s text encoder from %s: %s on %s, %s parameters (hidden size %d, %d layers) in %.1f s",
        what,
        encoder.folder,
        str(dtype).removeprefix("torch.") + computed,
        device,
        f"{sum(p.numel() for p in encoder.model.parameters()):,}",
        encoder.hidden_size,
        encoder.model.config.num_hidden_layers,
        time.perf_counter() - start,
    )


def as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("No prompts given: pass a string or a non-empty list of strings.")
    return prompts



def check_folder(folder: str, get: str) -> None:
    """Raise unless folder is an existing directory; get says which folder the model needs."""
    if not os.path.exists(folder):
        raise TextEncoderError(f"Text encoder folder {folder} does not exist. {get}")
    if not os.path.isdir(folder):
        raise TextEncoderError(
            f"{folder} is a file, not a folder. Lumina's text encoders are loaded from a whole Hugging Face "
            f"folder, not a single weights file. {get}"
        )


def check_tokenizer_files(folder: str, source: str = LLAMA2_7B) -> None:
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model")):
        raise TextEncoderError(
            f"No tokenizer in {folder}: expected tokenizer.json and/or tokenizer.model (with tokenizer_config.json). "
            f"Copy the tokenizer files published with the model ({source}) into this folder."
        )


def right_padded(rows: list, *, pad_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows as ids [B, length] (int64, right padded with pad_id) and mask [B, length] (bool, True on the
    rows' own tokens)."""
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


def read_config_json(folder: str) -> dict | None:
    """config.json of a folder as a dict, or None when it is missing or not a JSON object."""
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def model_type_of(raw: dict) -> str:
    """config.json's model_type, or one inferred from `architectures` when a hand-written config lacks it."""
    model_type = str(raw.get("model_type") or "").lower()
    if model_type:
        return model_type
    architectures = [str(a) for a in raw.get("architectures") or []]
    for prefix, name in (("Gemma3", "gemma3"), ("Gemma2", "gemma2"), ("Gemma", "gemma"), ("Llama", "llama")):
        if any(a.startswith(prefix) for a in architectures):
            return name
    return ""


def load_tokenizer(folder: str, *, title: str, files: str, get_hint: str, needed: tuple, **flags):
    """AutoTokenizer of `folder` (flags passed on), right padding, refusing one without the `needed` special tokens
    ("bos", "eos", "pad"); files: the tokenizer files the model publishes, named in the errors."""
    from transformers import AutoTokenizer  # here: a GGUF encoder with a rebuilt tokenizer never imports it

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **flags)
    except Exception as err:  # transformers raises many kinds here; all mean the same to the user
        raise TextEncoderError(
            f"Could not load the tokenizer in {folder}: {err}. Copy the tokenizer files published with the model "
            f"({files}) into this folder."
        ) from err
    if any(getattr(tokenizer, f"{name}_token_id") is None for name in needed):
        found = ", ".join(f"{name}={getattr(tokenizer, f'{name}_token')!r}" for name in needed)
        raise TextEncoderError(
            f"The tokenizer in {folder} defines no {'/'.join(n.upper() for n in needed)} token ({found}), so it is "
            f"not {title}'s tokenizer. {get_hint}"
        )
    tokenizer.padding_side = "right"
    return tokenizer


def rebuild_rotary_buffers(model, device: torch.device) -> None:
    """Re-create the rotary embedding, whose non-persistent inv_freq buffers are still on the meta device.

    The buffers are computed on the CPU in float32 from config.json, as a normally constructed model does, then
    moved, so the result does not depend on the device loaded to. Works for any transformers decoder with a
    top-level `rotary_emb` (LlamaModel, GemmaModel); it fails if any other tensor is still on the meta device.
    """
    with torch.device("cpu"):
        rotary = type(model.rotary_emb)(config=model.config)
    model.rotary_emb = rotary.to(device)
    check_loaded(model)  # a transformers version with other non-persistent state: fail loudly, not compute garbage


def check_loaded(model) -> None:
    """Fail if any tensor of `model` was left on the meta device by the loading."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"{type(model).__name__} tensors left uninitialised after loading: {left[:4]}")
