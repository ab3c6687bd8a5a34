"""LLaMA text encoder of Lumina-T2I: load a Hugging Face LLaMA folder and turn prompts into caption features.

Follows SPEC.md §3 (the original `lumina_t2i/demo.py`): every prompt is [BOS] + tokens + [EOS], right padded with
id 0, never truncated by default; the features are `last_hidden_state` of `LlamaModel` (after its final RMSNorm),
computed without an attention mask; the mask is returned for the DiT only.

Loading follows the meta-device pattern of flux's `load_flow_model`: the model is built on the `meta` device, every
tensor is read on its own from its (memory-mapped) file and cast to the target dtype as it is read, then assigned
with `load_state_dict(strict=True, assign=True)`, so the peak memory is about one copy of the weights in the target
dtype. `lm_head.weight` of a `LlamaForCausalLM` checkpoint is never read.

With an fp8 dtype the linear layers of the meta model are swapped for casting layers before any weight is read
(`lumina_core.casting`): their weights are stored in fp8 and cast per layer; the embedding and the norms are kept in
the compute dtype, which is then also the dtype of the hidden states.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
from pathlib import Path
import time
import zipfile
from collections.abc import Sequence

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaModel

from .casting import CastLinear, fp8_compute_dtype, is_fp8, storage_dtypes, swap_linear_layers
from .tensor_io import SafetensorsFile

logger = logging.getLogger(__name__)

LLAMA2_7B = "meta-llama/Llama-2-7b-hf"
TRAINED_TOKENS = 128  # caption length at training (train.py max_words)
_GET_LLAMA = (
    f"Lumina-T2I needs the Hugging Face folder of LLaMA-2-7B ({LLAMA2_7B}): config.json, the tokenizer files "
    "and the weights, kept together in one folder."
)

# Keys that a published checkpoint may hold but LlamaModel must not load.
_LM_HEAD = "lm_head.weight"  # the LlamaForCausalLM output projection: not part of the text encoder
# Old LLaMA conversions saved the rotary inverse frequencies with the weights; they are recomputed from config.json.
_ROTARY_SUFFIX = "rotary_emb.inv_freq"

# model_type of text encoders people mistake for Lumina-T2I's, with what they are.
_GEMMA = "Gemma belongs to Lumina-Next / Lumina-Image-2.0, not Lumina-T2I"
_GEMMA1 = (
    f"{_GEMMA}: this is a first-generation Gemma, the model of Lumina-Next's text encoder (google/gemma-2b). "
    "Load it with GemmaTextEncoder (in ComfyUI: the Lumina Load Text Encoder node) and use it with a Lumina-Next DiT"
)
_GEMMA2 = (
    f"{_GEMMA}: Gemma-2 is the text encoder of Lumina-Image-2.0 (gemma-2-2b), which ComfyUI's own nodes run, "
    "not this pack"
)
_GEMMA3 = (
    "Gemma-3 is the text encoder of no Lumina model this pack runs (Lumina-T2I needs LLaMA-2-7B, Lumina-Next "
    "needs Gemma-2B, google/gemma-2b)"
)
_T5 = "T5 is the text encoder used by other models such as SD3/Flux/PixArt; Lumina-T2I needs LLaMA-2-7B"
_CLIP = "CLIP is the text encoder of SD1.x/SDXL (and a helper of SD3/Flux); Lumina-T2I needs LLaMA-2-7B"
_KNOWN_OTHER_ENCODERS = {
    "gemma": _GEMMA1,
    "gemma2": _GEMMA2,
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "clip": _CLIP,
    "clip_text_model": _CLIP,
}


class TextEncoderError(ValueError):
    """A text encoder folder that cannot be used, with a message naming the folder or file and the fix."""


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
        return self.model.embed_tokens.weight.dtype

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
        compute_dtype = fp8_compute_dtype(device) if fp8 else dtype
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
    sources = _index_weights(folder, files, expected, source, model_cls.__name__)
    state_dict = _read_weights(sources, storage_dtypes(model, dtype, compute_dtype), device, source)
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


class LlamaTextEncoder(HFTextEncoder):
    """A LlamaModel and its tokenizer, producing Lumina-T2I caption features."""

    family = "lumina_t2i"

    @classmethod
    def from_folder(
        cls,
        path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device="cpu",
        compute_dtype: torch.dtype | None = None,
        linear_cls=None,
    ) -> LlamaTextEncoder:
        """Load a Hugging Face LLaMA folder (LlamaModel or LlamaForCausalLM weights) as published.

        dtype: the storage dtype; an fp8 dtype keeps the linear weights in fp8, computed in `compute_dtype` (default
        bf16, or fp32 on a CPU without bf16). linear_cls: the casting linear layer used for fp8 (default the core's
        CastLinear; ComfyUI passes its own), or, when given for another dtype, for every linear layer.
        """
        device, _fp8, compute_dtype = storage_plan(dtype, device, compute_dtype)
        start = time.perf_counter()
        folder = os.fspath(path)
        _check_folder(folder)
        _check_llama_config(folder)
        _check_tokenizer_files(folder)
        files = _find_weight_files(folder)
        tokenizer = _load_tokenizer(folder)
        config = read_hf_config(LlamaConfig, folder, tokenizer, _GET_LLAMA)
        model = load_hf_weights(LlamaModel, config, folder, files, dtype=dtype, compute_dtype=compute_dtype,
                                linear_cls=linear_cls, device=device)
        _rebuild_rotary_buffers(model, device)
        model.eval().requires_grad_(False)

        encoder = cls(model, tokenizer, folder)
        encoder.storage_dtype = dtype
        log_loaded("LLaMA", encoder, dtype, compute_dtype, device, start)
        return encoder

    def tokenize(self, prompts: str | Sequence[str], *, max_tokens: int | None = None):
        """Token ids [B, L] (int64, right padded with 0) and mask [B, L] (bool, True on real tokens).

        Each prompt becomes [BOS] + tokens + [EOS]; nothing is cut unless max_tokens is given. A longer sequence is
        then cut to its first max_tokens ids, EOS included in what is dropped, and a warning says how many tokens
        were dropped. That is how Lumina-T2I's training cut captions (train.py: `tokenized_caption[:max_words]`,
        max_words=128), so max_tokens=128 gives a long caption exactly the sequence the model was trained on.
        """
        prompts = _as_prompt_list(prompts)
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (BOS and EOS), got {max_tokens}")
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        # BOS and EOS are added here, the one place that decides the sequence layout, instead of by the tokenizer:
        # whether add_bos_token/add_eos_token take effect depends on the tokenizer class and the transformers
        # version (the fast tokenizers of transformers 5 keep their saved post-processor).
        pieces = self.tokenizer(prompts, add_special_tokens=False, truncation=False)["input_ids"]
        rows = []
        for i, text_ids in enumerate(pieces):
            row = [bos, *text_ids, eos]
            if max_tokens is None and len(row) > TRAINED_TOKENS:
                logger.info(
                    "Prompt %d has %d tokens; Lumina-T2I was trained on captions of up to %d. It is used whole "
                    "(no truncation), as the original demo does.",
                    i,
                    len(row),
                    TRAINED_TOKENS,
                )
            if max_tokens is not None and len(row) > max_tokens:
                logger.warning(
                    "Prompt %d has %d tokens (BOS and EOS included); truncated to max_tokens=%d, %d tokens dropped.",
                    i,
                    len(row),
                    max_tokens,
                    len(row) - max_tokens,
                )
                row = row[:max_tokens]
            rows.append(row)

        length = max(len(row) for row in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)  # pad id 0, as the original
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return ids, mask

    def encode(self, prompts: str | Sequence[str], *, max_tokens: int | None = None, output_device=None):
        """Caption features [B, L, hidden] (float32) and mask [B, L] (bool), both on output_device (default CPU)."""
        ids, mask = self.tokenize(prompts, max_tokens=max_tokens)
        # no_grad rather than inference_mode: the features stay ordinary tensors that callers may use anywhere.
        with torch.no_grad():
            # No attention mask (SPEC §3): LLaMA is causal and the padding is on the right, so the real tokens
            # never see it; this matches how Lumina-T2I computed its training features.
            hidden = self.model(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
        out = torch.device("cpu") if output_device is None else torch.device(output_device)
        return hidden.to(device=out, dtype=torch.float32), mask.to(out)


def _as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("No prompts given: pass a string or a non-empty list of strings.")
    return prompts


# --- checks on the folder -------------------------------------------------------------------------------------


def _check_folder(folder: str, get: str = _GET_LLAMA) -> None:
    """Raise unless folder is an existing directory; get says which folder the model needs."""
    if not os.path.exists(folder):
        raise TextEncoderError(f"Text encoder folder {folder} does not exist. {get}")
    if not os.path.isdir(folder):
        raise TextEncoderError(
            f"{folder} is a file, not a folder. Lumina's text encoders are loaded from a whole Hugging Face "
            f"folder, not a single weights file. {get}"
        )


def _check_llama_config(folder: str) -> None:
    """Raise unless config.json exists and describes a LLaMA model; say what the model is otherwise."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        if os.path.isfile(os.path.join(folder, "params.json")):
            hint = (
                "It looks like Meta's original LLaMA release (params.json, consolidated.*.pth); use the Hugging "
                f"Face conversion, {LLAMA2_7B}. "
            )
        elif os.path.isfile(os.path.join(folder, "model_index.json")):
            hint = "It looks like the root of a diffusers pipeline; select the text encoder's own folder. "
        else:
            hint = ""
        raise TextEncoderError(f"No config.json in {folder}. {hint}{_GET_LLAMA}")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as err:
        raise TextEncoderError(f"Could not read {config_path}: {err}. Re-download it from {LLAMA2_7B}.") from err
    if not isinstance(raw, dict):
        raise TextEncoderError(f"{config_path} is not a Hugging Face model config (not a JSON object).")

    model_type = str(raw.get("model_type", "")).lower()
    architectures = [str(a) for a in raw.get("architectures") or []]
    is_llama = model_type == "llama" or (not model_type and any(a.startswith("Llama") for a in architectures))
    if not is_llama:
        what = f"model_type {model_type!r}" if model_type else "no model_type"
        if architectures:
            what += f", architectures {architectures}"
        known = _KNOWN_OTHER_ENCODERS.get(model_type)
        detail = f"{known}. " if known else "Lumina-T2I needs a LLaMA model. "
        raise TextEncoderError(
            f"{folder} holds a model that is not LLaMA ({what} in config.json). {detail}{_GET_LLAMA}"
        )


