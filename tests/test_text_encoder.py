"""Tests of lumina_core.text.llama on tiny LLaMA folders (CPU, seeded, no network).

The truths used: transformers' own `LlamaModel.from_pretrained` and normally constructed `LlamaModel`, the folder's
tokenizer called directly, and the layout SPEC §3 gives ([BOS] + tokens + [EOS], right padding with 0).
"""

import json
import logging
import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer, LlamaModel

from lumina_core.text import hf_weights
from lumina_core.text import llama as te
from lumina_core.text.hf_folder import check_cap_feat_dim
from lumina_core.text.hf_weights import TextEncoderError
from lumina_core.text.llama import LlamaTextEncoder
from tests.helpers_llama import (
    llama2_hf_config_json,
    make_tiny_llama_folder,
    make_tiny_tokenizer,
    tiny_llama_config,
)

BOS, EOS = 1, 2
PROMPTS = [
    "",
    "a red cat",
    "a fluffy mouse holding a watermelon in a magical and colorful setting",
    "an old zebra",  # "zebra" is not in the tiny vocabulary: several pieces, one of them <unk>
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The checkpoint layouts the loader must accept, all with the same random weights (seed 0)."""
    root = tmp_path_factory.mktemp("llama")
    return {
        "model": make_tiny_llama_folder(root / "model"),
        "causal_sharded": make_tiny_llama_folder(root / "causal_sharded", causal_lm=True, max_shard_size="20KB"),
        "causal_bin": make_tiny_llama_folder(root / "causal_bin", causal_lm=True, safetensors=False),
    }


@pytest.fixture(scope="module")
def encoder(folders):
    return LlamaTextEncoder.from_folder(folders["model"], dtype=torch.float32)


def reference_features(folder, ids):
    """last_hidden_state of transformers' own loader, fp32, on the same ids."""
    model = LlamaModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state


def copy_folder(src, dst, *, without=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without))
    return dst


# --- 1. token layout --------------------------------------------------------------------------------------------


def test_empty_prompt_is_bos_eos(encoder):
    ids, mask = encoder.tokenize([""])
    assert ids.tolist() == [[BOS, EOS]]
    assert mask.tolist() == [[True, True]]
    features, mask = encoder.encode("")
    assert features.shape == (1, 2, encoder.hidden_size)
    assert mask.tolist() == [[True, True]]


def test_prompt_ids_are_the_tokenizers_own_between_bos_and_eos(encoder, folders):
    folder_tokenizer = AutoTokenizer.from_pretrained(folders["model"])
    for prompt in PROMPTS:
        ids, mask = encoder.tokenize([prompt])
        own = folder_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert ids[0].tolist() == [BOS, *own, EOS], prompt
        assert bool(mask.all())
    # The tokenizer the folder was made from agrees on in-vocabulary text (transformers 5 rebuilds a LlamaTokenizer
    # with byte fallback, which drops out-of-vocabulary characters where the builder's BPE gives <unk>).
    builder_tokenizer = make_tiny_tokenizer()
    for prompt in PROMPTS[:3]:
        own = builder_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert encoder.tokenize(prompt)[0][0].tolist() == [BOS, *own, EOS], prompt
    # The sub-word splitting is exercised: an unknown word becomes several pieces.
    assert encoder.tokenize(["zebra"])[0].shape[1] > 3


def test_tokenize_matches_the_originals_tokenizer_flags(encoder, folders):
    """The original encodes with AutoTokenizer(add_bos_token=True, add_eos_token=True).encode(prompt)."""
    original = AutoTokenizer.from_pretrained(folders["model"], add_bos_token=True, add_eos_token=True)
    for prompt in PROMPTS:
        assert encoder.tokenize(prompt)[0][0].tolist() == original.encode(prompt, truncation=False)


def test_batch_is_right_padded_with_zero_and_mask_marks_real_tokens(encoder):
    ids, mask = encoder.tokenize(PROMPTS)
    lengths = [encoder.tokenize(p)[0].shape[1] for p in PROMPTS]
    assert ids.shape == (len(PROMPTS), max(lengths))
    for row, length in enumerate(lengths):
        assert mask[row].tolist() == [True] * length + [False] * (ids.shape[1] - length)
        assert ids[row, length:].eq(0).all()
        assert ids[row, length - 1] == EOS


