"""Tiny Gemma-2-2B text encoders (Lumina-Image-2.0's) for tests, in the four layouts a user may pick, plus the
original text procedure as a reference.

Layouts written here:
  (a) a Hugging Face folder as google/gemma-2-2b has it: config.json, model.safetensors with `Gemma2ForCausalLM` keys
      (`model.embed_tokens.weight`, `model.layers.N.*`, `model.norm.weight`; no `lm_head`, it is tied), tokenizer.model
      + tokenizer.json + tokenizer_config.json + special_tokens_map.json;
  (b) a diffusers pipeline folder: `text_encoder/` (config.json, model.safetensors with `Gemma2Model` keys, no `model.`
      prefix) beside `tokenizer/` (from memory of Alpha-VLLM/Lumina-Image-2.0's diffusers repo; not checked against
      that repo here: a loader should accept both prefixes);
  (c) ComfyUI's single file `gemma_2_2b_fp16.safetensors`: `model.*` keys exactly as in (a), plus `spiece_model`, the
      SentencePiece ModelProto bytes as a 1-D uint8 tensor;
  (d) ComfyUI's all-in-one `lumina_2.safetensors`: `text_encoders.gemma2_2b.transformer.model.*`,
      `text_encoders.spiece_model`, the DiT under `model.diffusion_model.` and the VAE under `vae.`.

Facts checked in ComfyUI's source (github yzkee/ComfyUI HEAD 783545f6; the 0.33.0 snapshot in shared/comfyui has the
same files at the same lines):
  - comfy/sd.py:1634 + :1651 `detect_te_model`: a file with `model.layers.0.post_feedforward_layernorm.weight` and no
    q_norm is GEMMA_2_2B; :1710-1716 `llama_detect` reads `model.layers.0.self_attn.k_proj.weight`; :1824-1831 it then
    uses `comfy.text_encoders.lumina2.te` / `LuminaTokenizer` and `tokenizer_data["spiece_model"] =
    clip_data[0].get("spiece_model")`. So the single file's keys are `model.*` plus `spiece_model`.
  - comfy/text_encoders/llama.py:1303-1309 `Gemma2_2B.model = Llama2_(...)`, module names as transformers'
    (q_proj/k_proj/v_proj/o_proj :527-530, gate/up/down_proj :634-636, input/post_attention/pre_feedforward/
    post_feedforward_layernorm :695-698, RMSNorm applied as (1 + w) :436-441, embedding times sqrt(hidden) :773-775).
    Gemma2_2B_Config (:346-368) has no attention soft-capping and no sliding window (`sliding_attention = None`):
    ComfyUI's Gemma-2 skips both, transformers (eager) applies both.
  - comfy/text_encoders/lumina2.py:30-32 `Gemma2_2BModel(layer="hidden", layer_idx=-2, special_tokens={"start": 2,
    "pad": 0})` (the penultimate layer's output) and :52-54 `LuminaModel(name="gemma2_2b")`; comfy/sd1_clip.py:717-729
    keeps the model as attribute `gemma2_2b` and SDClipModel as `.transformer` (:120), hence
    `gemma2_2b.transformer.model.*`; comfy/supported_models.py:1173-1200 `Lumina2`: `text_encoder_key_prefix =
    ["text_encoders."]`, `vae_key_prefix = ["vae."]`, clip_target probes `text_encoders.gemma2_2b.transformer.`;
    comfy/supported_models_base.py:90-92 strips `text_encoders.`, :110-116 saves the DiT as `model.diffusion_model.`
    and the VAE as `vae.`; comfy/sd.py:2237-2242 passes the stripped dict as `tokenizer_data`, so the tokenizer is
    `text_encoders.spiece_model` in the file.
  - Reading `spiece_model`: comfy/text_encoders/lumina2.py:9-11 `Gemma2BTokenizer` gives
    `tokenizer_data.get("spiece_model")` to comfy/text_encoders/spiece_tokenizer.py `SPieceTokenizer` with
    add_bos=True, add_eos=False, which does (:14-18) `bytes = tensor.numpy().tobytes()` then
    `sentencepiece.SentencePieceProcessor(model_proto=bytes, add_bos=True, add_eos=False)`, and `encode(text)` (:47).
    Writing: lumina2.py:13-14 -> spiece_tokenizer.py:58-59 `torch.ByteTensor(list(sp.serialized_model_proto()))`.
    (It also maps the literal text "<end_of_turn>" to id 107 itself, lumina2.py:10 + spiece_tokenizer.py:30-45.)
    No padding on ComfyUI's side (lumina2.py:11: pad_to_max_length=False, min_length=1).

Facts checked in the original (github Alpha-VLLM/Lumina-Image-2.0 HEAD 4a4d6f85):
  - System prompt presets, sample.py:246-259, `--system_type` default "real" (sample.py:399-404, scripts/sample.sh:8);
    each string there ends in " <Prompt Start> " and the caption follows directly (sample.py:261
    `cap = system_prompt + cap`); "empty" gives "" (no tag at all). SYSTEM_PROMPTS below holds them without the tag.
    Training used "align" for `super_high_quality_caption` items and "base" for the others (finetune.py:77, :82, :102).
    demo.py's dropdown (:398-406) defaults to the "real" text but concatenates it without " <Prompt Start> "
    (demo.py:150-151): a quirk of the demo, not of the model.
  - Negative prompt: sample.py:222 `neg_cap = ""` and :262-263 adds the system prompt only when neg_cap != "", so the
    negative is always "" (just <bos>); demo.py:152-153 prepends the system prompt to a non-empty negative only, and
    encodes "" otherwise (:214-217). Training's caption dropout also gives "" without system prompt
    (finetune.py:259-260). diffusers' Lumina2 pipeline (commit 03ce6744) also encodes the negative without it.
  - encode_prompt: see reference_gemma2_features.

Packages: building the tokenizer takes `sentencepiece` (training, tiny_gemma2_spiece_model) and `protobuf`
(transformers' conversion of tokenizer.model to tokenizer.json); neither is in the test extra yet, so a test module
using this file should start with pytest.importorskip("sentencepiece") and ("google.protobuf"). Reading the files
back needs neither: the folders carry tokenizer.json, and tokenizer_from_spiece_bytes rebuilds the tokenizer from
`spiece_model` with `tokenizers` alone (spiece_encode is ComfyUI's own way, through sentencepiece).
"""

