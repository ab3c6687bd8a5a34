"""Gemma's tokenizer from the bytes of its SentencePiece model, as ComfyUI's single files carry it (`spiece_model`).

The pieces are cut by `sentencepiece` itself (the library ComfyUI requires and reads these bytes with), so no
tokenizer code is re-implemented here. What this class adds is the one thing transformers' GemmaTokenizer (the
tokenizer of the Hugging Face folder, hence of the original Lumina code) does differently: it matches the text of
its special tokens (<bos>, <eos>, <pad>, <unk>: the CONTROL and UNKNOWN pieces) in the raw prompt and gives their
ids, where sentencepiece spells them out. With that, the ids equal the folder tokenizer's on the same vocabulary.
BOS and padding are laid out by the caller, as for the folder tokenizer (`gemma.bos_token_rows`).
"""

from __future__ import annotations

import re

from .hf_weights import TextEncoderError


class SentencePieceTokenizer:
    """The subset of a transformers tokenizer's interface that the Gemma encoders use, over a SentencePiece model."""

    padding_side = "right"

    def __init__(self, model_proto: bytes, *, origin: str, get_hint: str = ""):
        """model_proto: the serialized SentencePiece ModelProto; origin: where it comes from, named in errors."""
        try:
            import sentencepiece
        except ImportError:
            raise TextEncoderError(
                f"Reading the tokenizer stored in {origin} needs the sentencepiece package (ComfyUI installs it): "
                "pip install sentencepiece"
            ) from None
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(bytes(model_proto))
        except (RuntimeError, OSError, TypeError) as err:
            raise TextEncoderError(
                f"{origin} is not a SentencePiece model ({str(err).splitlines()[0] if str(err) else 'unreadable'}): "
                f"the file is corrupted or is not the text encoder it looks like. {get_hint}"
            ) from None
        self.processor = processor
        size = processor.get_piece_size()
        special = [
            processor.id_to_piece(i) for i in range(size) if processor.is_control(i) or processor.is_unknown(i)
        ]
        self._special_ids = {piece: processor.piece_to_id(piece) for piece in special}
        # Longest first, so that a special piece that begins another is not matched inside it.
        pattern = "|".join(re.escape(p) for p in sorted(self._special_ids, key=len, reverse=True))
        self._special = re.compile(f"({pattern})") if pattern else None
        self.bos_token_id = _id_or_none(processor.bos_id())
        self.eos_token_id = _id_or_none(processor.eos_id())
        self.pad_token_id = _id_or_none(processor.pad_id())
        self.unk_token_id = _id_or_none(processor.unk_id())

    def __len__(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """The ids of `text`, without BOS or EOS."""
        if self._special is None:
            return self.processor.encode(text)
        ids: list[int] = []
        # re.split with a capturing group alternates text and matched special pieces.
        for i, part in enumerate(self._special.split(text)):
            if i % 2:
                ids.append(self._special_ids[part])
            elif part:
                ids += self.processor.encode(part)
        return ids

    def __call__(self, texts, add_special_tokens: bool = False, truncation: bool = False) -> dict:
        """{"input_ids": [ids of each text]}: as a transformers tokenizer called with add_special_tokens=False."""
        if add_special_tokens or truncation:
            raise ValueError("SentencePieceTokenizer adds no special tokens and truncates nothing itself")
        if isinstance(texts, str):
            return {"input_ids": self.encode(texts)}
        return {"input_ids": [self.encode(text) for text in texts]}

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.processor.decode([int(i) for i in ids])


def _id_or_none(token_id: int):
    return None if token_id < 0 else token_id
