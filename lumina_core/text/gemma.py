"""Gemma-2B text encoder of Lumina-Next: load a Hugging Face `google/gemma-2b` folder, turn prompts into features.

Follows the original `lumina_next_t2i` sampling code (`sample.py`/`demo.py` `encode_prompt`, SPEC §8), which is:

    tokenizer = AutoTokenizer.from_pretrained("google/gemma-2b"); tokenizer.padding_side = "right"
    inputs = tokenizer([prompt, negative], padding=True, pad_to_multiple_of=8, max_length=256, truncation=True)
    feats = AutoModel(gemma-2b)(input_ids, attention_mask, output_hidden_states=True).hidden_states[-2]

so every prompt is [BOS] + tokens, cut to 256 ids, right padded with <pad> (id 0) to the longest prompt of the
call rounded up to a multiple of 8; the features are the output of the second-to-last decoder layer (before the
final norm), computed with the attention mask. No EOS: google/gemma-2b's tokenizer_config.json says
add_eos_token false, and the `add_eos=True` that sample.py passes is not a GemmaTokenizerFast argument (that one is
`add_eos_token`), so it changes nothing. The token mask is returned for the DiT's caption pooling and
cross-attention. BOS, no EOS and right padding are applied here, not left to tokenizer flags, because transformers
5's GemmaTokenizer takes them from the folder's files and pads on the left by default.

Loading is `hf_folder`'s (meta-device model, one tensor at a time in the target dtype,
positioned safetensors reads, `weights_only` pickles, clear errors for LFS pointers, truncated files, missing
shards). Only the GemmaModel is read: the released GemmaForCausalLM ties lm_head to the embedding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from transformers import GemmaConfig, GemmaModel

from .hf_folder import (
    HFTextEncoder,
    as_prompt_list,
    check_tokenizer_files,
    load_tokenizer,
    model_type_of,
    read_config_json,
    rebuild_rotary_buffers,
    right_padded,
)
from .hf_weights import TextEncoderError

logger = logging.getLogger(__name__)

GEMMA_2B = "google/gemma-2b"
MAX_TOKENS = 256  # the original's tokenizer max_length (truncation=True)
PAD_TO_MULTIPLE_OF = 8  # the original's pad_to_multiple_of
_GET_GEMMA = (
    f"Lumina-Next needs the Hugging Face folder of Gemma-2B ({GEMMA_2B}): config.json, the tokenizer files "
    "(tokenizer.json, tokenizer_config.json) and the weights (model-*.safetensors with "
    "model.safetensors.index.json), kept together in one folder; or the text_encoder folder of a diffusers "
    "pipeline (Alpha-VLLM/Lumina-Next-SFT-diffusers) next to its tokenizer folder."
)

# What each text encoder is, for the refusal messages of the Gemma encoders (keyed by config.json model_type).
_T5 = "T5 is the text encoder used by other models such as SD3/Flux/PixArt"
_CLIP = "CLIP is the text encoder of SD1.x/SDXL (and a helper of SD3/Flux)"
_GEMMA3 = "Gemma-3 is the text encoder of no Lumina model this pack runs"
OTHER_ENCODERS = {
    "llama": (
        "LLaMA is the text encoder of Lumina-T2I (meta-llama/Llama-2-7b-hf): load it with LlamaTextEncoder (in "
        "ComfyUI: the Lumina Load Text Encoder node) and use it with a Lumina-T2I (Flag-DiT) model"
    ),
    "gemma": (
        "Gemma (the first generation, google/gemma-2b) is the text encoder of Lumina-Next: load it with "
        "GemmaTextEncoder (in ComfyUI: the Lumina Load Text Encoder node) and use it with a Lumina-Next (Next-DiT) model"
    ),
    "gemma2": (
        "Gemma-2 is the text encoder of Lumina-Image-2.0 (google/gemma-2-2b): load it with Gemma2TextEncoder (in "
        "ComfyUI: the Lumina Load Text Encoder node) and use it with a Lumina-Image-2.0 model, not with Lumina-Next, "
        "which was trained on the first Gemma"
    ),
    "gemma3": _GEMMA3,
    "gemma3_text": _GEMMA3,
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "clip": _CLIP,
    "clip_text_model": _CLIP,
}


def is_gemma_folder(path) -> bool:
    """True when path is a folder whose config.json describes a (first-generation) Gemma model.

    model_type "gemma" only: Gemma-2 ("gemma2") and Gemma-3 are other models. Never raises: an unreadable or
    missing config.json is simply not a Gemma folder.
    """
    raw = read_config_json(os.fspath(path))
    return raw is not None and model_type_of(raw) == "gemma"


def _check_gemma_config(folder: str) -> None:
    """Raise unless config.json exists and describes a Gemma (1) model; say what the model is otherwise."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        hint = ""
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            hint = (
                "It looks like the root of a diffusers pipeline; select its text encoder folder, "
                f"{os.path.join(folder, 'text_encoder')}. "
            )
        raise TextEncoderError(f"No config.json in {folder}. {hint}{_GET_GEMMA}")
    raw = read_config_json(folder)
    if raw is None:
        raise TextEncoderError(
            f"Could not read {config_path} as a Hugging Face model config (a JSON object). Re-download it from "
            f"{GEMMA_2B}."
        )
    model_type = model_type_of(raw)
    if model_type != "gemma":
        what = f"model_type {raw.get('model_type')!r}" if raw.get("model_type") else "no model_type"
        if raw.get("architectures"):
            what += f", architectures {list(raw['architectures'])}"
        known = OTHER_ENCODERS.get(model_type)
        detail = f"{known}. " if known else ""
        raise TextEncoderError(
            f"{folder} holds a model that is not Gemma-2B ({what} in config.json). {detail}{_GET_GEMMA}"
        )


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer.model"))