from __future__ import annotations

import functools
import io
import json
import struct
from pathlib import Path

import torch

# Without the " <Prompt Start> " that sample.py's strings end in (sample.py:246-257).
SYSTEM_PROMPTS = {
    "align": "You are an assistant designed to generate high-quality images with the highest degree of image-text "
    "alignment based on textual prompts.",
    "base": "You are an assistant designed to generate high-quality images based on user prompts.",
    "aesthetics": "You are an assistant designed to generate high-quality images with highest degree of aesthetics "
    "based on user prompts.",
    "real": "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts.",
    "4grid": "You are an assistant designed to generate four high-quality images with highest degree of aesthetics "
    "arranged in 2x2 grids based on user prompts.",
}
DEFAULT_SYSTEM_PROMPT = SYSTEM_PROMPTS["real"]  # sample.py:399-404, scripts/sample.sh:8, demo.py:398
PROMPT_START = " <Prompt Start> "  # system prompt + PROMPT_START + caption == sample.py:247-261
MAX_LENGTH = 256  # sample.py:36

GEMMA_SPECIAL_PIECES = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0-3, as in google/gemma-2-2b
GEMMA_USER_PIECES = ["<mask>", "<start_of_turn>", "<end_of_turn>"]  # ids 4-6 here (4, 106, 107 in the real one)
TINY_GEMMA2_VOCAB_SIZE = 384

COMFY_SINGLE_PREFIX = "model."  # gemma_2_2b_fp16.safetensors
COMFY_SINGLE_SPIECE_KEY = "spiece_model"
COMFY_AIO_TE_PREFIX = "text_encoders.gemma2_2b.transformer.model."  # lumina_2.safetensors
COMFY_AIO_SPIECE_KEY = "text_encoders.spiece_model"
COMFY_AIO_DIT_PREFIX = "model.diffusion_model."
COMFY_AIO_VAE_PREFIX = "vae."

_CORPUS = [
    "a photo of a cat sitting on a red chair next to the window",
    "A charcoal sketch of Istanbul with the iconic Hagia Sophia Mosque, bright houses, trees and flowers.",
    "the quick brown fox jumps over the lazy dog; 1024x1024, 2x2 grids!",
    "Upper body of a young woman in a Victorian-era outfit with brass goggles and leather straps.",
    "There are puddles with raindrops and reflections of light and shadow. The background contains mountains.",
    "an oil painting of a lighthouse at night, stars in the sky, waves crashing on the rocks",
] + [text + PROMPT_START for text in SYSTEM_PROMPTS.values()]