def _check_tokenizer_files(folder: str, source: str = LLAMA2_7B) -> None:
    if not any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model")):
        raise TextEncoderError(
            f"No tokenizer in {folder}: expected tokenizer.json and/or tokenizer.model (with tokenizer_config.json). "
            f"Copy the tokenizer files published with the model ({source}) into this folder."
        )


def _load_tokenizer(folder: str):
    try:
        # add_bos_token/add_eos_token mirror the original for callers using the tokenizer directly;
        # LlamaTextEncoder.tokenize adds BOS and EOS itself and does not depend on them.
        tokenizer = AutoTokenizer.from_pretrained(
            folder, use_fast=True, add_bos_token=True, add_eos_token=True, local_files_only=True
        )
    except Exception as err:  # transformers raises many kinds here; all mean the same to the user
        raise TextEncoderError(
            f"Could not load the tokenizer in {folder}: {err}. Copy the tokenizer files published with the model "
            f"({LLAMA2_7B}: tokenizer.json, tokenizer.model, tokenizer_config.json) into this folder."
        ) from err
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise TextEncoderError(
            f"The tokenizer in {folder} defines no BOS/EOS token (bos={tokenizer.bos_token!r}, "
            f"eos={tokenizer.eos_token!r}), so it is not LLaMA's tokenizer. {_GET_LLAMA}"
        )
    tokenizer.padding_side = "right"
    return tokenizer