# --- 2./3. features ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["model", "causal_sharded", "causal_bin"])
def test_features_equal_transformers_llamamodel(folders, layout):
    encoder = LlamaTextEncoder.from_folder(folders[layout], dtype=torch.float32)
    ids, _ = encoder.tokenize(PROMPTS)
    features, _ = encoder.encode(PROMPTS)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features, reference_features(folders[layout], ids), rtol=0, atol=1e-6)


def test_rotary_buffers_equal_a_normally_built_llamamodel(encoder, folders):
    normal = LlamaModel(tiny_llama_config())
    loaded = dict(encoder.model.named_buffers())
    for name, buffer in normal.named_buffers():
        assert loaded[name].dtype == buffer.dtype == torch.float32, name
        torch.testing.assert_close(loaded[name], buffer, rtol=0, atol=0)


def test_each_prompt_in_a_batch_equals_the_prompt_alone(encoder):
    features, mask = encoder.encode(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        alone, alone_mask = encoder.encode(prompt)
        n = alone.shape[1]
        assert int(mask[row].sum()) == n
        torch.testing.assert_close(features[row, :n], alone[0], rtol=0, atol=1e-6)


def test_single_string_equals_list_of_one(encoder):
    torch.testing.assert_close(encoder.encode("a red cat")[0], encoder.encode(["a red cat"])[0], rtol=0, atol=0)


def test_long_prompt_is_not_truncated_without_max_tokens(encoder, caplog):
    prompt = " ".join(["cat"] * 2000)  # "▁cat" is one token
    with caplog.at_level(logging.INFO, logger=te.__name__):
        features, mask = encoder.encode(prompt)
    assert features.shape == (1, 2002, encoder.hidden_size)
    assert bool(mask.all())
    assert "has 2002 tokens" in caplog.text and "no truncation" in caplog.text


def test_non_ascii_prompt_encodes(encoder):
    ids, mask = encoder.tokenize("café crème, 東京の猫 🐱")
    assert ids[0, 0] == encoder.tokenizer.bos_token_id and ids[0, -1] == encoder.tokenizer.eos_token_id
    features, _ = encoder.encode("café crème, 東京の猫 🐱")
    assert features.shape[1] == ids.shape[1] and torch.isfinite(features).all()


def test_max_tokens_cuts_like_the_originals_training_and_warns(encoder, caplog):
    prompt = " ".join(["cat"] * 20)
    full, _ = encoder.tokenize(prompt)
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        ids, mask = encoder.tokenize(prompt, max_tokens=8)
    assert ids[0].tolist() == full[0, :8].tolist()  # train.py: tokenized_caption[:max_words], EOS cut too
    assert bool(mask.all())
    assert "14 tokens dropped" in caplog.text  # 22 tokens, 8 kept
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=te.__name__):
        ids, _ = encoder.tokenize("a red cat", max_tokens=8)  # fits: nothing dropped, nothing said
    assert ids.shape[1] == 5 and caplog.text == ""


