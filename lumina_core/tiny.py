"""Tiny Lumina models with random weights, written in the released file layouts.

Used by the smoke-test demo and the tests: the three families' DiT checkpoints in the released key layouts, Hugging
Face folders of their text encoders (LLaMA, Gemma, Gemma-2: config, tokenizer, weights) and their VAEs (the SDXL
VAE, the FLUX AE; in `tiny_vae`, re-exported here) in the published key layout, small enough to build, save and
load in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, LlamaTokenizerFast

from .models.blocks import init_random_weights
from .models.config import FlagDiTConfig, NextDiTConfig, UnifiedNextDiTConfig
from .models.flag_dit import FlagDiT
from .models.next_dit import NextDiT
from .models.unified_next_dit import UnifiedNextDiT
from .tiny_vae import TINY_VAE_WIDTHS, make_tiny_sdxl_vae, write_tiny_flux_ae, write_tiny_sdxl_vae  # noqa: F401
from .weights.dit_files import save_dit, save_flag_dit, save_next_dit


def make_tiny_flag_dit(seed: int = 0, **overrides) -> FlagDiT:
    """A FlagDiTConfig.tiny() model (cap_feat_dim 32, matching the tiny LLaMA) with every parameter random."""
    model = FlagDiT(FlagDiTConfig.tiny(**overrides))
    return init_random_weights(model, seed).eval().requires_grad_(False)


def write_tiny_flag_dit(path, seed: int = 0, **overrides) -> Path:
    path = Path(path)
    save_flag_dit(make_tiny_flag_dit(seed, **overrides), path)
    return path


def make_tiny_next_dit(seed: int = 0, **overrides):
    """A NextDiTConfig.tiny() model (grouped-query, cap_feat_dim 32) with every parameter random, norms near 1."""

    model = init_random_weights(NextDiT(NextDiTConfig.tiny(**overrides)), seed)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "y_norm.weight")):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    return model.eval().requires_grad_(False)


def write_tiny_next_dit(path, seed: int = 0, layout: str = "original", **overrides) -> Path:
    """A tiny Next-DiT checkpoint in the original or the diffusers key layout."""

    path = Path(path)
    save_next_dit(make_tiny_next_dit(seed, **overrides), path, layout=layout)
    return path


def make_tiny_unified_next_dit(seed: int = 0, **overrides) -> UnifiedNextDiT:
    """A UnifiedNextDiTConfig.tiny() model (Lumina-Image-2.0's architecture, cap_feat_dim 32) with every parameter
    random, norms near 1."""
    model = init_random_weights(UnifiedNextDiT(UnifiedNextDiTConfig.tiny(**overrides)), seed)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
    return model.eval().requires_grad_(False)


def write_tiny_unified_next_dit(path, seed: int = 0, **overrides) -> Path:
    """A tiny Unified Next-DiT checkpoint in the original key layout (ComfyUI's lumina_2_model_bf16's names)."""
    path = Path(path)
    save_dit(make_tiny_unified_next_dit(seed, **overrides), path)
    return path


# --------------------------------------------------------------------------------------------------------------
# LLaMA

# A few captions to train the tiny BPE on, so that ordinary prompt words split into several real sub-word pieces.
_CORPUS = [
    "a red cat sat on the mat",
    "the blue dog ran in the park",
    "a photo of an astronaut riding a horse on the moon",
    "an old man portrayed as a retro superhero stands in the streets of new york city at night",
    "a fluffy mouse holding a watermelon in a magical and colorful setting",
    "a cute christmas mockup on an old wooden industrial desk table with bokeh lights",
]
TINY_VOCAB_SIZE = 160


def make_tiny_tokenizer() -> LlamaTokenizerFast:
    """A LLaMA-like tokenizer: BPE over "▁"-prefixed words (Metaspace), with <unk>=0, <s>=1, </s>=2."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama_config(hidden_size: int = 32, n_layers: int = 2) -> LlamaConfig:
    """LLaMA-2's architecture (no GQA, SwiGLU, RMSNorm eps 1e-5, theta 10000), shrunk."""
    n_heads = 4 if hidden_size % 4 == 0 else 2
    return LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


def make_tiny_llama_folder(
    path,
    *,
    hidden_size: int = 32,
    n_layers: int = 2,
    causal_lm: bool = False,
    seed: int = 0,
    safetensors: bool = True,
    max_shard_size: str | None = None,
):
    """Write a tiny LLaMA folder at `path` (created if needed) and return `path`.

    causal_lm: save `LlamaForCausalLM` weights (keys `model.*` plus `lm_head.weight`, as meta-llama/Llama-2-7b-hf)
        instead of a bare `LlamaModel`.
    safetensors: `*.safetensors` through save_pretrained; otherwise one `pytorch_model.bin` written by torch.save,
        the format older checkpoints were published in.
    max_shard_size: passed to save_pretrained (e.g. "20KB") to get several shards plus an index json.
    """
    os.makedirs(path, exist_ok=True)
    config = tiny_llama_config(hidden_size, n_layers)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if causal_lm else LlamaModel)(config).eval()
    if safetensors:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kwargs)
    else:
        config.save_pretrained(path)
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    make_tiny_tokenizer().save_pretrained(path)
    return path


def write_tiny_llama_folder(path, **kwargs) -> Path:
    """A tiny LLaMA-2-shaped Hugging Face folder whose hidden size (32) matches the tiny Flag-DiT's cap_feat_dim."""
    return Path(make_tiny_llama_folder(path, **kwargs))


# --------------------------------------------------------------------------------------------------------------
# Gemma: a tiny google/gemma-2b-shaped folder for Lumina-Next's text encoder. (Its imports are local so that this
# section stays an appendix to the module.)

GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]  # ids 0-4, as in google/gemma-2b