# --- weights ----------------------------------------------------------------------------------------------------


def _find_weight_files(folder: str, source: str = LLAMA2_7B) -> list[str]:
    """The weight files to read: safetensors (preferred; as listed by the index if there is one), else .bin.

    source: the Hugging Face repository the folder should be a copy of, named in the errors.
    """
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    names = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise TextEncoderError(
                    f"Could not read the shard index {index_path}: {err!r}. Re-download it from {source}."
                ) from err
            missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
            if missing:
                raise TextEncoderError(
                    f"{index_path} lists {len(names)} weight files but {len(missing)} are missing from {folder}: "
                    f"{', '.join(missing[:4])}. Download every shard."
                )
            return [os.path.join(folder, n) for n in names]
        files = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if files:
            return files
    raise TextEncoderError(
        f"No weights in {folder}: expected *.safetensors (or pytorch_model*.bin) files next to config.json. "
        f"Download the weights of {source} into this folder."
    )


def _refuse_file(
    path: str, err: BaseException | None = None, reason: str | None = None, source: str = LLAMA2_7B
) -> TextEncoderError:
    """The error for a weights file that cannot be read: says why, as precisely as can be told, and the fix."""
    if reason is None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
        if size == 0:
            reason = "it is empty (0 bytes): the download did not finish"
        elif head.startswith(b"version https://git-lfs"):
            reason = "it is a Git LFS pointer, not the weights: run `git lfs pull` in the folder"
        else:
            reason = f"it is corrupted or truncated ({str(err).splitlines()[0] if err else 'unreadable'})"
    return TextEncoderError(f"Could not read the weights file {path}: {reason}. Re-download it from {source}.")