def pipeline_tokenizer_folder(folder: str, source: str = GEMMA_2B) -> str:
    """Where the tokenizer files are: the folder itself (a copy of `source`), or, for the `text_encoder` folder of a
    diffusers pipeline (Alpha-VLLM/Lumina-Next-SFT-diffusers, Alpha-VLLM/Lumina-Image-2.0's), its sibling
    `tokenizer` folder."""
    if _has_tokenizer(folder):
        return folder
    parent = os.path.dirname(os.path.abspath(folder))
    sibling = os.path.join(parent, "tokenizer")
    if os.path.isfile(os.path.join(parent, "model_index.json")) and _has_tokenizer(sibling):
        logger.info("Using the tokenizer of the diffusers pipeline folder %s for %s", sibling, folder)
        return sibling
    check_tokenizer_files(folder, source)  # raises, naming the folder and what to put there
    return folder


class GemmaTextEncoder(HFTextEncoder):
    """A GemmaModel and its tokenizer, producing Lumina-Next caption features (same interface as
    LlamaTextEncoder)."""

    family = "lumina_next"

    title = "Gemma"
    source = GEMMA_2B
    get_hint = _GET_GEMMA
    gguf_architecture = "gemma"

    @classmethod
    def config_class(cls):
        return GemmaConfig

    @classmethod
    def model_class(cls):
        return GemmaModel

    @classmethod
    def check_config(cls, folder: str) -> None:
        _check_gemma_config(folder)

    @classmethod
    def tokenizer_folder(cls, folder: str) -> str:
        """The folder itself (google/gemma-2b), or, for the `text_encoder` folder of a diffusers pipeline
        (Alpha-VLLM/Lumina-Next-SFT-diffusers), its sibling `tokenizer` folder."""
        return pipeline_tokenizer_folder(folder)

    @classmethod
    def load_tokenizer(cls, folder: str):
        # add_bos_token/add_eos_token and right padding mirror the original for callers that use the tokenizer
        # directly; tokenize() lays the ids out itself and does not depend on them.
        return load_tokenizer(
            folder, title="Gemma", get_hint=_GET_GEMMA, needed=("bos", "pad"), add_bos_token=True,
            add_eos_token=False,
            files=f"{GEMMA_2B}: tokenizer.json, tokenizer_config.json, special_tokens_map.json",
        )

    @classmethod
    def check_model_config(cls, config, folder: str) -> None:
        if config.num_hidden_layers < 2:
            raise TextEncoderError(
                f"config.json in {folder} declares {config.num_hidden_layers} decoder layer(s); Lumina-Next reads "
                f"the second-to-last layer's output, so at least 2 are needed. {_GET_GEMMA}"
            )

    @classmethod
    def rebuild_buffers(cls, model, device: torch.device) -> None:
        rebuild_embed_scale(model, device)
        rebuild_rotary_buffers(model, device)  # also checks that nothing is left on the meta device

    def tokenize(self, prompts: str | Sequence[str], *, max_tokens: int | None = None):
        """Token ids [B, L] (int64, right padded with <pad>) and mask [B, L] (bool, True on real tokens).

        The original's tokenizer call, done by hand: each prompt is [BOS] + its tokens, no EOS, cut to max_tokens
        ids (default 256, the original's max_length; BOS counts) with a warning naming what was dropped; L is the
        longest row rounded up to a multiple of 8. All prompts of one call share L, as the original's
        [prompt, negative] call does.
        """
        return bos_token_rows(self.tokenizer, as_prompt_list(prompts), max_tokens=max_tokens, reader="Lumina-Next")

    def encode(self, prompts: str | Sequence[str], *, max_tokens: int | None = None, output_device=None):
        """Caption features [B, L, hidden] (float32) and mask [B, L] (bool), both on output_device (default CPU).

        The features are Gemma's `hidden_states[-2]` with the attention mask passed, as the original computes them.
        `encode([prompt, negative])` is the original's joint call: both rows padded to one length.

        Encoding one prompt at a time (as a ComfyUI node does for the positive and the negative) gives each prompt
        its own padded length, but the same features on its real tokens: Gemma is causal and the padding is on the
        right, so no real token attends to a padded one, and the positions are the same. Only the padded rows
        differ, and Lumina-Next masks those out of the caption pooling and the cross-attention, so padding the two
        results to a common length with mask False gives the DiT exactly the joint call's input.
        """
        ids, mask = self.tokenize(prompts, max_tokens=max_tokens)
        return penultimate_features(self.model, ids, mask, output_device)


