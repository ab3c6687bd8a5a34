"""Text encoders saved as one file: ComfyUI's layouts as data, and what other single files are.

ComfyUI keeps Lumina-Image-2.0's Gemma-2-2B in two files (facts read in ComfyUI's comfy/sd.py,
comfy/text_encoders/lumina2.py and spiece_tokenizer.py, comfy/supported_models.py):
  - `gemma_2_2b_fp16.safetensors` (models/text_encoders): transformers' Gemma2ForCausalLM names (`model.layers.N.*`,
    `model.embed_tokens.weight`, `model.norm.weight`) plus `spiece_model`, the tokenizer's SentencePiece ModelProto
    as a 1-D uint8 tensor;
  - the all-in-one `lumina_2.safetensors` (models/checkpoints): the same under
    `text_encoders.gemma2_2b.transformer.model.` with `text_encoders.spiece_model`, next to the DiT
    (`model.diffusion_model.`) and the VAE (`vae.`), which are not read here.
ComfyUI tells Gemma-2 from its other decoders by `layers.0.post_feedforward_layernorm.weight` without
`layers.0.self_attn.q_norm.weight` (Gemma-3 has both); so does `find_layout`.

llama.cpp's GGUF text encoders are single files too (`gguf_text` loads them); a folder holding one .gguf with the
model's tokenizer files stands for that file (`gguf_in_folder`).

Only the safetensors header is read here (no tensor, no transformers import), so the model lists can ask it of
every file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..weights.tensor_io import SafetensorsFile
from .hf_weights import TextEncoderError

SINGLE_FILE_EXTENSIONS = (".safetensors", ".sft")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # either makes a folder's tokenizer
_HF_WEIGHTS = (".safetensors", ".bin")

_GEMMA2_KEY = "layers.0.post_feedforward_layernorm.weight"  # Gemma-2 and Gemma-3 only
_GEMMA3_KEY = "layers.0.self_attn.q_norm.weight"  # Gemma-3 (and Qwen-3) only
_DECODER_KEY = "layers.0.self_attn.q_proj.weight"  # any transformers decoder of the LLaMA family
_EMBEDDING_KEY = "embed_tokens.weight"
_GEMMA_VOCAB = 256_000  # every Gemma vocabulary has at least this many tokens; LLaMA's have 32,000 or 128,256


@dataclass(frozen=True)
class TextEncoderFileLayout:
    name: str  # how people know the file, for the log and the errors
    model_type: str  # config.json model_type of the model it holds
    prefix: str  # in front of the bare model's keys (e.g. Gemma2Model's `layers.0.mlp.up_proj.weight`)
    tokenizer_key: str  # the SentencePiece ModelProto, a 1-D uint8 tensor


LAYOUTS = (
    TextEncoderFileLayout(
        "ComfyUI's Gemma-2-2B single file (gemma_2_2b_fp16.safetensors)", "gemma2", "model.", "spiece_model"
    ),
    TextEncoderFileLayout(
        "the Gemma-2-2B in ComfyUI's all-in-one Lumina-Image-2.0 checkpoint (lumina_2.safetensors)",
        "gemma2",
        "text_encoders.gemma2_2b.transformer.model.",
        "text_encoders.spiece_model",
    ),
)


def open_weights(path, error=TextEncoderError) -> SafetensorsFile:
    """The safetensors file at `path` (header read only), refusing anything else with `error`."""
    path = Path(path)
    if not path.exists():
        raise error(f"Text encoder file {path} does not exist.")
    if not path.is_file() or not path.name.lower().endswith(SINGLE_FILE_EXTENSIONS):
        raise error(
            f"{path} is not a .safetensors file: a text encoder is loaded from a Hugging Face folder or from "
            "ComfyUI's single .safetensors file."
        )
    return SafetensorsFile(path, error=error)


def find_layout(keys) -> TextEncoderFileLayout | None:
    """The layout whose Gemma-2 keys the file holds (its tokenizer may still be missing), or None."""
    keys = set(keys)
    for layout in LAYOUTS:
        if layout.prefix + _GEMMA2_KEY in keys and layout.prefix + _GEMMA3_KEY not in keys:
            return layout
    return None


def model_type_of_file(st: SafetensorsFile) -> str:
    """The config.json model_type of the decoder a file holds, told from its keys and its vocabulary size, for the
    messages: "gemma2", "gemma3", "gemma" (first generation), "llama", or "" when it holds no such decoder.

    Gemma-1 and LLaMA have the same key names; only the vocabulary tells them apart (256,000 tokens or more: Gemma).
    """
    keys = set(st.keys)
    layout = find_layout(keys)
    if layout is not None:
        return layout.model_type
    for prefix in ("", "model.", *(layout.prefix for layout in LAYOUTS)):
        if prefix + _GEMMA3_KEY in keys and prefix + _GEMMA2_KEY in keys:
            return "gemma3"
        if prefix + _GEMMA2_KEY in keys:
            return "gemma2"
        if prefix + _DECODER_KEY in keys:
            embedding = prefix + _EMBEDDING_KEY
            vocab = st.shape(embedding)[0] if embedding in keys else 0
            return "gemma" if vocab >= _GEMMA_VOCAB else "llama"
    return ""


def loadable_layout(st: SafetensorsFile) -> TextEncoderFileLayout | None:
    """The layout of a file that can be loaded as it is (weights and tokenizer), or None."""
    layout = find_layout(st.keys)
    if layout is None or layout.tokenizer_key not in st.keys:
        return None
    return layout


def file_sources(st: SafetensorsFile, layout: TextEncoderFileLayout, expected: dict, what: str, fix: str):
    """Map each key of the bare model (`expected`: name -> shape) to (file, key in file) for `read_weights`; raise
    before any tensor is read when a key is missing or has another shape. Keys outside the layout's prefix (the
    DiT and VAE of an all-in-one file, the tokenizer) are ignored; an lm_head is never read."""
    path = os.fspath(st.path)
    sources, wrong_shape, unexpected = {}, [], []
    for key in st.keys:
        if not key.startswith(layout.prefix):
            continue
        name = key[len(layout.prefix):]
        if name not in expected:
            if name != "lm_head.weight":
                unexpected.append(key)
            continue
        sources[name] = (path, key)
        if st.shape(key) != expected[name]:
            wrong_shape.append(f"{key}: {list(st.shape(key))}, expected {list(expected[name])}")
    missing = [layout.prefix + name for name in expected if name not in sources]
    if missing or unexpected:
        raise TextEncoderError(
            f"{path} does not hold a complete {what} ({layout.name}): {len(missing)} missing keys {missing[:4]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:4]}. {fix}"
        )
    if wrong_shape:
        raise TextEncoderError(
            f"The {what} weights in {path} do not fit together (the shapes read off the file disagree): "
            f"{'; '.join(wrong_shape[:4])}. {fix}"
        )
    return sources


def has_tokenizer_files(folder) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


def gguf_in_folder(folder) -> Path | None:
    """The .gguf of a folder that is a GGUF text encoder: exactly one .gguf file, tokenizer files, and no Hugging
    Face weights; else None. Never raises."""
    try:
        names = os.listdir(folder)
    except OSError:
        return None
    ggufs = [n for n in names if n.lower().endswith(".gguf") and os.path.isfile(os.path.join(folder, n))]
    if len(ggufs) != 1 or any(n.lower().endswith(_HF_WEIGHTS) for n in names) or not has_tokenizer_files(folder):
        return None
    return Path(folder) / ggufs[0]
