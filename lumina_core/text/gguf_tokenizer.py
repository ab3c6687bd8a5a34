"""LLaMA's SentencePiece tokenizer rebuilt from the metadata of a llama.cpp GGUF file.

llama.cpp's converter (`convert_hf_to_gguf.py`, `_create_vocab_sentencepiece`) reads the model's tokenizer.model
with sentencepiece and writes, for every id, its piece (`tokenizer.ggml.tokens`), score (`tokenizer.ggml.scores`)
and type (`tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte, the
numbering of sentencepiece's own ModelProto), with `tokenizer.ggml.model` "llama" for a SentencePiece model, the
special ids (`tokenizer.ggml.bos_token_id`, ...) and `tokenizer.ggml.add_space_prefix` (absent in older files:
true for LLaMA). That is everything a SentencePiece BPE model holds that matters when encoding, so the ModelProto is
written back from it (protobuf wire format, a few fields) and read by sentencepiece itself, the library the original
tokenizer.model was made for: identity normalization, the dummy prefix, no whitespace folding, byte fallback when
the vocabulary has byte pieces. The encoding then follows the original's scores exactly, where a rebuild as a
merges list (what transformers does) only approximates them.

sentencepiece_model.proto fields written: ModelProto 1 pieces {1 piece, 2 score, 3 type}, 2 trainer_spec
{3 model_type (2 = BPE), 35 byte_fallback, 40-43 unk/bos/eos/pad ids, 45-47 the unk/bos/eos pieces}, 3 normalizer_spec
{1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces, 5 escape_whitespaces}.
"""

from __future__ import annotations

import struct

from .hf_weights import TextEncoderError
from .spiece import SentencePieceTokenizer

SPM_MODEL = "llama"  # tokenizer.ggml.model of a SentencePiece tokenizer
_NORMAL, _BYTE = 1, 6
_BPE = 2  # TrainerSpec.ModelType


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int32 values are written as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _int(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(int(value))


def _float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _bytes(number: int, data: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def spiece_model_proto(pieces, *, unk_id, bos_id, eos_id, add_dummy_prefix: bool = True) -> bytes:
    """A serialized SentencePiece BPE ModelProto: pieces is [(piece, score, type)] by id; the special ids may be
    None (none). No padding id, as in LLaMA-2's tokenizer.model (the encoder pads with id 0 itself)."""
    out = bytearray()
    for piece, score, kind in pieces:
        out += _bytes(1, _bytes(1, piece.encode("utf-8")) + _float(2, score) + _int(3, kind))
    trainer = _int(3, _BPE) + _int(35, any(kind == _BYTE for _, _, kind in pieces))
    for number, token_id in ((40, unk_id), (41, bos_id), (42, eos_id), (43, None)):
        trainer += _int(number, -1 if token_id is None else token_id)
    for number, token_id in ((45, unk_id), (46, bos_id), (47, eos_id)):
        if token_id is not None:
            trainer += _bytes(number, pieces[token_id][0].encode("utf-8"))
    out += _bytes(2, trainer)
    out += _bytes(3, _bytes(1, b"identity") + _int(3, add_dummy_prefix) + _int(4, False) + _int(5, True))
    return bytes(out)


def llama_tokenizer_from_gguf(src, get_hint: str = "") -> SentencePieceTokenizer:
    """The SentencePiece tokenizer of a LLaMA GGUF (`src`: a GGUFFile), rebuilt from its metadata; a
    TextEncoderError naming the file when it carries none, or not a SentencePiece one."""
    path = src.path
    model = src.value("tokenizer.ggml.model")
    if model is None or src.value("tokenizer.ggml.tokens") is None:
        raise TextEncoderError(
            f"{path} carries no tokenizer in its metadata, and there are no tokenizer files beside it: put the "
            f"tokenizer files of the model (tokenizer.json, tokenizer_config.json, tokenizer.model) in "
            f"{path.parent}. {get_hint}"
        )
    if model != SPM_MODEL:
        raise TextEncoderError(
            f"{path} has a {model!r} tokenizer, not LLaMA-2's SentencePiece tokenizer ('llama'): it is another "
            f"model than LLaMA-2 (LLaMA-3 and later use a 'gpt2' BPE tokenizer). {get_hint}"
        )
    tokens = src.value("tokenizer.ggml.tokens")
    scores = src.value("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = src.value("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)):
        raise TextEncoderError(
            f"{path}: its tokenizer metadata is inconsistent ({len(tokens)} tokens, {len(scores)} scores, "
            f"{len(types)} types); download the file again. {get_hint}"
        )

    def special(name: str):
        token_id = src.value(f"tokenizer.ggml.{name}_token_id")
        return int(token_id) if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    proto = spiece_model_proto(
        list(zip(tokens, scores, types)),
        unk_id=special("unknown"),
        bos_id=special("bos"),
        eos_id=special("eos"),
        add_dummy_prefix=bool(src.value("tokenizer.ggml.add_space_prefix", True)),
    )
    return SentencePieceTokenizer(proto, origin=f"the tokenizer metadata of {path}", get_hint=get_hint)