def _load_bin(path: str, source: str = LLAMA2_7B) -> dict:
    """A pytorch_model*.bin state dict, memory-mapped, refusing anything that is not plain tensors.

    weights_only=True makes torch.load refuse pickles that would call arbitrary code; there is deliberately no
    fallback to weights_only=False. mmap=True leaves the data on disk until a tensor is copied out.
    """
    if os.path.getsize(path) == 0 or not zipfile.is_zipfile(path):
        # mmap needs torch's zip format; anything else is empty, truncated, or the pre-1.6 legacy format.
        reason = None
        if os.path.getsize(path) > 0:
            reason = (
                "it is not a zip-format torch checkpoint: it is truncated or corrupted, or saved in the legacy "
                "(pre-1.6) format that cannot be memory-mapped (convert it to safetensors)"
            )
        raise _refuse_file(path, reason=reason, source=source)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise _refuse_file(
            path,
            reason=(
                "it was refused because unpickling it needs arbitrary code (it could run anything on this machine), "
                "or it is corrupted; nothing in it was executed. Use the model's .safetensors weights instead"
            ),
            source=source,
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise _refuse_file(path, err, source=source) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _refuse_file(path, reason="it does not hold a plain state dict of tensors", source=source)
    return state


def _index_weights(
    folder: str,
    files: list[str],
    expected: dict[str, tuple],
    source: str = LLAMA2_7B,
    model_name: str = "LlamaModel",
) -> dict[str, tuple[str, str]]:
    """Map each key of the bare decoder (model_name, e.g. LlamaModel) to (file, key in file); raise on any mismatch.

    Reads headers only. A *ForCausalLM checkpoint's "model." prefix is dropped and its lm_head is never read.

    Everything is checked before a single tensor is read, so a wrong folder fails in seconds, not after 13 GB.
    """
    sources: dict[str, tuple[str, str]] = {}
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    for path in files:
        for key, shape in _tensor_shapes(path, source):
            if key == _LM_HEAD or key.endswith(_ROTARY_SUFFIX):
                continue
            # LlamaForCausalLM keeps the decoder under "model."; LlamaModel has no submodule of that name.
            name = key.removeprefix("model.")
            if name not in expected:
                unexpected.append(f"{key} ({os.path.basename(path)})")
            elif name in sources:
                raise TextEncoderError(
                    f"{key} is stored twice, in {sources[name][0]} and {path}: remove the stale weight files "
                    f"from {folder} (keep one complete set)."
                )
            else:
                sources[name] = (path, key)
                if shape != expected[name]:
                    wrong_shape.append(f"{key}: {list(shape)} in {os.path.basename(path)}, {list(expected[name])}")
    missing = [name for name in expected if name not in sources]
    if missing or unexpected:
        raise TextEncoderError(
            f"The weights in {folder} do not match {model_name} as described by its config.json: "
            f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}. "
            f"config.json and the weight files must come from the same checkpoint ({source})."
        )
    if wrong_shape:
        raise TextEncoderError(
            f"The weights in {folder} have other shapes than its config.json describes (found, expected): "
            f"{'; '.join(wrong_shape[:4])}. config.json and the weight files must come from the same checkpoint."
        )
    return sources


