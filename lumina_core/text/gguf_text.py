"""Text encoders from llama.cpp's GGUF files, kept quantized in memory: LLaMA-2 (architecture `llama`, Lumina-T2I),
Gemma (`gemma`, Lumina-Next) and Gemma-2 (`gemma2`, Lumina-Image-2.0). SPEC.md §10 has the format facts.

llama.cpp's converter (`convert_hf_to_gguf.py`) renames every tensor (`blk.N.attn_q.weight`), permutes LLaMA's query
and key rows for its rotary kernel, stores Gemma's RMSNorm weights plus one, and writes the configuration as
metadata (`{arch}.block_count`, ...). Loading undoes each into a model with the module names of the transformers
model a Hugging Face folder loads into (`GemmaModel`, `Gemma2Model`; for LLaMA the encoder class's `gguf_decoder`,
`llama_decoder.LlamaDecoder`, which computes what `LlamaModel` computes without importing transformers), so the
features are those of the same weights in a folder:

- names: `ARCHITECTURES` (Gemma-2's `ffn_norm` is its pre-feedforward norm, llama's and gemma's the
  post-attention norm);
- query and key rows un-permuted with the head counts of the metadata (the keys with `head_count_kv`), on the raw
  rows while still quantized (blocks never cross rows);
- Gemma norms: the stored value minus one, in fp32;
- Gemma's embedding scale sqrt(hidden): transformers' scaled embedding, which multiplies by it cast to the compute
  dtype.

Linear weights stay as their GGUF blocks (`GGUFLinear`, or the `load_quantized` layer a caller passes), the embedding
as blocks whose looked-up rows alone are dequantized (`GGUFEmbedding`); norms are dequantized at load into the
compute dtype. Only what the features need is read: Lumina-T2I takes LLaMA's `last_hidden_state` (every layer and
the final norm); Lumina-Next and Lumina-Image-2.0 take `hidden_states[-2]`, the output of the second-to-last layer,
so the last layer and the final norm are not read: the model is built one layer shorter, its final norm an identity,
and marked `penultimate_only` (its last hidden state is then the features). `output.weight`, the LM head, is never
read.

The tokenizer comes from the tokenizer files beside the .gguf (those of the Hugging Face folder). A lone LLaMA
file's SentencePiece tokenizer is rebuilt from its metadata (`gguf_tokenizer`); a lone Gemma or Gemma-2 file is
refused with the folder to put the tokenizer files in (their tokenizers are not rebuilt from metadata: transformers
gets that wrong for Gemma, SPEC.md §10, and no rebuild here has been checked against the released files).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..weights.dit_files import gguf_compute_dtype
from ..weights.fp8 import swap_linear_layers
from ..weights.gguf_dit import describe
from ..weights.gguf_file import GGUFFile
from ..weights.gguf_quants import FLOAT_QTYPES, is_quantized
from ..weights.quantized import GGUFEmbedding, GGUFLinear, share_workspace
from .hf_folder import check_loaded, rebuild_rotary_buffers
from .hf_weights import TextEncoderError
from .single_file import has_tokenizer_files

logger = logging.getLogger(__name__)


# Module names of a decoder layer, by llama.cpp's name of the tensor in block N (`blk.N.<name>.weight`).
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class TextArchitecture:
    name: str  # general.architecture
    title: str  # for the messages
    holds: str  # what such a file is, for the message of a loader expecting another
    layer_names: dict  # llama.cpp name in a block -> module name in a transformers decoder layer
    permuted_qk: bool  # the converter permuted the query and key rows (LLaMA)
    norm_offset: float  # what the converter added to every norm weight (Gemma: 1)
    penultimate: bool  # the features are hidden_states[-2]: the last layer and the final norm are not needed
    embed_scale: bool  # the embedding is scaled by sqrt(hidden_size)
    rebuilds_tokenizer: bool  # a lone file's tokenizer is rebuilt from its metadata


ARCHITECTURES = {
    "llama": TextArchitecture(
        "llama", "LLaMA", "LLaMA, the text encoder of Lumina-T2I (LlamaTextEncoder)",
        {**_LAYER, "ffn_norm": "post_attention_layernorm"},
        permuted_qk=True, norm_offset=0.0, penultimate=False, embed_scale=False, rebuilds_tokenizer=True,
    ),
    "gemma": TextArchitecture(
        "gemma", "Gemma", "Gemma, the text encoder of Lumina-Next (GemmaTextEncoder)",
        {**_LAYER, "ffn_norm": "post_attention_layernorm"},
        permuted_qk=False, norm_offset=1.0, penultimate=True, embed_scale=True, rebuilds_tokenizer=False,
    ),
    "gemma2": TextArchitecture(
        "gemma2", "Gemma-2", "Gemma-2, the text encoder of Lumina-Image-2.0 (Gemma2TextEncoder)",
        {**_LAYER, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
         "post_ffw_norm": "post_feedforward_layernorm"},
        permuted_qk=False, norm_offset=1.0, penultimate=True, embed_scale=True, rebuilds_tokenizer=False,
    ),
}
_TOP = {"token_embd": "embed_tokens", "output_norm": "norm"}
_NEVER_READ = ("output.weight", "rope_freqs.weight")  # the LM head; precomputed rotary factors (recomputed)


def unpermute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's permutation of query/key rows (`LlamaModel.permute`), on [rows, anything] (raw bytes too):
    within each head, the converter interleaved the two rotary halves; this puts them back."""
    n, width = rows.shape
    if n % (2 * heads):
        raise ValueError(f"{n} rows are not {heads} heads of an even size")
    return rows.reshape(heads, n // heads // 2, 2, width).swapaxes(1, 2).reshape(n, width).contiguous()


def _metadata(src: GGUFFile, arch: str, key: str, default=None, required: bool = True):
    value = src.value(f"{arch}.{key}", default)
    if value is None and required:
        raise TextEncoderError(f"{src.path} lacks the metadata {arch}.{key}, which every llama.cpp {arch} file "
                               f"carries: the file is incomplete or damaged; download it again")
    if isinstance(value, list):  # a per-layer array (llama.cpp writes one for some models): one value for all
        if len(set(value)) != 1:
            raise TextEncoderError(f"{src.path}: {arch}.{key} differs between layers ({value[:4]}...), which no "
                                   f"{arch} model this pack loads has")
        value = value[0]
    return value


def config_dict(src: GGUFFile, spec: TextArchitecture) -> dict:
    """The transformers configuration (as config.json keys) of the model in a GGUF, read from its metadata."""
    arch = spec.name
    hidden = int(_metadata(src, arch, "embedding_length"))
    heads = int(_metadata(src, arch, "attention.head_count"))
    head_dim = int(_metadata(src, arch, "attention.key_length", hidden // heads, required=False))
    layers = int(_metadata(src, arch, "block_count"))
    if "token_embd.weight" not in src.keys:
        raise TextEncoderError(f"{src.path} has no token_embd.weight: it is not a complete llama.cpp {arch} file")
    config = {
        "vocab_size": src.shape("token_embd.weight")[0],
        "hidden_size": hidden,
        "intermediate_size": int(_metadata(src, arch, "feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_metadata(src, arch, "attention.head_count_kv", heads, required=False)),
        "head_dim": head_dim,
        "rms_norm_eps": float(_metadata(src, arch, "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_metadata(src, arch, "rope.freq_base", 10000.0, required=False)),
        "max_position_embeddings": int(_metadata(src, arch, "context_length", 8192, required=False)),
        "attention_bias": "blk.0.attn_q.bias" in src.keys,
    }
    for name in ("bos", "eos"):
        token_id = src.value(f"tokenizer.ggml.{name}_token_id")
        if token_id is not None:
            config[f"{name}_token_id"] = int(token_id)
    if spec.name == "llama":
        config.update(hidden_act="silu", tie_word_embeddings=False, pad_token_id=None)
    else:  # Gemma's GELU is the tanh approximation (config.json's legacy "gelu" means it too)
        config.update(hidden_act="gelu_pytorch_tanh", pad_token_id=0)
    if spec.name == "gemma2":
        config.update(
            attn_logit_softcapping=_metadata(src, arch, "attn_logit_softcapping", None, required=False),
            final_logit_softcapping=_metadata(src, arch, "final_logit_softcapping", None, required=False),
            sliding_window=int(_metadata(src, arch, "attention.sliding_window", 4096, required=False)),
            # Not in the metadata; llama.cpp scales the scores by key_length^-0.5, except for the 27B model (46
            # layers), whose scalar is hidden / heads: the released configs say the same.
            query_pre_attn_scalar=hidden // heads if layers == 46 else head_dim,
        )
    return config


def _file_names(src: GGUFFile, spec: TextArchitecture, layers: int) -> dict:
    """{state-dict key of the (possibly shortened) model: tensor name in the file}; tensors the features do not need
    left out; a TextEncoderError naming any tensor this architecture does not have."""
    names, unknown = {}, []
    for key in src.keys:
        parts = key.split(".")
        if key in _NEVER_READ:
            continue
        if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() and parts[2] in spec.layer_names:
            if int(parts[1]) < layers:
                names[f"layers.{parts[1]}.{spec.layer_names[parts[2]]}.{parts[3]}"] = key
        elif len(parts) == 2 and parts[0] in _TOP:
            if not (spec.penultimate and parts[0] == "output_norm"):
                names[f"{_TOP[parts[0]]}.{parts[1]}"] = key
        else:
            unknown.append(key)
    if unknown:
        raise TextEncoderError(f"{src.path} holds tensors a {spec.title} model has not ({', '.join(unknown[:4])}): it "
                               f"is another model of architecture {spec.name!r}, or damaged")
    return names


def load_gguf_text_encoder(
    encoder_class,
    path,
    *,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    device="cpu",
    compute_dtype: Optional[torch.dtype] = None,
    linear_cls=None,
):
    """`encoder_class` (LlamaTextEncoder, GemmaTextEncoder or Gemma2TextEncoder) over the llama.cpp GGUF at `path`.

    dtype: the compute dtype (a GGUF keeps its own types; None: fp32, the dequantized values exactly; an fp8 choice
    computes in what fp8 storage would), unless compute_dtype is given. linear_cls: the linear layer that holds the
    blocks (it must have `load_quantized`, as ComfyUI's GGUF layer does); default GGUFLinear.
    """
    start = time.perf_counter()
    path = Path(path)
    device = torch.device(device)
    compute = compute_dtype or gguf_compute_dtype(dtype, device)
    src = GGUFFile(path, error=TextEncoderError)
    wanted = encoder_class.gguf_architecture
    if src.architecture != wanted:
        other = ARCHITECTURES.get(src.architecture)
        what = other.holds if other else f"a model of GGUF architecture {src.architecture!r}"
        raise TextEncoderError(f"{path} holds {what}, not {encoder_class.title} (GGUF architecture {wanted!r}). "
                               f"{encoder_class.get_hint}")
    spec = ARCHITECTURES[wanted]
    src.check_supported()
    tokenizer = _tokenizer(encoder_class, src, spec)
    full = config_dict(src, spec)
    own_decoder = getattr(encoder_class, "gguf_decoder", None)  # a model of the pack's own (LLaMA), else transformers'
    if own_decoder is not None:
        model_class = own_decoder()
        config = decoder_config(model_class, full, path)
    else:
        config_class, model_class = encoder_class.config_class(), encoder_class.model_class()
        config = config_class.from_dict(full, attn_implementation="sdpa")
    encoder_class.check_model_config(config, str(path))  # Gemma-2 switches to eager attention here
    if config.vocab_size < len(tokenizer):
        raise TextEncoderError(f"The tokenizer of {path} has {len(tokenizer)} tokens but its embedding only "
                               f"{config.vocab_size} rows: the tokenizer files beside it belong to another model")
    layers = config.num_hidden_layers - 1 if spec.penultimate else config.num_hidden_layers
    if layers != config.num_hidden_layers:  # Gemma and Gemma-2, which run in transformers' models
        implementation = config._attn_implementation
        config = config_class.from_dict({**full, "num_hidden_layers": layers}, attn_implementation=implementation)

    with torch.device("meta"):
        model = model_class(config)
    swap_linear_layers(model, linear_cls or GGUFLinear)
    if spec.penultimate:
        model.norm = nn.Identity()
    quantized = _load_weights(model, src, spec, layers, full, compute, device)
    share_workspace(model)
    if own_decoder is None:
        rebuild_rotary_buffers(model, device)  # also checks that nothing is left on the meta device
    else:
        check_loaded(model)
    model.eval().requires_grad_(False)
    model.penultimate_only = spec.penultimate

    encoder = encoder_class(model, tokenizer, str(path))
    encoder.storage_dtype = compute
    encoder.gguf_types = src.qtype_counts()
    logger.info(
        "Loaded %s text encoder from %s (%s; %d of %d layers read, %d matrices kept quantized, %.2f GB): computed "
        "in %s on %s in %.1f s",
        encoder_class.title, path, describe(src), layers, full["num_hidden_layers"], quantized,
        sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, str(compute).removeprefix("torch."),
        device, time.perf_counter() - start,
    )
    return encoder


def decoder_config(decoder, full: dict, path):
    """The configuration of the pack's own decoder class from a GGUF's metadata (`config_dict`)."""
    try:
        return decoder.config_class.from_dict(full)
    except ValueError as err:
        raise TextEncoderError(f"{path}: its metadata describes no model this loader builds: {err}") from err


def _load_weights(model: nn.Module, src: GGUFFile, spec: TextArchitecture, layers: int, full: dict, compute,
                  device) -> int:
    """Fill `model` (on the meta device) from `src`; returns the number of matrices kept quantized."""
    names = _file_names(src, spec, layers)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in names]
    if missing:
        raise TextEncoderError(f"{src.path} lacks tensors of the {spec.title} model its metadata describes "
                               f"({len(missing)}, e.g. {missing[:3]}): the file is incomplete; download it again")
    for key, file_key in names.items():
        if src.shape(file_key) != expected[key]:
            raise TextEncoderError(f"{src.path}: {file_key} has shape {src.shape(file_key)}, but its metadata makes "
                                   f"{key} {expected[key]}: the file is damaged or not a llama.cpp {spec.name} file")
    heads = {"q_proj": full["num_attention_heads"], "k_proj": full["num_key_value_heads"]}
    modules = dict(model.named_modules())

    def blocks_kept(key: str) -> bool:  # a quantized matrix kept as its blocks
        owner, _, name = key.rpartition(".")
        return (name == "weight" and is_quantized(src.qtype(names[key]))
                and (owner == "embed_tokens" or hasattr(modules[owner], "load_quantized")))

    # On the CPU the blocks kept are read into one buffer (GGUFFile.raw_together).
    blocks = src.raw_together([names[k] for k in names if blocks_kept(k)]) if device.type == "cpu" else {}
    state, kept = {}, []
    for key, file_key in sorted(names.items(), key=lambda item: src.offset(item[1])):
        owner, _, name = key.rpartition(".")
        layer, qtype, shape = modules[owner], src.qtype(file_key), expected[key]
        raw = blocks[file_key] if file_key in blocks else None
        if owner == "embed_tokens" and is_quantized(qtype):
            raw = src.raw(file_key).to(device) if raw is None else raw
            scale = math.sqrt(full["hidden_size"]) if spec.embed_scale else None
            model.embed_tokens = GGUFEmbedding(raw, qtype, shape, compute, scale)
            kept.append(key)
            continue
        if name == "weight" and hasattr(layer, "load_quantized"):
            raw = src.raw(file_key) if raw is None else raw
            projection = owner.rpartition(".")[2]
            if spec.permuted_qk and projection in heads:
                raw.copy_(unpermute_rows(raw, heads[projection]))  # in place: it may be a view of the buffer
            if is_quantized(qtype):
                layer.load_quantized(raw.to(device), qtype, shape)
                kept.append(key)
            elif qtype in FLOAT_QTYPES and qtype.name != "F32":  # F16/BF16 kept as stored, cast per forward
                state[key] = raw.view(src.dtype(file_key)).reshape(shape).to(device)
            else:
                state[key] = raw.view(torch.float32).reshape(shape).to(device=device, dtype=compute)
            continue
        value = src.get(file_key).float()
        if name == "weight" and "norm" in owner.rpartition(".")[2]:
            value = value - spec.norm_offset  # in fp32, exactly: the converter added it in fp32
        state[key] = value.to(device=device, dtype=compute)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if set(missing) != set(kept) or unexpected:
        raise TextEncoderError(f"{src.path}: the model did not take the tensors read (missing "
                               f"{sorted(set(missing) - set(kept))[:4]}, unexpected {unexpected[:4]})")
    if spec.embed_scale and not isinstance(model.embed_tokens, GGUFEmbedding):
        from .gemma import rebuild_embed_scale

        rebuild_embed_scale(model, device)
    return len(kept) - (1 if isinstance(model.embed_tokens, GGUFEmbedding) else 0)


def _tokenizer(encoder_class, src: GGUFFile, spec: TextArchitecture):
    folder = src.path.parent
    if has_tokenizer_files(folder):
        return encoder_class.load_tokenizer(str(folder))
    if spec.rebuilds_tokenizer:
        from .gguf_tokenizer import llama_tokenizer_from_gguf

        return llama_tokenizer_from_gguf(src, encoder_class.get_hint)
    own = folder / src.path.stem
    raise TextEncoderError(
        f"{src.path} has no tokenizer files beside it. A {spec.title} GGUF needs the tokenizer files of "
        f"{encoder_class.source} (tokenizer.json, tokenizer_config.json, special_tokens_map.json, tokenizer.model): "
        f"its metadata does not give the original tokenizer back. Put them in {folder}, next to the .gguf, or, "
        f"better, give the model a folder of its own ({own}/: the .gguf and those files together)."
    )