# --- 4./5. what is loaded ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["causal_sharded", "causal_bin"])
def test_causal_lm_weights_load_without_lm_head(folders, layout, monkeypatch):
    # Spy on the one function that materialises a tensor: the LM head, which has the embedding's shape
    # [vocab, hidden], must never be copied out of the file.
    copied = []
    real_copy = hf_weights._copy_as
    monkeypatch.setattr(hf_weights, "_copy_as", lambda t, *a: copied.append(tuple(t.shape)) or real_copy(t, *a))
    encoder = LlamaTextEncoder.from_folder(folders[layout], dtype=torch.float32)
    config = tiny_llama_config()
    assert copied.count((config.vocab_size, config.hidden_size)) == 1  # embed_tokens only
    assert not any("lm_head" in name for name, _ in encoder.model.named_parameters())
    assert not hasattr(encoder.model, "lm_head")
    expected = LlamaModel(config).state_dict()
    assert len(copied) == len(expected)
    loaded_numel = sum(p.numel() for p in encoder.model.parameters())
    assert loaded_numel == sum(t.numel() for t in expected.values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_parameter_has_the_dtype_asked_for(folders, dtype):
    encoder = LlamaTextEncoder.from_folder(folders["causal_sharded"], dtype=dtype)
    assert {p.dtype for p in encoder.model.parameters()} == {dtype}
    assert encoder.dtype == dtype and encoder.device == torch.device("cpu")
    features, _ = encoder.encode("a red cat")
    assert features.dtype == torch.float32  # returned in float32 whatever the compute dtype
    reference = reference_features(folders["causal_sharded"], encoder.tokenize("a red cat")[0])
    torch.testing.assert_close(features, reference, rtol=0, atol=0.1)


def test_llama2_style_config_json_loads(folders, tmp_path):
    """config.json as meta-llama/Llama-2-7b-hf publishes it (transformers 4.31 keys), shrunk."""
    folder = copy_folder(folders["causal_sharded"], tmp_path / "llama2_style")
    config = tiny_llama_config()
    legacy = llama2_hf_config_json(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_hidden_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
    )
    (folder / "config.json").write_text(json.dumps(legacy))
    encoder = LlamaTextEncoder.from_folder(folder, dtype=torch.float32)
    ids, _ = encoder.tokenize(PROMPTS)
    torch.testing.assert_close(encoder.encode(PROMPTS)[0], reference_features(folders["model"], ids), rtol=0, atol=1e-6)


def test_to_moves_the_model_and_encode_follows_it(encoder):
    assert encoder.to("cpu") is encoder and encoder.device == torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to move to")
    cpu_features, _ = encoder.encode(PROMPTS)
    try:
        encoder.to("cuda")
        gpu_features, mask = encoder.encode(PROMPTS)
        assert gpu_features.device.type == "cpu"
        on_gpu, mask_on_gpu = encoder.encode(PROMPTS, output_device="cuda")
        assert on_gpu.device.type == "cuda" and mask_on_gpu.device.type == "cuda"
    finally:
        encoder.to("cpu")
    torch.testing.assert_close(gpu_features, cpu_features, rtol=0, atol=1e-4)


def test_loads_to_the_device_asked_for(folders):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    encoder = LlamaTextEncoder.from_folder(folders["causal_sharded"], dtype=torch.bfloat16, device="cuda")
    assert {t.device.type for t in [*encoder.model.parameters(), *encoder.model.buffers()]} == {"cuda"}


def test_check_cap_feat_dim():
    check_cap_feat_dim(4096, 4096)
    with pytest.raises(ValueError, match=r"2048-dim features.*cap_feat_dim=4096"):
        check_cap_feat_dim(2048, 4096, encoder_name="gemma-2b", dit_name="lumina_t2i.safetensors")


def test_missing_folder(tmp_path):
    with pytest.raises(TextEncoderError, match=r"nowhere does not exist.*Llama-2-7b-hf"):
        LlamaTextEncoder.from_folder(tmp_path / "nowhere")


def test_a_file_instead_of_a_folder(folders):
    with pytest.raises(TextEncoderError, match=r"model.safetensors is a file, not a folder"):
        LlamaTextEncoder.from_folder(os.path.join(folders["model"], "model.safetensors"))


def test_missing_config(folders, tmp_path):
    folder = copy_folder(folders["model"], tmp_path / "no_config", without=["config.json"])
    with pytest.raises(TextEncoderError, match=r"No config.json in .*no_config"):
        LlamaTextEncoder.from_folder(folder)
    (folder / "params.json").write_text("{}")  # Meta's original release has params.json instead
    with pytest.raises(TextEncoderError, match=r"No config.json .*Meta's original LLaMA release"):
        LlamaTextEncoder.from_folder(folder)


def test_missing_tokenizer(folders, tmp_path):
    folder = copy_folder(folders["model"], tmp_path / "no_tok", without=["tokenizer*"])
    with pytest.raises(TextEncoderError, match=r"No tokenizer in .*no_tok.*tokenizer.json"):
        LlamaTextEncoder.from_folder(folder)


def test_missing_weights(folders, tmp_path):
    folder = copy_folder(folders["model"], tmp_path / "no_weights", without=["*.safetensors"])
    with pytest.raises(TextEncoderError, match=r"No weights in .*no_weights"):
        LlamaTextEncoder.from_folder(folder)


def test_missing_shard_named_in_index(folders, tmp_path):
    folder = copy_folder(folders["causal_sharded"], tmp_path / "lost_shard", without=["model-00002-of-*"])
    with pytest.raises(TextEncoderError, match=r"missing .*model-00002-of-"):
        LlamaTextEncoder.from_folder(folder)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, r"'gemma'.*Gemma belongs to Lumina-Next"),
        ({"model_type": "gemma2"}, r"Gemma belongs to Lumina-Next / Lumina-Image-2.0, not Lumina-T2I"),
        ({"model_type": "t5", "architectures": ["T5EncoderModel"]}, r"'t5'.*T5 .*SD3/Flux.*needs LLaMA-2-7B"),
        ({"model_type": "umt5"}, r"T5 .*needs LLaMA-2-7B"),
        ({"model_type": "clip_text_model"}, r"CLIP"),
        ({"model_type": "mistral"}, r"not LLaMA \(model_type 'mistral'"),
    ],
)
def test_not_a_llama_model(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TextEncoderError, match=message):
        LlamaTextEncoder.from_folder(tmp_path)