@functools.lru_cache(maxsize=None)
def tiny_gemma2_spiece_model(vocab_size: int = TINY_GEMMA2_VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece ModelProto of a tiny Gemma-like tokenizer, trained here offline (needs `sentencepiece`).

    Gemma's settings: BPE with byte fallback (ids 7-262 are <0x00>..<0xFF>), <pad>=0, <eos>=1, <bos>=2, <unk>=3, then
    the user-defined <mask>, <start_of_turn>, <end_of_turn>; identity normalization, no dummy prefix, spaces kept as
    they are ("▁"), digits split, whitespace-only pieces allowed. One thread, so the bytes are the same on every run.
    """
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=GEMMA_USER_PIECES,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def spiece_encode(spiece_bytes: bytes, texts) -> list[list[int]]:
    """Token ids the way ComfyUI gets them from `spiece_model` (spiece_tokenizer.py:18, :47): <bos> added, no <eos>."""
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=bytes(spiece_bytes), add_bos=True, add_eos=False)
    return [processor.encode(text) for text in texts]


def spiece_tensor(spiece_bytes: bytes) -> torch.Tensor:
    """The bytes as ComfyUI stores them: a 1-D torch.uint8 tensor (spiece_tokenizer.py:59)."""
    return torch.frombuffer(bytearray(spiece_bytes), dtype=torch.uint8).clone()


def _proto_fields(buf):
    """(field number, value) of one protobuf message: ints for varints, memoryviews for the rest."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire} in a SentencePiece model")
        yield key >> 3, value