def make_tiny_gemma_tokenizer():
    """A Gemma-like tokenizer: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4, then a BPE over "▁"-joined words.

    The BPE is trained here on a few captions; transformers' GemmaTokenizer then wraps its vocabulary and merges
    with Gemma's own pipeline (spaces replaced by "▁", no prefix space, byte fallback), as it does when loading
    google/gemma-2b's tokenizer.json.
    """
    import json

    from tokenizers import normalizers
    from transformers import GemmaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE, special_tokens=GEMMA_SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(_CORPUS, trainer)
    trained = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return GemmaTokenizer(vocab=trained["vocab"], merges=merges, add_bos_token=True, add_eos_token=False)


def tiny_gemma_config_json(*, hidden_size: int = 32, n_layers: int = 3, vocab_size: int = TINY_VOCAB_SIZE) -> dict:
    """config.json with the keys google/gemma-2b publishes (transformers 4.38), shrunk.

    Gemma-2B's shape otherwise: multi-query attention (one key/value head), head_dim = hidden / heads, an MLP
    8 x wider than the hidden size, RMSNorm eps 1e-6, tied embeddings, and the legacy "hidden_act": "gelu" that
    transformers reads as the tanh approximation.
    """
    n_heads = 4 if hidden_size % 4 == 0 else 2
    return {
        "architectures": ["GemmaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "head_dim": hidden_size // n_heads,
        "hidden_act": "gelu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 8 * hidden_size,
        "max_position_embeddings": 8192,
        "model_type": "gemma",
        "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": 1,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.0.dev0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def make_tiny_gemma_folder(
    path,
    hidden_size: int = 32,
    seed: int = 0,
    *,
    n_layers: int = 3,
    safetensors: bool = True,
    max_shard_size: str | None = None,
) -> Path:
    """Write a tiny Gemma folder at `path` (created if needed) in google/gemma-2b's layout and return it as a Path.

    Weights: `GemmaForCausalLM` keys (`model.*`; no lm_head, which is tied to the embedding), every parameter drawn
    from a generator seeded with `seed` (the norm weights too, which transformers initialises to zero).
    safetensors: `*.safetensors` through save_pretrained; otherwise one `pytorch_model.bin` written by torch.save.
    max_shard_size: passed to save_pretrained (e.g. "20KB") to get several shards plus an index json.
    Tokenizer: make_tiny_gemma_tokenizer(), with tokenizer_config.json saying add_bos_token true and add_eos_token
    false, as google/gemma-2b's does.
    """
    import json

    from transformers import GemmaConfig, GemmaForCausalLM

    os.makedirs(path, exist_ok=True)
    tokenizer = make_tiny_gemma_tokenizer()
    config_json = tiny_gemma_config_json(hidden_size=hidden_size, n_layers=n_layers, vocab_size=TINY_VOCAB_SIZE)
    config = GemmaConfig(**{k: v for k, v in config_json.items() if k != "architectures"})
    model = GemmaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # lm_head is tied to the embedding: not listed separately
            if param.ndim == 1:  # RMSNorm weights, applied as (1 + w)
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    if safetensors:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(path, **kwargs)
    else:
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:  # the released keys, not 5.x's
        json.dump(config_json, f, indent=2)
    tokenizer.save_pretrained(path)
    tokenizer_config_path = os.path.join(path, "tokenizer_config.json")
    with open(tokenizer_config_path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config.update(add_bos_token=True, add_eos_token=False)
    with open(tokenizer_config_path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    return Path(path)


# --------------------------------------------------------------------------------------------------------------
# Gemma-2: a tiny google/gemma-2-2b-shaped folder for Lumina-Image-2.0's text encoder, with the tiny Gemma tokenizer
# (the same special tokens and ids).


def tiny_gemma2_config_json(*, hidden_size: int = 32, n_layers: int = 3, vocab_size: int = TINY_VOCAB_SIZE) -> dict:
    """config.json with the keys google/gemma-2-2b publishes, shrunk: grouped-query attention with a head_dim that
    is not hidden / heads, attention-logit soft-capping 50, sliding window on every other layer, gelu_pytorch_tanh,
    RMSNorm eps 1e-6 applied as (1 + w), tied embeddings."""
    return {
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": 16,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 4 * hidden_size,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": 4,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "torch_dtype": "float32",
        "transformers_version": "4.42.4",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def make_tiny_gemma2_folder(path, hidden_size: int = 32, seed: int = 0, *, n_layers: int = 3) -> Path:
    """Write a tiny Gemma-2 folder at `path` (created if needed) in google/gemma-2-2b's layout (`model.*` weights of
    Gemma2ForCausalLM, no lm_head: it is tied) with make_tiny_gemma_tokenizer(); returns it as a Path."""
    import json

    from safetensors.torch import save_file
    from transformers import Gemma2Config, Gemma2Model

    os.makedirs(path, exist_ok=True)
    config_json = tiny_gemma2_config_json(hidden_size=hidden_size, n_layers=n_layers)
    model = Gemma2Model(Gemma2Config(**{k: v for k, v in config_json.items() if k != "architectures"}))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.state_dict().items():
        if param.ndim == 1:  # RMSNorm weights, applied as (1 + w)
            value = 0.1 * torch.randn(param.shape, generator=generator)
        else:
            value = torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5
        state["model." + name] = value.contiguous()
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_json, f, indent=2)
    tokenizer = make_tiny_gemma_tokenizer()
    tokenizer.save_pretrained(path)
    tokenizer_config_path = os.path.join(path, "tokenizer_config.json")
    with open(tokenizer_config_path, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    tokenizer_config.update(add_bos_token=True, add_eos_token=False)
    with open(tokenizer_config_path, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)
    return Path(path)
