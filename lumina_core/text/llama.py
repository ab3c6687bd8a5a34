"""LLaMA text encoder of Lumina-T2I: a Hugging Face LLaMA folder turning prompts into caption features.

Follows SPEC.md §3 (the original `lumina_t2i/demo.py`): every prompt is [BOS] + tokens + [EOS], right padded with
id 0, never truncated by default; the features are `last_hidden_state` of `LlamaModel` (after its final RMSNorm),
computed without an attention mask; the mask is returned for the DiT only. Loading is `hf_folder`'s;
`lm_head.weight` of a `LlamaForCausalLM` checkpoint is never read.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

import torch

from .hf_folder import HFTextEncoder, as_prompt_list, load_tokenizer, right_padded
from .hf_weights import LLAMA2_7B, TextEncoderError

logger = logging.getLogger(__name__)

TRAINED_TOKENS = 128  # caption length at training (train.py max_words)
_GET_LLAMA = (
    f"Lumina-T2I needs the Hugging Face folder of LLaMA-2-7B ({LLAMA2_7B}): config.json, the tokenizer files "
    "and the weights, kept together in one folder."
)

# model_type of text encoders people mistake for Lumina-T2I's, with what they are.
_GEMMA = "Gemma belongs to Lumina-Next / Lumina-Image-2.0, not Lumina-T2I"
_GEMMA1 = (
    f"{_GEMMA}: this is a first-generation Gemma, the model of Lumina-Next's text encoder (google/gemma-2b). "
    "Load it with GemmaTextEncoder (in ComfyUI: the Lumina Load Text Encoder node) and use it with a Lumina-Next DiT"
)
_GEMMA2 = (
    f"{_GEMMA}: Gemma-2 is the text encoder of Lumina-Image-2.0 (gemma-2-2b). Load it with Gemma2TextEncoder (in "
    "ComfyUI: the Lumina Load Text Encoder node) and use it with a Lumina-Image-2.0 DiT"
)
_GEMMA3 = (
    "Gemma-3 is the text encoder of no Lumina model this pack runs (Lumina-T2I needs LLaMA-2-7B, Lumina-Next "
    "needs Gemma-2B, google/gemma-2b, Lumina-Image-2.0 Gemma-2-2B)"
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


class LlamaTextEncoder(HFTextEncoder):
    """A LlamaModel and its tokenizer, producing Lumina-T2I caption features."""

    family = "lumina_t2i"

    title = "LLaMA"
    source = LLAMA2_7B
    get_hint = _GET_LLAMA
    gguf_architecture = "llama"

    @classmethod
    def config_class(cls):
        from transformers import LlamaConfig  # here: the GGUF route (gguf_decoder) never imports transformers

        return LlamaConfig

    @classmethod
    def model_class(cls):
        from transformers import LlamaModel

        return LlamaModel

    @classmethod
    def gguf_decoder(cls):
        """The model a llama.cpp file loads into: LLaMA's decoder in plain torch (`llama_decoder`)."""
        from .llama_decoder import LlamaDecoder

        return LlamaDecoder

    @classmethod
    def check_config(cls, folder: str) -> None:
        _check_llama_config(folder)

    @classmethod
    def load_tokenizer(cls, folder: str):
        # add_bos_token/add_eos_token mirror the original for callers using the tokenizer directly;
        # tokenize() adds BOS and EOS itself and does not depend on them.
        return load_tokenizer(
            folder, title="LLaMA", get_hint=_GET_LLAMA, needed=("bos", "eos"), use_fast=True, add_bos_token=True,
            add_eos_token=True, files=f"{LLAMA2_7B}: tokenizer.json, tokenizer.model, tokenizer_config.json",
        )

    def tokenize(self, prompts: str | Sequence[str], *, max_tokens: int | None = None):
        """Token ids [B, L] (int64, right padded with 0) and mask [B, L] (bool, True on real tokens).

        Each prompt becomes [BOS] + tokens + [EOS]; nothing is cut unless max_tokens is given. A longer sequence is
        then cut to its first max_tokens ids, EOS included in what is dropped, and a warning says how many tokens
        were dropped. That is how Lumina-T2I's training cut captions (train.py: `tokenized_caption[:max_words]`,
        max_words=128), so max_tokens=128 gives a long caption exactly the sequence the model was trained on.
        """
        prompts = as_prompt_list(prompts)
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

        return right_padded(rows, pad_id=0, length=max(len(row) for row in rows))  # pad id 0, as the original

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


