"""Tests of lumina_core.text.gemma2 (Lumina-Image-2.0's Gemma-2-2B encoder) on tiny Gemma-2 models (CPU, seeded, no
network), in the four layouts a user may pick.

The truth is `reference_gemma2_features` (tests/helpers_gemma2.py): transformers' own AutoTokenizer and Gemma2Model
(eager attention, so with soft-capping) run through the original Lumina-Image-2.0 procedure, on the Hugging Face
folder the ComfyUI files were written from. The system prompt texts are checked against the helper's copy of the
original's strings, and the single-file configuration against google/gemma-2-2b's published config.json.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

import lumina_core
from lumina_core import families
from lumina_core.text import gemma2 as teg2
from lumina_core.text import hf_weights as te
from lumina_core.text.gemma import GemmaTextEncoder
from lumina_core.text.gemma2 import (
    GEMMA_2_2B_CONFIG,
    SYSTEM_PROMPTS,
    Gemma2TextEncoder,
    gemma2_config_from_shapes,
    prompt_texts,
    system_prompt_text,
)
from lumina_core.text.hf_weights import TextEncoderError
from lumina_core.text.spiece import SentencePieceTokenizer
from lumina_core.tiny import make_tiny_gemma_folder, make_tiny_llama_folder
from lumina_core.weights.fp8 import linear_weight_names
from tests import helpers_gemma2 as h
from tests.conftest import FP32_U
from tests.helpers_gemma2 import (
    make_tiny_gemma2_folder,
    reference_gemma2_features,
    tiny_gemma2_config_json,
    tiny_gemma2_spiece_model,
    write_comfy_gemma2_single_file,
)

PAD, EOS, BOS = 0, 1, 2
PROMPTS = [
    "a red cat",
    "A charcoal sketch of Istanbul with the iconic Hagia Sophia Mosque, bright houses, trees and flowers.",
    "an old zebra, 東京 🐱",  # pieces outside the tiny vocabulary: byte fallback
]
# The released head layout (head_dim 256 = query_pre_attn_scalar), which a single file's configuration assumes.
RELEASED_HEADS = {"head_dim": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "query_pre_attn_scalar": 256}


def _shard(src, dst):
    """A copy of an HF folder with its weights in two shards and model.safetensors.index.json, as published."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(src / "model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:]), start=1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, dst / name)
        weight_map.update(dict.fromkeys(part, name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Every layout, each with the folder whose reference features it must give.

    Folders: query_pre_attn_scalar 24 != head_dim 16 (a model scaling by head_dim fails) and a sliding window of 4
    (the sliding layers are exercised). ComfyUI's files carry no config, so they are written from a model with the
    released head layout and window, in fp32 for an exact comparison.
    """
    root = tmp_path_factory.mktemp("gemma2")
    hf = make_tiny_gemma2_folder(root / "hf", sliding_window=4)
    diffusers = make_tiny_gemma2_folder(root / "pipeline", layout="diffusers", sliding_window=4)
    prefixed = root / "pipeline_prefixed"
    shutil.copytree(root / "pipeline", prefixed)
    state = load_file(prefixed / "text_encoder" / "model.safetensors")
    save_file({"model." + k: v for k, v in state.items()}, prefixed / "text_encoder" / "model.safetensors")
    released = make_tiny_gemma2_folder(root / "released", **RELEASED_HEADS)
    spiece = tiny_gemma2_spiece_model()
    dit, vae = {"cap_embedder.1.weight": torch.zeros(4, 4)}, {"decoder.conv_in.weight": torch.zeros(2, 2)}
    return {
        "hf": (hf, hf),
        "hf_sharded": (_shard(hf, root / "hf_sharded"), hf),
        "diffusers": (diffusers, diffusers),
        "diffusers_prefixed": (prefixed / "text_encoder", diffusers),
        "comfy_single": (write_comfy_gemma2_single_file(root / "gemma_2_2b.safetensors", released, spiece,
                                                        dtype=torch.float32), released),
        "comfy_all_in_one": (write_comfy_gemma2_single_file(root / "lumina_2.safetensors", released, spiece,
                                                            all_in_one=True, dit_state=dit, vae_state=vae,
                                                            dtype=torch.float32), released),
    }


def _load(path):
    load = Gemma2TextEncoder.from_file if path.is_file() else Gemma2TextEncoder.from_folder
    return load(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def encoders(layouts):
    return {name: _load(path) for name, (path, _) in layouts.items()}


@pytest.fixture(scope="module")
def encoder(encoders):
    return encoders["hf"]


# --- features equal the original procedure, in every layout --------------------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "hf_sharded", "diffusers", "diffusers_prefixed", "comfy_single",
                                    "comfy_all_in_one"])
@pytest.mark.parametrize("system", ["base", "real", None], ids=["base", "real", "empty"])
def test_features_equal_the_original_procedure(layouts, encoders, layout, system):
    """The original's joint [prompts..., ""] call; "empty" (no system prompt) is the reference's None."""
    _, reference_folder = layouts[layout]
    features, mask = encoders[layout].encode(PROMPTS, system or "empty", negative_prompt="")
    reference, reference_mask = reference_gemma2_features(
        reference_folder, PROMPTS, h.SYSTEM_PROMPTS[system] if system else None, negative_prompt=""
    )
    assert features.dtype == torch.float32 and features.device.type == "cpu" and mask.dtype == torch.bool
    assert mask.tolist() == reference_mask.tolist()
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)


def test_soft_capping_and_the_sliding_window_matter_here(encoder, layouts):
    """The reference differs clearly from the same weights without attention soft-capping or without the sliding
    window, so matching it (above) means both are applied; the model runs transformers' eager attention."""
    assert encoder.model.config._attn_implementation == "eager"
    folder = layouts["hf"][0]
    ids, mask = encoder.tokenize(prompt_texts(PROMPTS))
    reference, _ = reference_gemma2_features(folder, PROMPTS, h.DEFAULT_SYSTEM_PROMPT)
    for change in ({"attn_logit_softcapping": None}, {"sliding_window": 4096}):
        raw = {k: v for k, v in tiny_gemma2_config_json(sliding_window=4).items() if k != "architectures"}
        model = Gemma2Model(Gemma2Config(**{**raw, **change}, attn_implementation="eager")).eval()
        model.load_state_dict(encoder.model.state_dict())
        with torch.no_grad():
            other = model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[-2]
        assert (other - reference).abs().max() > 1e-2, change


def test_features_are_the_second_to_last_layers_output(encoder):
    captured = {}
    handle = encoder.model.layers[-2].register_forward_hook(lambda m, a, out: captured.update(out=out))
    try:
        features, _ = encoder.encode(PROMPTS)
    finally:
        handle.remove()
    out = captured["out"][0] if isinstance(captured["out"], tuple) else captured["out"]
    torch.testing.assert_close(features, out, rtol=0, atol=0)


def test_one_prompt_at_a_time_equals_the_joint_call_on_real_tokens(encoder):
    joint, joint_mask = encoder.encode(PROMPTS, negative_prompt="")
    for row, text in enumerate([*PROMPTS, None]):
        alone, alone_mask = encoder.encode("", "empty") if text is None else encoder.encode(text)
        n = int(alone_mask.sum())
        assert int(joint_mask[row].sum()) == n
        # Only the batch shape differs: fp32 reductions in another order (256 * 2^-24, as for Lumina-Next's Gemma).
        torch.testing.assert_close(alone[0, :n], joint[row, :n], rtol=256 * FP32_U, atol=256 * FP32_U)


# --- system prompts -----------------------------------------------------------------------------------------------


def test_presets_are_the_originals_texts_under_both_names():
    original = h.SYSTEM_PROMPTS  # sample.py's strings, under sample.py's names
    assert list(SYSTEM_PROMPTS) == ["superior", "alignment", "base", "aesthetics", "4grid", "empty"]
    for ours, theirs in [("superior", "real"), ("alignment", "align"), ("base", "base"),
                         ("aesthetics", "aesthetics"), ("4grid", "4grid")]:
        assert SYSTEM_PROMPTS[ours] == original[theirs]
        assert system_prompt_text(ours) == system_prompt_text(theirs) == system_prompt_text(ours.upper()) == \
            original[theirs]
    assert system_prompt_text(None) == original["real"] == h.DEFAULT_SYSTEM_PROMPT
    assert SYSTEM_PROMPTS["empty"] == system_prompt_text("empty") == system_prompt_text("") == ""


def test_prompt_texts_put_the_tag_between_system_prompt_and_prompt():
    assert prompt_texts("a cat", "base") == [h.SYSTEM_PROMPTS["base"] + " <Prompt Start> a cat"]
    assert prompt_texts(["a cat", "a dog"]) == h.lumina2_prompts(["a cat", "a dog"], h.DEFAULT_SYSTEM_PROMPT)
    assert prompt_texts("a cat", "empty") == prompt_texts("a cat", "") == ["a cat"]  # no tag at all
    # The negative: "" alone whatever the system prompt (sample.py), a non-empty one with it (demo.py).
    assert prompt_texts("a cat", "base", negative_prompt="")[1] == ""
    assert prompt_texts("a cat", "base", negative_prompt="blurry")[1] == h.SYSTEM_PROMPTS["base"] + \
        " <Prompt Start> blurry"


def test_free_text_system_prompt(encoder, layouts):
    own = "You are an assistant that draws only in watercolour."
    assert system_prompt_text(own) == own
    features, mask = encoder.encode(PROMPTS[:2], own)
    reference, reference_mask = reference_gemma2_features(layouts["hf"][0], PROMPTS[:2], own)
    assert mask.tolist() == reference_mask.tolist()
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("typo", ["superiour", "aesthetic", "realistic"])
def test_a_single_word_that_is_no_preset_is_refused(encoder, typo):
    with pytest.raises(ValueError, match=rf"Unknown system prompt preset '{typo}': the presets are superior, "
                                         r"alignment, base, aesthetics, 4grid, empty, real, align"):
        encoder.encode("a cat", typo)


def test_the_default_system_prompt_is_superior(encoder):
    torch.testing.assert_close(encoder.encode("a cat")[0], encoder.encode("a cat", "real")[0], rtol=0, atol=0)
    base, superior = encoder.encode("a cat", "base")[0], encoder.encode("a cat")[0]
    assert base.shape != superior.shape or not torch.equal(base, superior)


def test_the_negative_is_bos_alone(encoder, layouts):
    ids, mask = encoder.tokenize(prompt_texts("", "empty"))
    assert ids.tolist() == [[BOS] + [PAD] * 7] and mask.tolist() == [[True] + [False] * 7]
    features, _ = encoder.encode("", "empty")
    reference, _ = reference_gemma2_features(layouts["hf"][0], ["a cat"], h.DEFAULT_SYSTEM_PROMPT, negative_prompt="")
    torch.testing.assert_close(features[0, :1], reference[1, :1], rtol=256 * FP32_U, atol=256 * FP32_U)  # batch shape


# --- tokens -------------------------------------------------------------------------------------------------------


def test_tokens_are_the_original_tokenizer_calls(encoder, layouts):
    texts = prompt_texts(PROMPTS, "alignment", negative_prompt="")
    tokenizer = AutoTokenizer.from_pretrained(layouts["hf"][0])
    tokenizer.padding_side = "right"
    want = tokenizer(texts, padding=True, pad_to_multiple_of=8, max_length=256, truncation=True)
    ids, mask = encoder.tokenize(texts)
    assert ids.tolist() == want["input_ids"] and mask.long().tolist() == want["attention_mask"]
    assert ids.shape[1] % 8 == 0 and not ids.eq(EOS).any() and ids[:, 0].eq(BOS).all()


def test_truncated_at_256_tokens_like_the_original(encoder, encoders, layouts, caplog):
    long_prompt = " ".join(["cat"] * 300)
    for name in ("hf", "comfy_single"):
        with caplog.at_level(logging.WARNING):
            features, mask = encoders[name].encode([long_prompt, "a dog"])
        assert features.shape[:2] == mask.shape == (2, 256) and bool(mask[0].all())
        assert "Lumina-Image-2.0 reads at most 256" in caplog.text
        reference, reference_mask = reference_gemma2_features(layouts[name][1], [long_prompt, "a dog"],
                                                              h.DEFAULT_SYSTEM_PROMPT)
        assert mask.tolist() == reference_mask.tolist()
        torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)
        caplog.clear()


_TEXTS = [
    "", "a photo of a cat", " leading space", "two  spaces\tand a tab\n\nnew lines", "ünïcödé 東京 🐱 ☕",
    "1024x1024 2x2 grids!", "<bos>a<eos> <pad><unk>", "<start_of_turn>user hi<end_of_turn>", "<mask> x",
    "a<bos", "<0x41>", "▁x ▁▁", h.SYSTEM_PROMPTS["4grid"] + h.PROMPT_START + "a cat",
]


def test_file_tokenizer_gives_the_folder_tokenizers_ids(layouts):
    """sentencepiece on the `spiece_model` bytes, with the special pieces matched as transformers does, against the
    Hugging Face folder's tokenizer.json on the same vocabulary, for fixed and random texts."""
    ours = SentencePieceTokenizer(tiny_gemma2_spiece_model(), origin="test")
    folder = AutoTokenizer.from_pretrained(layouts["hf"][0])
    generator = torch.Generator().manual_seed(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABC.,!?0123456789\t\n東京🐱é") + ["<bos>", "<eos>", "<mask>", "  "]
    randoms = ["".join(alphabet[i] for i in torch.randint(len(alphabet), (int(n),), generator=generator))
               for n in torch.randint(1, 40, (200,), generator=generator)]
    for text in _TEXTS + randoms:
        assert ours(text)["input_ids"] == folder(text, add_special_tokens=False)["input_ids"], repr(text)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (BOS, EOS, PAD) and len(ours) == len(folder)
    # ComfyUI's own reading of the bytes (sentencepiece, <bos> added) agrees on ordinary text.
    plain = [t for t in _TEXTS if "<" not in t]
    assert h.spiece_encode(tiny_gemma2_spiece_model(), plain) == [[BOS, *ours.encode(t)] for t in plain]


def test_sentencepiece_missing_is_named_with_the_fix(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sentencepiece", None)
    with pytest.raises(TextEncoderError, match="needs the sentencepiece package .*pip install sentencepiece"):
        SentencePieceTokenizer(tiny_gemma2_spiece_model(), origin="spiece_model of x.safetensors")


# --- ComfyUI's files ----------------------------------------------------------------------------------------------


def test_single_file_configuration_is_the_released_gemma_2_2b():
    """From the shapes of the real gemma_2_2b file, the configuration transformers builds from google/gemma-2-2b's
    config.json (as published: the helper writes exactly its keys)."""
    shapes = {"embed_tokens.weight": (256000, 2304), "layers.0.self_attn.q_proj.weight": (2048, 2304),
              "layers.0.self_attn.k_proj.weight": (1024, 2304), "layers.0.mlp.gate_proj.weight": (9216, 2304)}
    shapes.update({f"layers.{i}.input_layernorm.weight": (2304,) for i in range(26)})
    ours = gemma2_config_from_shapes(shapes, "gemma_2_2b_fp16.safetensors")
    published = tiny_gemma2_config_json(2304, 26, 256000, intermediate_size=9216, num_attention_heads=8,
                                        num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256)
    assert {k: v for k, v in GEMMA_2_2B_CONFIG.items() if k != "transformers_version"} == \
        {k: v for k, v in published.items() if k != "transformers_version"}
    released = Gemma2Config.from_dict(published)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "attn_logit_softcapping",
                  "final_logit_softcapping", "sliding_window", "layer_types", "rms_norm_eps", "hidden_activation",
                  "max_position_embeddings", "rope_parameters", "attention_bias", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(ours, field) == getattr(released, field), field
    assert ours.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert ours._attn_implementation == "eager"


def test_fp16_single_file_is_read_as_stored(layouts, tmp_path):
    """ComfyUI's file is fp16: each weight loads as its fp16 value, in the dtype asked for."""
    path = write_comfy_gemma2_single_file(tmp_path / "fp16.safetensors", layouts["comfy_single"][1],
                                          tiny_gemma2_spiece_model())
    stored = load_file(path)
    for dtype in (torch.float32, torch.bfloat16):
        encoder = Gemma2TextEncoder.from_file(path, dtype=dtype)
        assert {p.dtype for p in encoder.model.parameters()} == {dtype}
        for name, param in encoder.model.state_dict().items():
            if not name.endswith(("inv_freq", "embed_scale")):
                torch.testing.assert_close(param, stored["model." + name].to(dtype), rtol=0, atol=0)


def test_each_tensor_is_read_once_and_nothing_else(layouts, monkeypatch):
    """From the all-in-one file: every Gemma2Model tensor once, the DiT, the VAE and nothing else never."""
    copied = []
    real_copy = te._copy_as
    monkeypatch.setattr(te, "_copy_as", lambda t, *a: copied.append(tuple(t.shape)) or real_copy(t, *a))
    encoder = Gemma2TextEncoder.from_file(layouts["comfy_all_in_one"][0], dtype=torch.bfloat16)
    assert sorted(copied) == sorted(tuple(t.shape) for t in encoder.model.state_dict().values()
                                    if t.dtype == torch.bfloat16)
    assert (4, 4) not in copied and (2, 2) not in copied


def test_a_truncated_single_file_is_refused(layouts, tmp_path):
    path = tmp_path / "gemma_2_2b_fp16.safetensors"
    data = layouts["comfy_single"][0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TextEncoderError, match=r"gemma_2_2b_fp16.safetensors is truncated: .*Download it again"):
        Gemma2TextEncoder.from_file(path)
    with pytest.raises(families.TextEncoderFolderError, match=r"is truncated"):
        families.text_encoder_family(path)


def test_a_file_without_tokenizer_is_refused(layouts, tmp_path):
    path = tmp_path / "model.safetensors"
    state = load_file(layouts["comfy_single"][0])
    save_file({k: v for k, v in state.items() if k != "spiece_model"}, path)
    with pytest.raises(TextEncoderError, match=r"Gemma-2 weights but no tokenizer \('spiece_model'\).*folder"):
        Gemma2TextEncoder.from_file(path)
    with pytest.raises(families.TextEncoderFolderError, match=r"Gemma-2-2B weights .*no tokenizer"):
        families.text_encoder_family(path)


def test_a_broken_tokenizer_in_the_file_is_refused(layouts, tmp_path):
    path = tmp_path / "broken.safetensors"
    state = load_file(layouts["comfy_single"][0])
    state["spiece_model"] = torch.arange(50, dtype=torch.uint8)
    save_file(state, path)
    with pytest.raises(TextEncoderError, match=r"'spiece_model' of .*broken.safetensors is not a SentencePiece model"):
        Gemma2TextEncoder.from_file(path)


def test_missing_weights_in_the_file_are_named(layouts, tmp_path):
    path = tmp_path / "partial.safetensors"
    state = load_file(layouts["comfy_single"][0])
    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, path)
    with pytest.raises(TextEncoderError, match=r"3 missing keys \['model.layers.1.mlp.*Download the file again"):
        Gemma2TextEncoder.from_file(path)


def _llama_like_file(folder, path):
    state = load_file(folder / "model.safetensors")
    state["spiece_model"] = torch.zeros(3, dtype=torch.uint8)
    save_file(state, path)
    return path


def test_llama_and_gemma_single_files_are_refused_naming_their_folder(tmp_path):
    llama = _llama_like_file(make_tiny_llama_folder(tmp_path / "llama"), tmp_path / "llama.safetensors")
    with pytest.raises(TextEncoderError, match=r"holds a 'llama' model.*Lumina-T2I.*from its Hugging Face folder"):
        Gemma2TextEncoder.from_file(llama)
    with pytest.raises(families.TextEncoderFolderError,
                       match=r"LLaMA-2-7B \(Lumina-T2I's text encoder\) as a single file.*meta-llama/Llama-2-7b-hf"):
        families.load_text_encoder(llama)
    # A Gemma-1 has LLaMA's key names; its 256,000-token vocabulary tells it apart (the tiny one is widened).
    gemma_folder = make_tiny_gemma_folder(tmp_path / "gemma")
    state = load_file(gemma_folder / "model.safetensors")
    state["model.embed_tokens.weight"] = torch.zeros(256000, 2)
    save_file(state, tmp_path / "gemma.safetensors")
    with pytest.raises(TextEncoderError, match=r"holds a 'gemma' model.*Lumina-Next.*from its Hugging Face folder"):
        Gemma2TextEncoder.from_file(tmp_path / "gemma.safetensors")
    with pytest.raises(families.TextEncoderFolderError, match=r"Gemma-2B \(Lumina-Next's .*google/gemma-2b"):
        families.text_encoder_family(tmp_path / "gemma.safetensors")
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(TextEncoderError, match=r"holds no Gemma-2 \(first keys: foo.weight\)"):
        Gemma2TextEncoder.from_file(tmp_path / "other.safetensors")
    with pytest.raises(families.TextEncoderFolderError, match=r"no known text encoder"):
        families.text_encoder_family(tmp_path / "other.safetensors")


def test_a_file_given_as_a_folder_is_sent_to_from_file(layouts):
    with pytest.raises(TextEncoderError, match=r"is a file, not a folder: .*Gemma2TextEncoder.from_file"):
        Gemma2TextEncoder.from_folder(layouts["comfy_single"][0])


def test_only_safetensors_files_are_read(tmp_path):
    torch.save({"model.layers.0.post_feedforward_layernorm.weight": torch.zeros(2)}, tmp_path / "gemma2.pth")
    with pytest.raises(TextEncoderError, match=r"gemma2.pth is not a .safetensors file"):
        Gemma2TextEncoder.from_file(tmp_path / "gemma2.pth")


# --- folders, and which class loads what --------------------------------------------------------------------------


def test_a_gemma_1_folder_is_refused_naming_the_gemma_encoder(tmp_path):
    folder = make_tiny_gemma_folder(tmp_path / "gemma")
    with pytest.raises(TextEncoderError, match=r"not Gemma-2-2B \(model_type 'gemma'.*Lumina-Next: load it with "
                                               r"GemmaTextEncoder.*google/gemma-2-2b"):
        Gemma2TextEncoder.from_folder(folder)


def test_the_gemma_encoder_refuses_a_gemma_2_folder_naming_this_one(layouts):
    with pytest.raises(TextEncoderError, match=r"'gemma2'.*Lumina-Image-2.0 .*Gemma2TextEncoder"):
        GemmaTextEncoder.from_folder(layouts["hf"][0])


def test_the_root_of_a_pipeline_is_refused_naming_its_text_encoder_folder(layouts):
    root = layouts["diffusers"][0].parent
    with pytest.raises(TextEncoderError, match=r"root of a diffusers pipeline; select .*text_encoder"):
        Gemma2TextEncoder.from_folder(root)


@pytest.mark.parametrize("layout", ["hf", "hf_sharded", "diffusers", "diffusers_prefixed", "comfy_single",
                                    "comfy_all_in_one"])
def test_load_text_encoder_picks_the_gemma2_class_for_every_layout(layouts, layout):
    path = layouts[layout][0]
    assert families.text_encoder_family(path) is families.LUMINA_2
    assert families.is_text_encoder_folder(path)
    encoder = families.load_text_encoder(path, dtype=torch.float32)
    assert type(encoder) is Gemma2TextEncoder and encoder.family == "lumina2"
    assert encoder.hidden_size == 32 and encoder.dtype == torch.float32 and encoder.device.type == "cpu"


def test_the_other_families_still_load_from_their_folders(tmp_path):
    gemma = make_tiny_gemma_folder(tmp_path / "gemma")
    assert type(families.load_text_encoder(gemma, dtype=torch.float32)) is GemmaTextEncoder
    assert families.text_encoder_family(make_tiny_llama_folder(tmp_path / "llama")) is families.LUMINA_T2I


def test_fp8_storage_from_a_single_file_equals_the_rounded_fp32_encoder(tmp_path, cpu_compute):
    """Linear weights in fp8, the rest in the compute dtype (bf16, or fp32 on a CPU without it): against the fp32
    encoder holding the same rounded weights, the difference is the compute dtype's rounding only (the bound of
    test_fp8_next: bf16's 2^-8 per layer plus two; measured 0.008 against 0.0195, and 0 in fp32), while the fp8
    rounding itself costs 0.072. Ordinary attention logits here:
    the soft-capping models' logits of about 50 turn bf16's rounding of q and k into logit errors of 0.4."""
    from tests.test_fp8_next import FP8, _relative, _rounded_like, _tolerance

    folder = make_tiny_gemma2_folder(tmp_path / "plain", attn_logit_gain=1.0, **RELEASED_HEADS)
    path = write_comfy_gemma2_single_file(tmp_path / "plain.safetensors", folder, tiny_gemma2_spiece_model(),
                                          dtype=torch.float32)
    fp8 = Gemma2TextEncoder.from_file(path, dtype=FP8)
    reference = Gemma2TextEncoder.from_file(path, dtype=torch.float32)
    plain = Gemma2TextEncoder.from_file(path, dtype=torch.float32)
    linear = linear_weight_names(fp8.model)
    assert fp8.dtype == cpu_compute and linear
    assert all(v.dtype == (FP8 if k in linear else cpu_compute) for k, v in fp8.model.state_dict().items()
               if not k.endswith(("inv_freq", "embed_scale")))
    _rounded_like(reference.model, linear, cpu_compute)
    features, mask = fp8.encode(PROMPTS, negative_prompt="")
    expected, expected_mask = reference.encode(PROMPTS, negative_prompt="")
    assert torch.equal(mask, expected_mask) and torch.isfinite(features).all()
    error = _relative(features[mask], expected[mask])
    assert error < _tolerance(cpu_compute, reference.model.config.num_hidden_layers)
    assert _relative(features[mask], plain.encode(PROMPTS, negative_prompt="")[0][mask]) > 2 * error


def test_public_names():
    assert lumina_core.Gemma2TextEncoder is Gemma2TextEncoder and lumina_core.SYSTEM_PROMPTS is SYSTEM_PROMPTS
    assert teg2.GEMMA_2_2B == "google/gemma-2-2b"
