"""Text encoders written the llama.cpp way, for the tests: tiny LLaMA (with a SentencePiece tokenizer trained here
with LLaMA's settings), Gemma and Gemma-2 Hugging Face folders, converted to GGUF as llama.cpp's
`convert_hf_to_gguf.py` does it.

What the converter does, and what `llama_cpp_gguf` repeats (facts read in llama.cpp's convert_hf_to_gguf.py):
  - names: the `gguf` package's own TensorNameMap for the architecture (`gguf.get_tensor_name_map`), the table the
    converter uses, so the names here do not come from the code under test;
  - LLaMA (`LlamaModel.modify_tensors`): q_proj rows permuted with `permute(w, n_head, n_head)`, k_proj rows with
    `permute(w, n_head, n_head_kv)`, where permute(w, n_head, n_head_kv) uses n_head_kv when it differs and is
    `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`;
  - Gemma and Gemma-2 (`GemmaModel`/`Gemma2Model.modify_tensors`): every tensor whose name ends in "norm.weight" gets
    +1 (in fp32), no permutation; the LM head is tied and not written (LLaMA's is, as `output.weight`);
  - metadata through the writer's typed adders (`{arch}.context_length`, `embedding_length`, `block_count`,
    `feed_forward_length`, `attention.head_count(_kv)`, `attention.layer_norm_rms_epsilon`, `rope.freq_base`,
    `attention.key_length/value_length` for Gemma, `attn_logit_softcapping`, `final_logit_softcapping`,
    `attention.sliding_window` for Gemma-2) and the SentencePiece vocabulary as `_create_vocab_sentencepiece` reads
    it (piece, score, type of every id; `tokenizer.ggml.model` "llama"; bos/eos/unk ids; add_bos/add_eos; Gemma
    add_space_prefix false);
  - 1-D tensors F32; matrices in the file type (here F32 or Q8_0, quantized with the gguf package).

Weights are rounded to bf16 values (the released models are bf16), so that a Gemma norm's "+1 then -1" in fp32 is
exact and the F32 file holds exactly the folder's weights. `dequantized_folder` writes the folder of the weights a
quantized file holds (each matrix dequantized by `gguf.quants.dequantize`), the truth for a Q8_0 file.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
from pathlib import Path

import numpy as np
import torch

# LLaMA-2's tokenizer.model settings (its trainer_spec and normalizer_spec): BPE, <unk>=0 <s>=1 </s>=2, no pad,
# byte fallback, identity normalization, a dummy prefix, whitespace kept as it is, digits split.
LLAMA_SPM_SETTINGS = dict(
    model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>",
    eos_piece="</s>", byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
    remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
)
TINY_LLAMA_SPM_VOCAB = 640

_CORPUS = [
    "a photo of an astronaut riding a horse on the moon",
    "an old man portrayed as a retro superhero stands in the streets of new york city at night",
    "a fluffy mouse holding a watermelon in a magical and colorful setting",
    "A charcoal sketch of Istanbul with the iconic Hagia Sophia Mosque, bright houses, trees and flowers.",
    "the quick brown fox jumps over the lazy dog; 1024x1024, 2x2 grids!",
    "Upper body of a young woman in a Victorian-era outfit with brass goggles and leather straps.",
    "There are puddles with raindrops and reflections of light and shadow. The background contains mountains.",
    "an oil painting of a lighthouse at night, stars in the sky, waves crashing on the rocks",
    "Ein Foto von einer Katze, die auf einem roten Stuhl sitzt. Über den Dächern von Zürich.",
    "Un chat noir dort près de la fenêtre ; l'été est chaud, très chaud.",
    "日本の古い寺院、桜の花、夕暮れの空",
    "Cyberpunk street market at 3:45 AM, neon signs (pink & cyan), rain-soaked pavement -- ultra detailed, 8k",
    "watercolor: a red fox 🦊 in the snow, minimalist, soft pastel colours",
]


@functools.lru_cache(maxsize=None)
def tiny_llama_spiece_model(vocab_size: int = TINY_LLAMA_SPM_VOCAB) -> bytes:
    """Serialized SentencePiece ModelProto of a tiny LLaMA-like tokenizer, trained here offline with LLaMA-2's
    settings (one thread: the same bytes on every run)."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=out, vocab_size=vocab_size, character_coverage=1.0,
        num_threads=1, minloglevel=2, **LLAMA_SPM_SETTINGS,
    )
    return out.getvalue()


def write_llama_tokenizer_files(directory, spiece_bytes: bytes) -> Path:
    """tokenizer.model, tokenizer_config.json and special_tokens_map.json as meta-llama/Llama-2-7b-hf has them,
    and the tokenizer.json transformers converts tokenizer.model to (needs sentencepiece and protobuf)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(spiece_bytes)
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_config = {  # the keys of Llama-2-7b-hf's tokenizer_config.json that matter
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": 1000000000000000019884624838656, "pad_token": None, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", **tokens,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _bf16_values(shape, generator, scale=1.0, center=0.0) -> torch.Tensor:
    return (center + scale * torch.randn(shape, generator=generator)).to(torch.bfloat16).float()


def make_llama_folder(path, *, hidden_size: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 4,
                      intermediate_size: int = 128, seed: int = 0) -> Path:
    """A tiny LLaMA-2-style Hugging Face folder (LlamaForCausalLM keys with lm_head, Llama-2's config.json keys,
    the tiny SentencePiece tokenizer), every tensor random with bf16 values (norms around 1)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.helpers_llama import llama2_hf_config_json

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spiece = tiny_llama_spiece_model()
    vocab = len(_pieces(spiece))
    config_json = llama2_hf_config_json(hidden_size=hidden_size, intermediate_size=intermediate_size,
                                        num_attention_heads=n_heads, num_hidden_layers=n_layers, vocab_size=vocab)
    config_json["num_key_value_heads"] = n_kv_heads
    config = LlamaConfig(**{k: v for k, v in config_json.items() if k != "architectures"})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {k: _bf16_values(s, g, 0.1, 1.0) if len(s) == 1 else _bf16_values(s, g, s[1] ** -0.5)
             for k, s in shapes.items()}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_json, indent=2), encoding="utf-8")
    write_llama_tokenizer_files(path, spiece)
    return path