def _tensor_shapes(path: str, source: str = LLAMA2_7B) -> list[tuple[str, tuple]]:
    if path.endswith(".bin"):
        return [(k, tuple(v.shape)) for k, v in _load_bin(path, source).items()]
    st = SafetensorsFile(Path(path), error=TextEncoderError)
    return [(k, st.shape(k)) for k in st.keys]


def _read_weights(
    sources: dict[str, tuple[str, str]], dtypes, device: torch.device, source: str = LLAMA2_7B
) -> dict:
    """Read every tensor once, cast it to its dtype on device as it is read, one tensor in flight at a time.

    dtypes: one torch.dtype for every tensor, or a dict name -> dtype (fp8 storage keeps norms in the compute dtype).
    """
    if isinstance(dtypes, torch.dtype):
        dtypes = dict.fromkeys(sources, dtypes)
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (path, key) in sources.items():
        by_file.setdefault(path, []).append((name, key))
    state_dict = {}
    for path, entries in by_file.items():
        if path.endswith(".bin"):
            _read_bin_file(path, entries, dtypes, device, state_dict, source)
        else:
            _read_safetensors_file(path, entries, dtypes, device, state_dict)
    return state_dict


def _read_bin_file(
    path: str, entries, dtypes: dict, device: torch.device, state_dict: dict, source: str = LLAMA2_7B
) -> None:
    # One mapping per file: its pages stay mapped until the file's last tensor is copied, but they are clean file
    # pages the kernel can drop under pressure, not a second copy in memory.
    stored = _load_bin(path, source)
    for name, key in entries:
        state_dict[name] = _copy_as(stored.pop(key), dtypes[name], device)


def _read_safetensors_file(path: str, entries, dtypes: dict, device: torch.device, state_dict: dict) -> None:
    # Positioned reads in file order, one tensor at a time (tensor_io explains why not a memory map).
    st = SafetensorsFile(Path(path), error=TextEncoderError)
    for name, key in sorted(entries, key=lambda entry: st.offset(entry[1])):
        state_dict[name] = _copy_as(st.get(key), dtypes[name], device, True)  # owned: a fresh read buffer


def _copy_as(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, owned: bool = False) -> torch.Tensor:
    """The tensor in dtype on device, never a view into the file (which would keep it mapped).

    owned: the tensor is already a private buffer (read, not mapped), so no copy is needed when it has the target
    dtype and device.
    """
    if owned:
        return tensor.to(device=device, dtype=dtype)
    return torch.empty(tensor.shape, dtype=dtype, device=device).copy_(tensor)


def _rebuild_rotary_buffers(model, device: torch.device) -> None:
    """Re-create the rotary embedding, whose non-persistent inv_freq buffers are still on the meta device.

    The buffers are computed on the CPU in float32 from config.json, as a normally constructed model does, then
    moved, so the result does not depend on the device loaded to. Works for any transformers decoder with a
    top-level `rotary_emb` (LlamaModel, GemmaModel); it fails if any other tensor is still on the meta device.
    """
    with torch.device("cpu"):
        rotary = type(model.rotary_emb)(config=model.config)
    model.rotary_emb = rotary.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:  # a transformers version with other non-persistent state: fail loudly rather than compute garbage
        raise RuntimeError(f"{type(model).__name__} tensors left uninitialised after loading: {left[:4]}")
