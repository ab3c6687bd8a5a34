"""Text encoders from llama.cpp GGUF files (CPU, tiny, seeded, no network).

The truth for the features: the same weights loaded from their Hugging Face folder by the folder loaders (which
other tests hold to transformers' own classes and the originals' procedures); for a Q8_0 file, the folder of the
values the file holds (dequantized by the gguf package). The files are written as llama.cpp's converter writes them,
names from the gguf package's own map (tests/helpers_gguf_text.py). The truth for the rebuilt LLaMA tokenizer: the
original tokenizer.model run by sentencepiece, and the Hugging Face folder's tokenizer that the LLaMA encoder uses.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lumina_core import families, load_text_encoder
from lumina_core.text import gguf_text
from lumina_core.text.gemma import GemmaTextEncoder
from lumina_core.text.gemma2 import Gemma2TextEncoder
from lumina_core.text.hf_weights import TextEncoderError
from lumina_core.text.llama import LlamaTextEncoder
from lumina_core.text.spiece import SentencePieceTokenizer
from lumina_core.tiny import make_tiny_gemma_folder
from lumina_core.weights import gguf_file, quantized
from lumina_core.weights.quantized import GGUFEmbedding, QuantizedWeight
from nodes import NODE_CLASS_MAPPINGS as N
from nodes import model_files
from tests.helpers_gemma2 import make_tiny_gemma2_folder
from tests.helpers_gguf import write_file
from tests.helpers_gguf_text import (
    copy_tokenizer_files,
    dequantized_folder,
    llama_cpp_gguf,
    make_llama_folder,
    permute,
    round_folder_to_bf16,
    tiny_llama_spiece_model,
)

pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "",
    "Ein Foto von einer Katze über den Dächern von Zürich, 1024x1024 🦊",
]
# Varied text for the tokenizer: words in and out of the tiny vocabulary, digits, punctuation, several scripts,
# emoji (byte fallback), runs of spaces, leading and trailing spaces, tabs and newlines.
TOKENIZER_TEXTS = PROMPTS + [
    "the quick brown fox jumps over the lazy dog",
    "  two  leading spaces and   three inside ",
    "Cyberpunk street market at 3:45 AM, neon signs (pink & cyan) -- ultra detailed, 8k",
    "日本の古い寺院、桜の花 and a zebra 🦓🦓 at 12:00",
    "tabs\tand\nnew lines\n\n",
    "Ünïcödé çharactèrs, «quotes», — dashes… and ½ fractions",
    "x" * 40 + " " + "1234567890" * 3,
]
KINDS = ("llama_mha", "llama_gqa", "gemma", "gemma2")
CLASSES = {"llama_mha": LlamaTextEncoder, "llama_gqa": LlamaTextEncoder, "gemma": GemmaTextEncoder,
           "gemma2": Gemma2TextEncoder}


def _folder(kind, path):
    if kind == "llama_mha":
        return make_llama_folder(path, n_heads=4, n_kv_heads=4)
    if kind == "llama_gqa":
        return make_llama_folder(path, n_heads=4, n_kv_heads=2)
    if kind == "gemma":
        return round_folder_to_bf16(make_tiny_gemma_folder(path))
    # Gemma-2 with its softcapping in play and a sliding window the prompts exceed; a GGUF carries no
    # query_pre_attn_scalar, so the folder uses llama.cpp's (head_dim, as gemma-2-2b).
    folder = make_tiny_gemma2_folder(path, sliding_window=4, query_pre_attn_scalar=16)
    return round_folder_to_bf16(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{kind: {"folder", "F32", "Q8_0", "Q8_0 folder"}}: each GGUF in a folder of its own with the tokenizer files."""
    root = tmp_path_factory.mktemp("gguf_text")
    out = {}
    for kind in KINDS:
        folder = _folder(kind, root / kind / "hf")
        entry = {"folder": folder}
        for qtype in ("F32", "Q8_0"):
            gguf_dir = copy_tokenizer_files(folder, root / kind / f"gguf_{qtype}")
            entry[qtype] = llama_cpp_gguf(folder, gguf_dir / f"{kind}.{qtype}.gguf", qtype,
                                          tokenizer=kind != "gemma")
        entry["Q8_0 folder"] = dequantized_folder(folder, root / kind / "hf_q8_0", "Q8_0")
        out[kind] = entry
    return out