def _varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def spiece_pieces(spiece_bytes: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) for each id, read from the ModelProto without sentencepiece or protobuf.

    sentencepiece_model.proto: ModelProto field 1 = repeated SentencePiece {1: piece, 2: score (float32),
    3: type (1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE)}.
    """
    pieces = []
    for field, value in _proto_fields(memoryview(bytes(spiece_bytes))):
        if field == 1:
            piece, score, kind = "", 0.0, 1
            for f, v in _proto_fields(value):
                if f == 1:
                    piece = bytes(v).decode("utf-8")
                elif f == 2:
                    score = struct.unpack("<f", bytes(v))[0]
                elif f == 3:
                    kind = v
            pieces.append((piece, score, kind))
    return pieces


def tokenizer_from_spiece_bytes(spiece_bytes: bytes):
    """A `tokenizers.Tokenizer` equal to transformers' GemmaTokenizer for these bytes, built with `tokenizers` only.

    What transformers' GemmaConverter does (convert_slow_tokenizer.py): the pieces as a BPE vocabulary with byte
    fallback, merges = every split of a NORMAL piece into two pieces, ordered by the piece's id; spaces -> "▁", no
    prefix space; the <0x09> byte piece renamed "\t" when there is no "\t" piece; CONTROL/UNKNOWN pieces special,
    USER_DEFINED pieces matched as added tokens; <bos> prepended. Same ids as sentencepiece on ordinary text; on the
    literal text "<bos>"/"<eos>"/"<pad>"/"<unk>" transformers (hence the original) gives the special id, sentencepiece
    (hence ComfyUI) spells it out.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    pieces = spiece_pieces(spiece_bytes)
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    if "\t" not in vocab and "<0x09>" in vocab:
        vocab["\t"] = vocab.pop("<0x09>")
    merges = []
    for piece, piece_id in sorted(vocab.items(), key=lambda item: item[1]):
        if pieces[piece_id][2] == 1:
            splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
            merges += sorted(splits, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    unk = next(piece for piece, _, kind in pieces if kind == 2)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_tokens([AddedToken(piece, normalized=False) for piece, _, kind in pieces if kind == 4])
    tokenizer.add_special_tokens(
        [AddedToken(piece, normalized=False, special=True) for piece, _, kind in pieces if kind in (2, 3)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return tokenizer


def tiny_gemma2_config_json(
    hidden_size: int = 32,
    n_layers: int = 3,
    vocab_size: int = TINY_GEMMA2_VOCAB_SIZE,
    *,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int | None = None,
    query_pre_attn_scalar: int = 24,
    sliding_window: int = 4096,
    architectures=("Gemma2ForCausalLM",),
) -> dict:
    """config.json with the keys google/gemma-2-2b publishes (written by transformers 4.42.4), shrunk.

    As in gemma-2-2b: grouped-query attention (fewer key/value heads than query heads), a head_dim that is not
    hidden / heads (2304 vs 8 x 256 there, 32 vs 4 x 16 here), attn_logit_softcapping 50.0, final_logit_softcapping
    30.0, sliding_window 4096 on every other layer (layers 0, 2, ...: transformers' default layer_types),
    gelu_pytorch_tanh, RMSNorm eps 1e-6 applied as (1 + w), rope_theta 10000, tied embeddings.
    query_pre_attn_scalar: 256 == head_dim in gemma-2-2b; 24 != head_dim here by default, so that a model scaling by
    head_dim ** -0.5 instead of query_pre_attn_scalar ** -0.5 fails the tests. sliding_window: pass a small value
    (e.g. 4) to exercise the sliding-window layers; real prompts (<= 256 tokens) never reach 4096.
    transformers 5.x reads these legacy keys (rope_theta -> rope_parameters, layer_types derived).
    """
    return {
        "architectures": list(architectures),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": head_dim,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": 4 * hidden_size if intermediate_size is None else intermediate_size,
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": n_layers,
        "num_key_value_heads": num_key_value_heads,
        "pad_token_id": 0,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "rms_norm_eps": 1e-06,
        "rope_theta": 10000.0,
        "sliding_window": sliding_window,
        "torch_dtype": "float32",
        "transformers_version": "4.42.4",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def make_tiny_gemma2_state_dict(config_json: dict, seed: int = 0, *, attn_logit_gain: float = 40.0) -> dict:
    """Random `Gemma2Model` weights (keys without `model.`), fp32, drawn from a generator seeded with `seed`.

    2-D weights ~ N(0, 1/fan_in), norm weights ~ N(0, 0.01) (applied as 1 + w, so a missing "+1" shows);
    q_proj and k_proj are scaled by sqrt(attn_logit_gain) each, which puts many attention logits past the
    soft-capping value 50: a model without attn_logit_softcapping then gives clearly different features.
    """
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(**{k: v for k, v in config_json.items() if k != "architectures"})
    model = Gemma2Model(config)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.state_dict().items():
        if param.ndim == 1:
            value = 0.1 * torch.randn(param.shape, generator=generator)
        else:
            value = torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5
            if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                value = value * attn_logit_gain**0.5
        state[name] = value.contiguous()
    return state


def _write_tokenizer_files(directory: Path, spiece_bytes: bytes) -> None:
    """tokenizer.model, tokenizer_config.json, special_tokens_map.json, and the tokenizer.json that transformers
    converts tokenizer.model to (which takes sentencepiece and protobuf); loading the folder afterwards needs neither,
    tokenizer.json being read first."""
    from transformers import AutoTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(spiece_bytes)
    special_tokens_map = {
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    tokenizer_config = {  # the keys of google/gemma-2-2b's tokenizer_config.json that matter
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2), encoding="utf-8")
    # tokenizer.json only: save_pretrained would rewrite tokenizer_config.json (transformers 5 drops add_bos_token
    # and writes this machine's absolute vocab_file path) and leave out special_tokens_map.json.
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))


def make_tiny_gemma2_folder(
    path,
    *,
    seed: int = 0,
    layout: str = "hf",
    hidden_size: int = 32,
    n_layers: int = 3,
    attn_logit_gain: float = 40.0,
    dtype: torch.dtype = torch.float32,
    **config_overrides,
) -> Path:
    """Write a tiny Gemma-2 at `path` (created if needed) and return the path a user would choose.

    layout="hf": `path` is a google/gemma-2-2b-style folder (config.json with architectures Gemma2ForCausalLM,
    model.safetensors with `model.*` keys, tokenizer files); returns `path`.
    layout="diffusers": `path` becomes a pipeline folder with `text_encoder/` (config.json with architectures
    Gemma2Model, model.safetensors with `Gemma2Model` keys) and `tokenizer/`; returns `path / "text_encoder"`.
    Tokenizer: tiny_gemma2_spiece_model() as tokenizer.model plus the tokenizer.json transformers converts it to;
    `AutoTokenizer.from_pretrained` gives a GemmaTokenizer that adds <bos> and no <eos>.
    config_overrides go to tiny_gemma2_config_json (e.g. sliding_window=4, query_pre_attn_scalar=16).
    """
    from safetensors.torch import save_file

    if layout not in ("hf", "diffusers"):
        raise ValueError(f"layout must be 'hf' or 'diffusers', not {layout!r}")
    path = Path(path)
    spiece_bytes = tiny_gemma2_spiece_model()
    architectures = ("Gemma2ForCausalLM",) if layout == "hf" else ("Gemma2Model",)
    config_json = tiny_gemma2_config_json(hidden_size, n_layers, architectures=architectures, **config_overrides)
    state = make_tiny_gemma2_state_dict(config_json, seed, attn_logit_gain=attn_logit_gain)
    if dtype != torch.float32:
        config_json["torch_dtype"] = str(dtype).removeprefix("torch.")
    if layout == "hf":
        model_dir = tokenizer_dir = path
        state = {COMFY_SINGLE_PREFIX + k: v for k, v in state.items()}
    else:
        model_dir, tokenizer_dir = path / "text_encoder", path / "tokenizer"
        config_json["_name_or_path"] = "google/gemma-2-2b"
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype) for k, v in state.items()}
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config_json, indent=2), encoding="utf-8")
    _write_tokenizer_files(tokenizer_dir, spiece_bytes)
    if layout == "diffusers":
        model_index = {
            "_class_name": "Lumina2Pipeline",
            "_diffusers_version": "0.33.0.dev0",
            "text_encoder": ["transformers", "Gemma2Model"],
            "tokenizer": ["transformers", "GemmaTokenizerFast"],
        }
        (path / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return model_dir


def _tokenizer_dir(folder: Path) -> Path:
    if (folder / "tokenizer.json").exists() or (folder / "tokenizer.model").exists():
        return folder
    if (folder.parent / "tokenizer").is_dir():  # diffusers: text_encoder/ beside tokenizer/
        return folder.parent / "tokenizer"
    raise FileNotFoundError(f"no tokenizer in {folder} or {folder.parent / 'tokenizer'}")


def gemma2_state_dict(folder_or_state_dict) -> dict:
    """`Gemma2Model` keys (no `model.` prefix, no lm_head) from a folder of make_tiny_gemma2_folder or a state dict
    in either naming."""
    from safetensors.torch import load_file

    if isinstance(folder_or_state_dict, dict):
        state = dict(folder_or_state_dict)
    else:
        folder = Path(folder_or_state_dict)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {folder}")
        state = {}
        for file in files:
            state.update(load_file(str(file)))
    state.pop("lm_head.weight", None)
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    return state


def write_comfy_gemma2_single_file(
    path,
    folder_or_state_dict,
    spiece_bytes: bytes,
    *,
    all_in_one: bool = False,
    dit_state: dict | None = None,
    vae_state: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the Gemma-2 weights as one of ComfyUI's files and return `path`.

    all_in_one=False: gemma_2_2b_fp16.safetensors's layout, `model.<Gemma2Model key>` + `spiece_model` (uint8).
    all_in_one=True: lumina_2.safetensors's layout, `text_encoders.gemma2_2b.transformer.model.<key>` +
    `text_encoders.spiece_model`, with `model.diffusion_model.<key>` for each dit_state entry and `vae.<key>` for each
    vae_state entry.
    dtype: of the Gemma weights; default float16 for the single file, bfloat16 for the all-in-one (the published
    files'); the DiT and VAE tensors are written as given.
    """
    from safetensors.torch import save_file

    state = gemma2_state_dict(folder_or_state_dict)
    if dtype is None:
        dtype = torch.bfloat16 if all_in_one else torch.float16
    prefix = COMFY_AIO_TE_PREFIX if all_in_one else COMFY_SINGLE_PREFIX
    tensors = {prefix + k: v.to(dtype).contiguous() for k, v in state.items()}
    tensors[COMFY_AIO_SPIECE_KEY if all_in_one else COMFY_SINGLE_SPIECE_KEY] = spiece_tensor(spiece_bytes)
    if not all_in_one and (dit_state or vae_state):
        raise ValueError("dit_state/vae_state only go into the all-in-one file")
    for k, v in (dit_state or {}).items():
        tensors[COMFY_AIO_DIT_PREFIX + k] = v.contiguous()
    for k, v in (vae_state or {}).items():
        tensors[COMFY_AIO_VAE_PREFIX + k] = v.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def lumina2_prompts(prompts, system_prompt: str | None) -> list[str]:
    """system_prompt + " <Prompt Start> " + prompt (sample.py:247-261); None: the prompts as they are ("empty")."""
    return list(prompts) if system_prompt is None else [system_prompt + PROMPT_START + p for p in prompts]


@torch.no_grad()
def reference_gemma2_features(
    folder,
    prompts,
    system_prompt: str | None = None,
    *,
    negative_prompt: str | None = None,
    attn_implementation: str = "eager",
):
    """Lumina-Image-2.0's own text encoding, through transformers' Gemma2Model in fp32.

    Returns (features [B, L, H] float32, mask [B, L] bool). `folder` is what make_tiny_gemma2_folder returned (an HF
    folder, or a diffusers `text_encoder/` whose tokenizer is in the sibling `tokenizer/`). Each prompt becomes
    `system_prompt + " <Prompt Start> " + prompt` (as-is when system_prompt is None, sample.py's "empty").
    negative_prompt: appended as the last row of the same batch, as sample.py:278 encodes [cap, neg_cap] together;
    it gets the system prompt only when it is not "" (sample.py:262-263), so "" is just <bos>.

    The original (sample.py:20-50; identical in demo.py:27-57 and finetune.py:256-286):
      - tokenizer = AutoTokenizer.from_pretrained("google/gemma-2-2b"); tokenizer.padding_side = "right"
        (sample.py:132-133): adds <bos> (id 2), no <eos>;
      - tokenizer(captions, padding=True, pad_to_multiple_of=8, max_length=256, truncation=True,
        return_tensors="pt") (:32-39): right-padded with <pad> (id 0) to the longest caption rounded up to a multiple
        of 8, each caption cut to 256 tokens (<bos> included);
      - text_encoder = AutoModel.from_pretrained("google/gemma-2-2b", torch_dtype=bf16 by default) (:135-137, :356-360),
        i.e. Gemma2Model; text_encoder(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        (:44-48): the output of the second-to-last decoder layer, before the final norm;
      - returns (prompt_embeds, prompt_masks) (:50): the mask is the tokenizer's attention_mask unchanged (int64) and
        the features at padded positions are left as the model computed them (not zeroed). The DiT then takes
        cap_len = mask.sum(1) (models/model.py:673), gives the mask to its context refiner (:718-719) and keeps only
        cap_feats[i, :cap_len] (:746), i.e. it relies on right padding.
    attn_implementation: "eager" applies attn_logit_softcapping (transformers 5 refuses sdpa for Gemma-2; some 4.x
    versions ran sdpa without soft-capping).
    """
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(_tokenizer_dir(folder)))
    tokenizer.padding_side = "right"
    texts = lumina2_prompts(prompts, system_prompt)
    if negative_prompt is not None:
        texts += lumina2_prompts([negative_prompt], system_prompt) if negative_prompt else [""]
    batch = tokenizer(
        texts,
        padding=True,
        pad_to_multiple_of=8,
        max_length=MAX_LENGTH,
        truncation=True,
        return_tensors="pt",
    )
    model = AutoModel.from_pretrained(
        str(folder), **{_dtype_kwarg(): torch.float32}, attn_implementation=attn_implementation
    ).eval()
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return out.hidden_states[-2].float(), batch.attention_mask.bool()


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


__all__ = [
    "COMFY_AIO_DIT_PREFIX",
    "COMFY_AIO_SPIECE_KEY",
    "COMFY_AIO_TE_PREFIX",
    "COMFY_AIO_VAE_PREFIX",
    "COMFY_SINGLE_PREFIX",
    "COMFY_SINGLE_SPIECE_KEY",
    "DEFAULT_SYSTEM_PROMPT",
    "MAX_LENGTH",
    "PROMPT_START",
    "SYSTEM_PROMPTS",
    "TINY_GEMMA2_VOCAB_SIZE",
    "gemma2_state_dict",
    "lumina2_prompts",
    "make_tiny_gemma2_folder",
    "make_tiny_gemma2_state_dict",
    "reference_gemma2_features",
    "spiece_encode",
    "spiece_pieces",
    "spiece_tensor",
    "tiny_gemma2_config_json",
    "tiny_gemma2_spiece_model",
    "tokenizer_from_spiece_bytes",
]