def test_truncated_safetensors(folders, tmp_path):
    folder = copy_folder(folders["model"], tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TextEncoderError, match=r"model[.]safetensors is truncated: .* Download it again"):
        LlamaTextEncoder.from_folder(folder)


@pytest.mark.parametrize("layout, name", [("model", "model.safetensors"), ("causal_bin", "pytorch_model.bin")])
def test_empty_weights_file(folders, tmp_path, layout, name):
    folder = copy_folder(folders[layout], tmp_path / "empty")
    (folder / name).write_bytes(b"")
    with pytest.raises(TextEncoderError, match=rf"{name.replace('.', '[.]')}: it is empty \(0 bytes\)"):
        LlamaTextEncoder.from_folder(folder)


def test_truncated_bin(folders, tmp_path):
    folder = copy_folder(folders["causal_bin"], tmp_path / "truncated_bin")
    weights = folder / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TextEncoderError, match=r"pytorch_model.bin: it is not a zip-format torch checkpoint"):
        LlamaTextEncoder.from_folder(folder)


def test_git_lfs_pointer_instead_of_weights(folders, tmp_path):
    folder = copy_folder(folders["model"], tmp_path / "lfs")
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(TextEncoderError, match=r"Git LFS pointer.*git lfs pull"):
        LlamaTextEncoder.from_folder(folder)


class _WritesMarker:
    """Pickles to a call of open(marker, "w"): unpickling it without weights_only creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_run(folders, tmp_path):
    # The payload is real: loading a twin of the file the unsafe way does create its marker.
    twin_marker = tmp_path / "twin_ran"
    torch.save({"embed_tokens.weight": _WritesMarker(twin_marker)}, tmp_path / "twin.bin")
    torch.load(tmp_path / "twin.bin", weights_only=False)
    assert twin_marker.exists()

    folder = copy_folder(folders["causal_bin"], tmp_path / "evil")
    marker = tmp_path / "payload_ran"
    torch.save({"embed_tokens.weight": _WritesMarker(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(
        TextEncoderError,
        match=r"pytorch_model.bin: it was refused because unpickling it needs "
        r"arbitrary code .*nothing in it was executed",
    ):
        LlamaTextEncoder.from_folder(folder)
    assert not marker.exists()


def _set_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_a_tensor_stored_twice(folders, tmp_path):
    folder = copy_folder(folders["model"], tmp_path / "twice")
    shutil.copy(folder / "model.safetensors", folder / "model-old.safetensors")
    with pytest.raises(TextEncoderError, match=r"stored twice, in .*model-old.safetensors and .*model.safetensors"):
        LlamaTextEncoder.from_folder(folder)


def test_missing_keys_are_named(folders, tmp_path):
    folder = copy_folder(folders["causal_sharded"], tmp_path / "more_layers")
    _set_config(folder, num_hidden_layers=3)
    with pytest.raises(TextEncoderError, match=r"more_layers do not match .* \d+ missing keys \['layers\.2\."):
        LlamaTextEncoder.from_folder(folder)


def test_unexpected_keys_are_named(folders, tmp_path):
    folder = copy_folder(folders["causal_sharded"], tmp_path / "fewer_layers")
    _set_config(folder, num_hidden_layers=1)
    with pytest.raises(
        TextEncoderError,
        match=r"0 missing keys \[\], \d+ unexpected keys \['model\.layers\.1\..*"
        r"model-0000\d-of-0000\d\.safetensors",
    ):
        LlamaTextEncoder.from_folder(folder)


def test_wrong_shapes_are_named(folders, tmp_path):
    folder = copy_folder(folders["model"], tmp_path / "wider_mlp")
    _set_config(folder, intermediate_size=96)
    with pytest.raises(TextEncoderError, match=r"other shapes .*mlp\.\w+_proj\.weight: \[(64, 32|32, 64)\]"):
        LlamaTextEncoder.from_folder(folder)


def test_prompts_must_not_be_empty(encoder):
    with pytest.raises(ValueError, match="No prompts"):
        encoder.encode([])
    with pytest.raises(ValueError, match="max_tokens must be at least 2"):
        encoder.tokenize("a", max_tokens=1)