def _encode(encoder, prompts=PROMPTS):
    if isinstance(encoder, Gemma2TextEncoder):
        return encoder.encode(prompts, "alignment")
    return encoder.encode(prompts)


def _relative(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------------------------
# Features


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("kind", KINDS)
def test_features_equal_the_folder_of_the_same_weights(tiny, kind, qtype):
    entry = tiny[kind]
    encoder = load_text_encoder(entry[qtype], dtype=torch.float32)
    reference = load_text_encoder(entry["folder" if qtype == "F32" else "Q8_0 folder"], dtype=torch.float32)
    assert type(encoder) is CLASSES[kind] and type(reference) is CLASSES[kind]
    features, mask = _encode(encoder)
    truth, truth_mask = _encode(reference)
    assert torch.equal(mask, truth_mask) and features.shape == truth.shape
    assert _relative(features, truth) <= 1e-5
    assert features.abs().max() > 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_q8_0_stays_quantized_in_memory(tiny, kind):
    encoder = load_text_encoder(tiny[kind]["Q8_0"], dtype=torch.float32)
    model = encoder.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, QuantizedWeight) and m.qtype == Q.Q8_0 for m in linears)
    assert isinstance(model.embed_tokens, GGUFEmbedding) and model.embed_tokens.weight.dtype == torch.uint8
    blocks = [m.weight for m in linears] + [model.embed_tokens.weight]
    assert len({b.untyped_storage().data_ptr() for b in blocks}) == 1  # one buffer (GGUFFile.raw_together)
    assert encoder.dtype == torch.float32
    src = gguf_file.GGUFFile(tiny[kind]["Q8_0"])
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert held <= 1.3 * src.tensor_bytes