def bos_token_rows(tokenizer, texts: list[str], *, max_tokens: int | None, reader: str):
    """The original's tokenizer call done by hand: ids [B, L] (int64) and mask [B, L] (bool) of [BOS] + each text's
    tokens, no EOS, cut to max_tokens ids (default 256, BOS included) with a warning naming what `reader` (the model
    that reads the features) loses, right padded with <pad> to the longest row rounded up to a multiple of 8."""
    limit = MAX_TOKENS if max_tokens is None else max_tokens
    if limit < PAD_TO_MULTIPLE_OF or limit % PAD_TO_MULTIPLE_OF:
        # The original's tokenizer refuses a max_length that padding to a multiple of 8 would exceed.
        raise ValueError(
            f"max_tokens must be a positive multiple of {PAD_TO_MULTIPLE_OF} (the original pads to multiples "
            f"of {PAD_TO_MULTIPLE_OF} and cuts at {MAX_TOKENS}), got {max_tokens}"
        )
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    pieces = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
    rows = []
    for i, text_ids in enumerate(pieces):
        row = [bos, *text_ids]
        if len(row) > limit:
            logger.warning(
                "Prompt %d has %d tokens (BOS included); %s reads at most %d, %d tokens dropped.",
                i,
                len(row),
                reader,
                limit,
                len(row) - limit,
            )
            row = row[:limit]
        rows.append(row)

    longest = max(len(row) for row in rows)
    length = -(-longest // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
    return right_padded(rows, pad_id=pad, length=length)


def penultimate_features(model, ids: torch.Tensor, mask: torch.Tensor, output_device=None):
    """`hidden_states[-2]` of a Gemma decoder run with the attention mask, as float32 on output_device (default CPU),
    and the mask beside it; the model runs where its parameters are. A model loaded without its last layer and
    final norm (`penultimate_only`, a GGUF: `gguf_text`) gives the same as its last hidden state."""
    device = model.embed_tokens.weight.device
    penultimate_only = getattr(model, "penultimate_only", False)
    # no_grad rather than inference_mode: the features stay ordinary tensors that callers may use anywhere.
    with torch.no_grad():
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device=device, dtype=torch.long),  # as the tokenizer returns it
            output_hidden_states=not penultimate_only,
            use_cache=False,
        )
        # (embeddings, layer 1, ..., layer n-1, norm(layer n)): [-2] is layer n-1's output, before any norm.
        hidden = out.last_hidden_state if penultimate_only else out.hidden_states[-2]
    out_device = torch.device("cpu") if output_device is None else torch.device(output_device)
    return hidden.to(device=out_device, dtype=torch.float32), mask.to(out_device)


def rebuild_embed_scale(model, device: torch.device) -> None:
    """Re-create the embedding's non-persistent sqrt(hidden_size) scale, still on the meta device after loading.

    Computed on the CPU in float32 as a normally constructed GemmaModel does (the forward casts it to the weights'
    dtype, as the original's `normalizer` did), then moved.
    """
    embed = model.embed_tokens
    scale = getattr(embed, "embed_scale", None)
    if isinstance(scale, torch.Tensor) and scale.device.type == "meta":
        embed.embed_scale = torch.tensor(float(model.config.hidden_size) ** 0.5).to(device)