def round_folder_to_bf16(folder) -> Path:
    """Rewrite every safetensors file of a folder with its values rounded to bf16 (kept as float32)."""
    from safetensors.torch import load_file, save_file

    for file in Path(folder).glob("*.safetensors"):
        state = {k: v.to(torch.bfloat16).float().contiguous() for k, v in load_file(str(file)).items()}
        save_file(state, str(file), metadata={"format": "pt"})
    return Path(folder)


def _pieces(spiece_bytes: bytes) -> list[tuple[str, float, int]]:
    """(piece, score, type) of every id, read with sentencepiece as llama.cpp's converter reads them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=bytes(spiece_bytes))
    pieces = []
    for i in range(sp.get_piece_size()):
        kind = 1  # NORMAL
        if sp.is_unknown(i):
            kind = 2
        elif sp.is_control(i):
            kind = 3
        elif sp.is_unused(i):
            kind = 5
        elif sp.is_byte(i):
            kind = 6
        pieces.append((sp.id_to_piece(i), sp.get_score(i), kind))
    return pieces


def _folder_state(folder) -> dict:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v for k, v in state.items()}


def permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, as written there."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_cpp_gguf(folder, path, qtype="F32", *, tokenizer: bool = True, spiece_bytes: bytes | None = None) -> Path:
    """Convert the Hugging Face folder `folder` (LLaMA, Gemma or Gemma-2, by its config.json) to a GGUF at `path` as
    llama.cpp's converter does (module docstring); qtype: "F32" or "Q8_0" for the matrices. tokenizer: write the
    vocabulary from `spiece_bytes` (default: the folder's tokenizer.model) into the metadata."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    folder, path = Path(folder), Path(path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = config["model_type"]
    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma": gguf.MODEL_ARCH.GEMMA,
                  "gemma2": gguf.MODEL_ARCH.GEMMA2}[arch]
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    names = gguf.get_tensor_name_map(model_arch, n_layers)
    matrix_type = Q[qtype]

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if matrix_type == Q.F32 else gguf.LlamaFileType.MOSTLY_Q8_0)
    if arch == "llama":
        writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
        writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    else:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        writer.add_sliding_window(config["sliding_window"])
    if tokenizer:
        _add_vocabulary(writer, spiece_bytes or (folder / "tokenizer.model").read_bytes(), arch,
                        config["vocab_size"])

    for key, value in _folder_state(folder).items():
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            if key == "lm_head.weight":  # Gemma's is tied: llama.cpp writes none
                continue
            raise KeyError(f"no llama.cpp name for {key}")
        data = value.float()
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = permute(data, n_head, n_head)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            data = permute(data, n_head, n_kv)
        if arch != "llama" and key.endswith("norm.weight"):
            data = data + 1
        array = np.ascontiguousarray(data.numpy())
        if array.ndim > 1 and matrix_type != Q.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, matrix_type), raw_dtype=matrix_type)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_vocabulary(writer, spiece_bytes: bytes, arch: str, vocab_size: int) -> None:
    """`_set_vocab_sentencepiece`: every piece with its score and type, padded to the model's vocabulary with
    "[PAD{i}]" pieces of type UNUSED, the special ids, add_bos/add_eos (Gemma: no space prefix)."""
    pieces = _pieces(spiece_bytes)
    pieces += [(f"[PAD{i}]", -1000.0, 5) for i in range(len(pieces), vocab_size)]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([p for p, _, _ in pieces])
    writer.add_token_scores([s for _, s, _ in pieces])
    writer.add_token_types([t for _, _, t in pieces])
    index = {p: i for i, (p, _, _) in enumerate(pieces)}
    if arch == "llama":
        writer.add_bos_token_id(index["<s>"])
        writer.add_eos_token_id(index["</s>"])
        writer.add_unk_token_id(index["<unk>"])
    else:
        writer.add_bos_token_id(index["<bos>"])
        writer.add_eos_token_id(index["<eos>"])
        writer.add_unk_token_id(index["<unk>"])
        writer.add_pad_token_id(index["<pad>"])
        writer.add_add_space_prefix(False)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def dequantized_folder(folder, dst, qtype: str) -> Path:
    """A copy of the Hugging Face folder `folder` at `dst` whose matrices hold what a `qtype` file of it holds
    (quantized and dequantized by the gguf package; the blocks run along rows, so llama.cpp's row permutation does
    not change a row's values)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    shutil.copytree(folder, dst)
    for file in dst.glob("*.safetensors"):
        state = {}
        for key, value in load_file(str(file)).items():
            if value.ndim > 1 and key != "lm_head.weight":
                array = quants.dequantize(quants.quantize(value.float().numpy(), Q[qtype]), Q[qtype])
                value = torch.from_numpy(np.ascontiguousarray(array)).reshape(value.shape)
            state[key] = value.contiguous()
        save_file(state, str(file), metadata={"format": "pt"})
    return dst


def copy_tokenizer_files(folder, dst) -> Path:
    """The tokenizer files of a Hugging Face folder (or of its diffusers `tokenizer` sibling), copied to dst."""
    folder, dst = Path(folder), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).is_file():
            shutil.copy(folder / name, dst / name)
    return dst