def test_the_embedding_dequantizes_only_the_rows_looked_up(tiny, monkeypatch):
    encoder = load_text_encoder(tiny["gemma2"]["Q8_0"], dtype=torch.float32)
    calls = []
    real = quantized.dequantize_gguf

    def spy(data, qtype, shape):
        calls.append(tuple(shape))
        return real(data, qtype, shape)

    monkeypatch.setattr(quantized, "dequantize_gguf", spy)
    ids, _ = encoder.tokenize(["a red cat"])
    with torch.no_grad():
        rows = encoder.model.embed_tokens(ids)
    hidden = encoder.hidden_size
    assert calls == [(ids.numel(), hidden)]
    table = gguf_file.GGUFFile(tiny["gemma2"]["Q8_0"]).get("token_embd.weight")
    # transformers' scaled embedding: the table's rows times sqrt(hidden) cast to the compute dtype.
    torch.testing.assert_close(rows[0], table[ids[0]] * torch.tensor(hidden**0.5), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_tensors_the_features_need_are_read(tiny, kind, monkeypatch):
    read = []
    real = gguf_file.GGUFFile.raw  # every tensor read goes through it (`get` too)
    monkeypatch.setattr(gguf_file.GGUFFile, "raw", lambda self, key, out=None: read.append(key) or real(self, key, out))
    encoder = load_text_encoder(tiny[kind]["Q8_0"], dtype=torch.float32)
    layers = gguf_file.GGUFFile(tiny[kind]["Q8_0"]).value(f"{kind.split('_')[0]}.block_count")
    assert "output.weight" not in read
    assert len(read) == len(set(read))  # each tensor once
    if kind.startswith("llama"):  # last_hidden_state: every layer and the final norm
        assert encoder.model.config.num_hidden_layers == layers and "output_norm.weight" in read
        assert any(k.startswith(f"blk.{layers - 1}.") for k in read)
    else:  # hidden_states[-2]: neither the last layer nor the final norm
        assert encoder.model.config.num_hidden_layers == layers - 1 and len(encoder.model.layers) == layers - 1
        assert "output_norm.weight" not in read
        assert not any(k.startswith(f"blk.{layers - 1}.") for k in read)
        assert any(k.startswith(f"blk.{layers - 2}.") for k in read)


def test_bf16_compute_is_close_to_fp32(tiny):
    features32, _ = _encode(load_text_encoder(tiny["llama_gqa"]["Q8_0"], dtype=torch.float32))
    encoder = load_text_encoder(tiny["llama_gqa"]["Q8_0"], dtype=torch.bfloat16)
    assert encoder.dtype == torch.bfloat16
    assert all(p.dtype in (torch.uint8, torch.bfloat16) for p in encoder.model.parameters())
    features16, _ = _encode(encoder)
    assert features16.dtype == torch.float32 and torch.isfinite(features16).all()
    assert 0 < _relative(features16, features32) < 0.05


def test_key_rows_are_unpermuted_with_the_key_value_head_count():
    """GQA: llama.cpp permuted the key rows within head_count_kv heads; undone with the query's head count (or a
    fixed 8, as a ComfyUI pack does) the rows come out in another order."""
    key_rows = torch.arange(16.0).reshape(16, 1)
    assert torch.equal(gguf_text.unpermute_rows(permute(key_rows, 4, 2), 2), key_rows)
    assert not torch.equal(gguf_text.unpermute_rows(permute(key_rows, 4, 2), 4), key_rows)


# --------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_a_lone_llama_gguf_rebuilds_the_original_tokenizer(tiny, tmp_path):
    """The ids of the tokenizer rebuilt from the metadata equal those of the original tokenizer.model (run by
    sentencepiece) and of the Hugging Face folder's tokenizer (the LLaMA encoder's), on varied text."""
    import sentencepiece as spm

    lone = tmp_path / "llama-2-7b.Q8_0.gguf"
    shutil.copy(tiny["llama_gqa"]["Q8_0"], lone)
    encoder = load_text_encoder(lone, dtype=torch.float32)
    assert isinstance(encoder.tokenizer, SentencePieceTokenizer)
    folder_encoder = LlamaTextEncoder.from_folder(tiny["llama_gqa"]["folder"], dtype=torch.float32)
    original = spm.SentencePieceProcessor(model_proto=tiny_llama_spiece_model())
    rebuilt = encoder.tokenizer(TOKENIZER_TEXTS, add_special_tokens=False)["input_ids"]
    assert rebuilt == [original.encode(t) for t in TOKENIZER_TEXTS]
    assert any(len(ids) > len(text.split()) + 4 for ids, text in zip(rebuilt, TOKENIZER_TEXTS))  # byte pieces
    assert (encoder.tokenizer.bos_token_id, encoder.tokenizer.eos_token_id) == (1, 2)
    # transformers 5's LlamaTokenizer builds its own pre-tokenizer (Metaspace, prepend "first") whatever
    # tokenizer.json says, and so differs from sentencepiece, the original, on text that starts with a space.
    texts = [t for t in TOKENIZER_TEXTS if not t[:1].isspace()]
    assert encoder.tokenizer(texts, add_special_tokens=False)["input_ids"] == \
        folder_encoder.tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids, mask = encoder.tokenize(texts)
    folder_ids, folder_mask = folder_encoder.tokenize(texts)
    assert torch.equal(ids, folder_ids) and torch.equal(mask, folder_mask)
    torch.testing.assert_close(encoder.encode(PROMPTS)[0], load_text_encoder(tiny["llama_gqa"]["Q8_0"],
                                                                              dtype=torch.float32).encode(PROMPTS)[0],
                               rtol=0, atol=0)


def test_the_rebuilt_model_proto_holds_the_originals_pieces_and_normalizer(tiny):
    from sentencepiece import sentencepiece_model_pb2

    from lumina_core.text.gguf_tokenizer import llama_tokenizer_from_gguf

    tokenizer = llama_tokenizer_from_gguf(gguf_file.GGUFFile(tiny["llama_mha"]["F32"]))
    rebuilt, original = sentencepiece_model_pb2.ModelProto(), sentencepiece_model_pb2.ModelProto()
    rebuilt.ParseFromString(tokenizer.processor.serialized_model_proto())
    original.ParseFromString(tiny_llama_spiece_model())
    assert [(p.piece, p.score, p.type) for p in rebuilt.pieces] == [(p.piece, p.score, p.type) for p in original.pieces]
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(rebuilt.normalizer_spec, field) == getattr(original.normalizer_spec, field), field
    for field in ("model_type", "byte_fallback", "unk_id", "bos_id", "eos_id", "pad_id", "unk_piece", "bos_piece",
                  "eos_piece"):
        assert getattr(rebuilt.trainer_spec, field) == getattr(original.trainer_spec, field), field


def test_llama_cpp_vocabulary_padding_changes_no_id(tmp_path):
    """llama.cpp pads a vocabulary shorter than the embedding with [PADn] pieces of type UNUSED."""
    import json

    import sentencepiece as spm

    folder = make_llama_folder(tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] += 7
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.cat([state[key], torch.zeros(7, state[key].shape[1])])
    save_file(state, str(folder / "model.safetensors"))
    path = llama_cpp_gguf(folder, tmp_path / "padded.gguf")
    encoder = load_text_encoder(path, dtype=torch.float32)
    assert len(encoder.tokenizer) == config["vocab_size"]
    original = spm.SentencePieceProcessor(model_proto=tiny_llama_spiece_model())
    assert encoder.tokenizer(TOKENIZER_TEXTS)["input_ids"] == [original.encode(t) for t in TOKENIZER_TEXTS]


# --------------------------------------------------------------------------------------------------------------
# Files, folders and errors


def test_a_folder_with_one_gguf_and_the_tokenizer_files_is_that_gguf(tiny):
    folder = tiny["gemma"]["Q8_0"].parent
    assert families.text_encoder_family(folder) is families.LUMINA_NEXT
    assert families.gguf_text_encoder_path(folder) == tiny["gemma"]["Q8_0"]
    features, _ = _encode(load_text_encoder(folder, dtype=torch.float32))
    torch.testing.assert_close(features, _encode(load_text_encoder(tiny["gemma"]["Q8_0"], dtype=torch.float32))[0],
                               rtol=0, atol=0)


def test_a_gguf_beside_the_folders_config_and_tokenizer_but_no_weights_is_loaded(tiny, tmp_path):
    """A Hugging Face folder whose weights were replaced by a .gguf (config.json and the tokenizer files kept)."""
    folder = tmp_path / "Llama-2-7b-gguf"
    shutil.copytree(tiny["llama_mha"]["folder"], folder, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(tiny["llama_mha"]["Q8_0"], folder)
    assert families.gguf_text_encoder_path(folder) == folder / tiny["llama_mha"]["Q8_0"].name
    encoder = load_text_encoder(folder, dtype=torch.float32)
    assert isinstance(encoder.model.embed_tokens, GGUFEmbedding)
    shutil.copy(tiny["llama_mha"]["folder"] / "model.safetensors", folder)  # weights again: the folder is theirs
    assert families.gguf_text_encoder_path(folder) is None
    assert not isinstance(load_text_encoder(folder, dtype=torch.float32).model.embed_tokens, GGUFEmbedding)


@pytest.mark.parametrize("kind,family", [("llama_mha", families.LUMINA_T2I), ("gemma", families.LUMINA_NEXT),
                                         ("gemma2", families.LUMINA_2)])
def test_the_family_comes_from_the_architecture(tiny, kind, family):
    assert families.text_encoder_family(tiny[kind]["F32"]) is family


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
def test_a_lone_gemma_gguf_asks_for_the_tokenizer_files(tiny, kind, tmp_path):
    lone = tmp_path / f"{kind}.gguf"
    shutil.copy(tiny[kind]["Q8_0"], lone)
    with pytest.raises(TextEncoderError) as err:
        load_text_encoder(lone)
    message = str(err.value)
    source = CLASSES[kind].source
    assert str(lone) in message and source in message and "tokenizer.json" in message
    assert f"Put them in {tmp_path}" in message and str(tmp_path / kind) in message


@pytest.mark.parametrize("arch,message", [("t5", "architecture 't5', which is no Lumina text encoder"),
                                          ("qwen3", "architecture 'qwen3'"),
                                          ("lumina2", "is a GGUF DiT")])
def test_other_architectures_are_refused(tmp_path, arch, message):
    path = tmp_path / f"{arch}.gguf"
    write_file(path, {"token_embd.weight": (np.zeros((8, 32), np.float32), Q.F32)}, arch=arch)
    with pytest.raises(families.TextEncoderFolderError, match=message) as err:
        load_text_encoder(path)
    assert str(path) in str(err.value)
    assert not families.is_text_encoder_folder(path)


def test_an_encoder_refuses_another_models_gguf(tiny):
    with pytest.raises(TextEncoderError, match="holds LLaMA, the text encoder of Lumina-T2I.*not Gemma-2"):
        Gemma2TextEncoder.from_gguf(tiny["llama_mha"]["F32"])


def test_a_gpt2_tokenizer_is_not_llama_2s(tmp_path, tiny):
    import gguf

    src = gguf_file.GGUFFile(tiny["llama_mha"]["F32"])
    writer = gguf.GGUFWriter(str(tmp_path / "llama3.gguf"), "llama")
    for key in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "context_length"):
        writer.add_uint32(f"llama.{key}", src.value(f"llama.{key}"))
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    for key in src.keys:
        writer.add_tensor(key, src.get(key).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TextEncoderError, match="'gpt2' tokenizer, not LLaMA-2's SentencePiece"):
        load_text_encoder(tmp_path / "llama3.gguf")


def test_a_truncated_file_is_refused(tiny, tmp_path):
    path = tmp_path / "cut.gguf"
    data = tiny["llama_mha"]["Q8_0"].read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_text_encoder(path)


def test_missing_tensors_are_named(tmp_path, tiny):
    import gguf

    src = gguf_file.GGUFFile(tiny["llama_mha"]["F32"])
    writer = gguf.GGUFWriter(str(tmp_path / "part.gguf"), "llama")
    for key, value in src.metadata().items():
        if key.startswith("llama."):
            writer.add_uint32(key, value) if isinstance(value, int) else writer.add_float32(key, value)
    for key in src.keys:
        if key != "blk.1.ffn_down.weight":
            writer.add_tensor(key, src.get(key).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    copy_tokenizer_files(tiny["llama_mha"]["folder"], tmp_path)
    with pytest.raises(TextEncoderError, match=r"lacks tensors.*layers\.1\.mlp\.down_proj\.weight"):
        load_text_encoder(tmp_path / "part.gguf")


# --------------------------------------------------------------------------------------------------------------
# Nodes (plain Python)


@pytest.fixture()
def text_encoders(tiny, tmp_path):
    """models/text_encoders with a lone LLaMA .gguf, a Gemma-2 GGUF folder (one .gguf and the tokenizer files), a
    folder of two Gemma .gguf files sharing the tokenizer files, a T5 .gguf and a DiT .gguf."""
    root = tmp_path / "text_encoders"
    root.mkdir()
    shutil.copy(tiny["llama_gqa"]["Q8_0"], root / "llama-2-7b.Q8_0.gguf")
    shutil.copytree(tiny["gemma2"]["Q8_0"].parent, root / "gemma-2-2b-gguf")
    both = copy_tokenizer_files(tiny["gemma"]["folder"], root / "gemma-2b-gguf")
    for qtype in ("F32", "Q8_0"):
        shutil.copy(tiny["gemma"][qtype], both)
    write_file(root / "t5.gguf", {"token_embd.weight": (np.zeros((8, 32), np.float32), Q.F32)}, arch="t5")
    write_file(root / "dit.gguf", {"x_embedder.weight": (np.zeros((8, 32), np.float32), Q.F32)}, arch="lumina2")
    model_files.set_model_folders("text_encoders", [root])
    model_files.set_model_folders("checkpoints", [])
    return root


def test_the_text_encoder_loader_lists_gguf_files_and_folders(text_encoders):
    names = N["LuminaTextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder_folder"][0]
    assert names == ["gemma-2-2b-gguf", "gemma-2b-gguf/gemma.F32.gguf", "gemma-2b-gguf/gemma.Q8_0.gguf",
                     "llama-2-7b.Q8_0.gguf"]


def test_the_text_encoder_loader_loads_a_gguf_and_logs_its_types(tiny, text_encoders, caplog):
    with caplog.at_level(logging.INFO, logger="lumina_core"):
        (handle,) = N["LuminaTextEncoderLoader"]().load("llama-2-7b.Q8_0.gguf", "fp32")
    assert isinstance(handle.encoder, LlamaTextEncoder)
    assert any("GGUF llama: Q8_0 x" in r.getMessage() and "F32 x" in r.getMessage() for r in caplog.records)
    (conditioning,) = N["LuminaTextEncode"]().encode(handle, PROMPTS[0])
    features = conditioning[0][0]
    truth, _ = load_text_encoder(tiny["llama_gqa"]["Q8_0 folder"], dtype=torch.float32).encode([PROMPTS[0]])
    assert _relative(features.float(), truth) <= 1e-5

    (gemma2,) = N["LuminaTextEncoderLoader"]().load("gemma-2-2b-gguf", "fp32")
    assert isinstance(gemma2.encoder, Gemma2TextEncoder)
    (gemma,) = N["LuminaTextEncoderLoader"]().load("gemma-2b-gguf/gemma.F32.gguf", "fp32")
    assert isinstance(gemma.encoder, GemmaTextEncoder)
