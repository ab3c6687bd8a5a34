"""Lumina-Image-2.0's text encoder in the nodes (plain Python, no ComfyUI): Lumina Load Text Encoder lists and loads
Gemma-2-2B folders, ComfyUI's single files and all-in-one checkpoints; Lumina Text Encode puts the chosen system
prompt in front and encodes an empty text as the original's negative, "" without system prompt.

Truths: the core encoder (itself checked against the original procedure in test_text_encoder_gemma2.py) and
`reference_gemma2_features`, the original procedure through transformers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lumina_core.text.gemma2 import SYSTEM_PROMPTS, Gemma2TextEncoder
from lumina_core.text.llama import LlamaTextEncoder
from lumina_core.tiny import make_tiny_llama_folder
from nodes import NODE_CLASS_MAPPINGS as N
from nodes import model_files, text_encoder_handle
from nodes.common import FAMILY_KEY, PROMPT_KEY
from tests import helpers_gemma2 as h
from tests.conftest import FP32_U

PROMPT = "a lighthouse at dusk, oil painting"
GEMMA2_FOLDER = "gemma-2-2b"
SINGLE = "gemma_2_2b_fp16.safetensors"
IN_CLIP = "gemma2_in_clip.safetensors"
ALL_IN_ONE = "lumina_2.safetensors"
LLAMA_FOLDER = "Llama-2-7b-hf"
RELEASED_HEADS = {"head_dim": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "query_pre_attn_scalar": 256}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """text_encoders/ and clip/ (the two folders of ComfyUI's text_encoders list) and checkpoints/, with the files a
    user may have, loadable or not."""
    root = tmp_path_factory.mktemp("models")
    te, clip, ckpt = root / "text_encoders", root / "clip", root / "checkpoints"
    spiece = h.tiny_gemma2_spiece_model()
    folder = h.make_tiny_gemma2_folder(te / GEMMA2_FOLDER, **RELEASED_HEADS)
    h.write_comfy_gemma2_single_file(te / SINGLE, folder, spiece)
    h.write_comfy_gemma2_single_file(clip / IN_CLIP, folder, spiece, dtype=torch.float32)
    h.write_comfy_gemma2_single_file(ckpt / ALL_IN_ONE, folder, spiece, all_in_one=True,
                                     dit_state={"cap_embedder.1.weight": torch.zeros(4, 4)})
    llama = make_tiny_llama_folder(te / LLAMA_FOLDER)
    # Not loadable as they are, so not listed: a LLaMA weights file, Gemma-2 weights without their tokenizer,
    # another model's checkpoint, a pickle.
    state = load_file(llama / "model.safetensors")
    save_file(state, te / "llama_single.safetensors")
    save_file({k: v for k, v in load_file(te / SINGLE).items() if k != "spiece_model"}, te / "no_tokenizer.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, ckpt / "sd15.safetensors")
    torch.save({"x": torch.zeros(1)}, ckpt / "other.ckpt")
    saved = dict(model_files._plain_folders)
    model_files.set_model_folders("text_encoders", [te, clip])
    model_files.set_model_folders("checkpoints", [ckpt])
    yield {"root": root, "folder": folder, "single": te / SINGLE, "clip": clip / IN_CLIP,
           "all_in_one": ckpt / ALL_IN_ONE, "llama": llama}
    model_files._plain_folders.clear()
    model_files._plain_folders.update(saved)


@pytest.fixture(scope="module")
def handles(models):
    load = N["LuminaTextEncoderLoader"]().load
    return {name: load(name, "fp32")[0] for name in (GEMMA2_FOLDER, SINGLE, IN_CLIP, ALL_IN_ONE, LLAMA_FOLDER)}


def _encode(handle, text, *args):
    ((features, extras),) = N["LuminaTextEncode"]().encode(handle, text, *args)[0]
    return features, extras


# --- Lumina Load Text Encoder -------------------------------------------------------------------------------------


def test_the_loader_lists_gemma2_folders_single_files_and_all_in_one_files(models):
    names = N["LuminaTextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder_folder"][0]
    assert names == sorted([GEMMA2_FOLDER, SINGLE, IN_CLIP, ALL_IN_ONE, LLAMA_FOLDER])
    assert model_files.text_encoder_folder_path(ALL_IN_ONE) == str(models["all_in_one"])
    assert model_files.text_encoder_folder_path(IN_CLIP) == str(models["clip"])
    with pytest.raises(FileNotFoundError, match="'nowhere.safetensors' not found"):
        model_files.text_encoder_folder_path("nowhere.safetensors")


@pytest.mark.parametrize("name, path", [(GEMMA2_FOLDER, "folder"), (SINGLE, "single"), (IN_CLIP, "clip"),
                                        (ALL_IN_ONE, "all_in_one")])
def test_the_loader_loads_each_as_the_core_does(models, handles, name, path):
    encoder = handles[name].encoder
    assert type(encoder) is Gemma2TextEncoder and encoder.dtype == torch.float32
    core = (Gemma2TextEncoder.from_folder if models[path].is_dir() else Gemma2TextEncoder.from_file)(
        models[path], dtype=torch.float32)
    features, extras = _encode(handles[name], PROMPT)
    want, want_mask = core.encode(PROMPT, "superior")
    assert torch.equal(features, want) and torch.equal(extras["attention_mask"], want_mask)
    assert extras[FAMILY_KEY] == "lumina2" and extras[PROMPT_KEY] == PROMPT


def test_files_that_do_not_load_as_they_are_are_not_offered(models):
    names = N["LuminaTextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder_folder"][0]
    for name in ("llama_single.safetensors", "no_tokenizer.safetensors", "sd15.safetensors", "other.ckpt",
                 f"{GEMMA2_FOLDER}/model.safetensors", f"{LLAMA_FOLDER}/model.safetensors"):
        assert name not in names


# --- Lumina Text Encode -------------------------------------------------------------------------------------------


def test_text_encode_offers_the_presets_as_optional_inputs():
    inputs = N["LuminaTextEncode"].INPUT_TYPES()
    assert list(inputs["required"]) == ["text_encoder", "text"]  # saved workflows and API prompts keep working
    choices, options = inputs["optional"]["system_prompt"]
    assert choices == [*SYSTEM_PROMPTS, "custom"] and options["default"] == "superior"
    assert "ignored for Lumina-T2I and Lumina-Next" in options["tooltip"]
    assert "empty prompt text (the negative) never gets one" in options["tooltip"]
    kind, options = inputs["optional"]["custom_system_prompt"]
    assert kind == "STRING" and options["multiline"] and options["default"] == ""
    assert "custom" in options["tooltip"] and "ignored otherwise" in options["tooltip"]


@pytest.mark.parametrize("preset, original", [("superior", "real"), ("alignment", "align"), ("base", "base"),
                                              ("aesthetics", "aesthetics"), ("4grid", "4grid"), ("empty", None)])
def test_each_preset_is_the_originals_encoding(models, handles, preset, original):
    """Through the fp32 single file (the fp16 one differs from the fp32 folder by its rounding)."""
    features, extras = _encode(handles[IN_CLIP], PROMPT, preset)
    reference, mask = h.reference_gemma2_features(models["folder"], [PROMPT],
                                                  h.SYSTEM_PROMPTS[original] if original else None)
    assert extras["attention_mask"].tolist() == mask.tolist()
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)


def test_the_default_is_superior(handles):
    default, _ = _encode(handles[GEMMA2_FOLDER], PROMPT)
    superior, _ = _encode(handles[GEMMA2_FOLDER], PROMPT, "superior", "ignored unless custom")
    assert torch.equal(default, superior)


def test_custom_system_prompt(handles, models):
    own = "You are an assistant designed to paint in watercolour."
    features, _ = _encode(handles[GEMMA2_FOLDER], PROMPT, "custom", own)
    reference, _ = h.reference_gemma2_features(models["folder"], [PROMPT], own)
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)
    none, _ = _encode(handles[GEMMA2_FOLDER], PROMPT, "custom", "")  # left empty: no system prompt
    assert torch.equal(none, handles[GEMMA2_FOLDER].encoder.encode(PROMPT, "empty")[0])
    with pytest.raises(ValueError, match="Unknown system prompt preset 'watercolour'"):
        _encode(handles[GEMMA2_FOLDER], PROMPT, "custom", "watercolour")


@pytest.mark.parametrize("args", [(), ("base",), ("custom", "You are an assistant that draws cats.")])
def test_an_empty_text_is_the_originals_negative_without_system_prompt(models, handles, args):
    features, extras = _encode(handles[GEMMA2_FOLDER], "", *args)
    assert extras["attention_mask"].tolist() == [[True] + [False] * 7]  # <bos> alone
    reference, _ = h.reference_gemma2_features(models["folder"], [PROMPT], h.DEFAULT_SYSTEM_PROMPT,
                                               negative_prompt="")
    # The reference's joint call has another batch shape: fp32 reductions in another order (as in
    # test_text_encoder_gemma.py, 256 * 2^-24).
    torch.testing.assert_close(features[0, :1], reference[1, :1], rtol=256 * FP32_U, atol=256 * FP32_U)


def test_the_other_families_ignore_the_system_prompt(handles):
    llama = handles[LLAMA_FOLDER]
    assert isinstance(llama.encoder, LlamaTextEncoder) and not text_encoder_handle.takes_system_prompt(llama)
    assert text_encoder_handle.takes_system_prompt(handles[SINGLE])
    plain, _ = _encode(llama, PROMPT)
    for args in (("base",), ("custom", "x"), ("empty", "")):
        assert torch.equal(_encode(llama, PROMPT, *args)[0], plain)
