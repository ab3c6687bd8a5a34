"""Tests of lumina_core.text.gemma on tiny Gemma folders (CPU, seeded, no network).

The truths used: the original Lumina-Next procedure run with transformers' own classes (AutoTokenizer called as
`lumina_next_t2i/sample.py` calls it, AutoModel with output_hidden_states and [-2]), a forward hook on the
second-to-last decoder layer, a normally constructed GemmaModel, and the token layout SPEC §8 gives ([BOS] +
tokens, no EOS, right padding with <pad> to a multiple of 8, at most 256 ids).
"""

import json
import logging
import os
import shutil

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, GemmaConfig, GemmaModel

from lumina_core.text import gemma as teg
from lumina_core.text import hf_weights as te
from lumina_core.text.gemma import GemmaTextEncoder, is_gemma_folder
from lumina_core.text.hf_weights import TextEncoderError
from lumina_core.text.llama import LlamaTextEncoder
from lumina_core.tiny import make_tiny_gemma_folder, make_tiny_llama_folder, tiny_gemma_config_json
from tests.conftest import FP32_U

PAD, EOS, BOS = 0, 1, 2  # google/gemma-2b's ids
PROMPTS = [
    "a red cat",
    "",
    "a fluffy mouse holding a watermelon in a magical and colorful setting",
    "an old zebra",  # "zebra" is not in the tiny vocabulary: several pieces, one of them <unk>
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The layouts the loader must accept, all with the same random weights (seed 0)."""
    root = tmp_path_factory.mktemp("gemma")
    return {
        "single": make_tiny_gemma_folder(root / "single"),
        "sharded": make_tiny_gemma_folder(root / "sharded", max_shard_size="20KB"),
        "bin": make_tiny_gemma_folder(root / "bin", safetensors=False),
    }


@pytest.fixture(scope="module")
def encoder(folders):
    return GemmaTextEncoder.from_folder(folders["single"], dtype=torch.float32)


def original_tokenize(folder, prompts):
    """The tokenizer call of lumina_next_t2i/sample.py `encode_prompt`, on the folder's own tokenizer files."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "right"
    return tokenizer(prompts, padding=True, pad_to_multiple_of=8, max_length=256, truncation=True, return_tensors="pt")


def original_encode(folder, prompts):
    """Features and mask exactly as the original computes them, with transformers' own loader (fp32)."""
    inputs = original_tokenize(folder, prompts)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(model) is GemmaModel
    with torch.no_grad():
        out = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, output_hidden_states=True)
    return out.hidden_states[-2], inputs.attention_mask


def copy_folder(src, dst, *, without=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without))
    return dst


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# --- the reference itself follows SPEC §8 ------------------------------------------------------------------------


def test_the_reference_procedure_adds_bos_no_eos_and_pads_right(folders):
    inputs = original_tokenize(folders["single"], ["a red cat", ""])
    ids, mask = inputs.input_ids, inputs.attention_mask.bool()
    assert ids.shape == (2, 8)
    assert ids[:, 0].tolist() == [BOS, BOS]
    assert not (ids == EOS).any()
    assert mask[1].tolist() == [True] + [False] * 7 and ids[1, 1:].eq(PAD).all()


# --- features -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
@pytest.mark.parametrize("prompts", [["a red cat", ""], PROMPTS], ids=["prompt_and_negative", "batch"])
def test_features_equal_the_original_procedure(folders, layout, prompts):
    encoder = GemmaTextEncoder.from_folder(folders[layout], dtype=torch.float32)
    features, mask = encoder.encode(prompts)
    reference, reference_mask = original_encode(folders[layout], prompts)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    assert mask.dtype == torch.bool and mask.tolist() == reference_mask.bool().tolist()
    torch.testing.assert_close(features, reference, rtol=0, atol=1e-6)


def test_features_are_the_second_to_last_layers_output(encoder, folders):
    """Independent of transformers' hidden_states bookkeeping: a hook on decoder layer n-2 (0-based)."""
    model = GemmaModel.from_pretrained(folders["single"], dtype=torch.float32).eval()
    inputs = original_tokenize(folders["single"], PROMPTS)
    captured = {}

    def hook(module, args, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handle = model.layers[-2].register_forward_hook(hook)
    try:
        with torch.no_grad():
            last = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
    finally:
        handle.remove()
    features, _ = encoder.encode(PROMPTS)
    torch.testing.assert_close(features, captured["out"], rtol=0, atol=1e-6)
    assert (features - last).abs().max() > 0.1  # not the final (normed) output


def test_legacy_gelu_config_runs_the_tanh_gelu(encoder):
    """google/gemma-2b's config.json says "gelu"; Gemma was trained with the tanh approximation."""
    assert tiny_gemma_config_json()["hidden_act"] == "gelu"
    assert encoder.model.config.hidden_act == "gelu_pytorch_tanh"


def test_buffers_equal_a_normally_built_gemmamodel(encoder):
    normal = GemmaModel(GemmaConfig(**{k: v for k, v in tiny_gemma_config_json().items() if k != "architectures"}))
    loaded = dict(encoder.model.named_buffers())
    names = [name for name, _ in normal.named_buffers()]
    assert "embed_tokens.embed_scale" in names and "rotary_emb.inv_freq" in names
    for name, buffer in normal.named_buffers():
        assert loaded[name].dtype == buffer.dtype, name
        torch.testing.assert_close(loaded[name], buffer, rtol=0, atol=0)


# --- token layout -------------------------------------------------------------------------------------------------


def test_prompt_ids_are_bos_then_the_tokenizers_own_no_eos(encoder, folders):
    tokenizer = AutoTokenizer.from_pretrained(folders["single"])
    for prompt in PROMPTS:
        ids, mask = encoder.tokenize(prompt)
        own = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        n = len(own) + 1
        assert ids[0, :n].tolist() == [BOS, *own], prompt
        assert mask[0].tolist() == [True] * n + [False] * (ids.shape[1] - n), prompt
        assert ids[0, n:].eq(PAD).all() and not ids.eq(EOS).any(), prompt
    assert int(encoder.tokenize("zebra")[1].sum()) > 3  # the sub-word splitting is exercised: several pieces


def test_empty_prompt_is_bos_padded_to_eight(encoder):
    ids, mask = encoder.tokenize("")
    assert ids.tolist() == [[BOS] + [PAD] * 7]
    assert mask.tolist() == [[True] + [False] * 7]


@pytest.mark.parametrize("n_words", [1, 6, 7, 8, 15, 16, 40])
def test_length_is_padded_to_a_multiple_of_eight(encoder, folders, n_words):
    prompt = " ".join(["cat"] * n_words)  # "▁cat" is one token after the first "cat"
    ids, mask = encoder.tokenize(prompt)
    n = int(mask.sum())
    assert ids.shape[1] == -(-n // 8) * 8 and ids.shape[1] % 8 == 0 and ids.shape[1] - n < 8
    assert ids.tolist() == original_tokenize(folders["single"], [prompt]).input_ids.tolist()


def test_joint_call_pads_prompt_and_negative_to_one_length(encoder):
    long_prompt = PROMPTS[2]
    ids, mask = encoder.tokenize([long_prompt, ""])
    alone = encoder.tokenize(long_prompt)[0]
    assert ids.shape[1] == alone.shape[1] > 8
    assert mask[1].sum() == 1 and ids[1, 1:].eq(PAD).all()


def test_truncated_at_256_ids_like_the_original(encoder, folders, caplog):
    prompt = " ".join(["cat"] * 300)
    with caplog.at_level(logging.WARNING, logger=teg.__name__):
        ids, mask = encoder.tokenize([prompt, ""])
    assert ids.shape == (2, 256) and bool(mask[0].all())
    assert ids[0, 0] == BOS and ids[0, -1] != EOS
    assert ids.tolist() == original_tokenize(folders["single"], [prompt, ""]).input_ids.tolist()
    n = 1 + len(encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert n > 300 and f"{n} tokens" in caplog.text and f"{n - 256} tokens dropped" in caplog.text
    features, _ = encoder.encode(prompt)
    assert features.shape == (1, 256, encoder.hidden_size)
    caplog.clear()
    exact = encoder.tokenizer.decode(ids[0, 1:])  # 255 tokens: with BOS exactly 256, nothing dropped, nothing said
    with caplog.at_level(logging.WARNING, logger=teg.__name__):
        assert encoder.tokenize(exact)[0].tolist() == ids[:1].tolist()
    assert caplog.text == ""


def test_max_tokens_cuts_earlier_and_must_be_a_multiple_of_eight(encoder):
    ids, mask = encoder.tokenize(" ".join(["cat"] * 20), max_tokens=16)
    assert ids.shape == (1, 16) and bool(mask.all())
    for bad in (0, 10, -8):
        with pytest.raises(ValueError, match="max_tokens must be a positive multiple of 8"):
            encoder.tokenize("a", max_tokens=bad)


def test_tokenizer_flags_and_padding_side_in_the_folder_do_not_matter(folders, tmp_path, encoder):
    """transformers 5 takes BOS and the padding side from the folder's files; the encoder lays ids out itself."""
    folder = copy_folder(folders["single"], tmp_path / "flags")
    _edit_json(folder / "tokenizer_config.json", add_bos_token=False, add_eos_token=True, padding_side="left")
    _edit_json(folder / "tokenizer.json", post_processor=None)  # the saved pipeline no longer adds BOS either
    flipped = AutoTokenizer.from_pretrained(folder)
    plain = flipped(["a red cat", ""], padding=True)["input_ids"]  # the files do change transformers' own output
    assert plain[0][0] != BOS and plain[1][0] == PAD
    other = GemmaTextEncoder.from_folder(folder, dtype=torch.float32)
    for got, want in zip(other.tokenize(PROMPTS), encoder.tokenize(PROMPTS)):
        assert got.tolist() == want.tolist()


# --- one prompt at a time equals the joint call on real tokens ----------------------------------------------------


def test_single_prompt_features_equal_the_joint_call_on_real_tokens(encoder):
    joint, joint_mask = encoder.encode(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        alone, alone_mask = encoder.encode(prompt)
        n = int(alone_mask.sum())
        assert int(joint_mask[row].sum()) == n
        # Same tokens, same weights; only the batch shape differs, which changes the blocking of the fp32 matmuls and
        # the order of the attention reductions: a few hundred fp32 roundings (2^-24) at most, so 256 * 2^-24
        # relative (~1.5e-5) with the same absolute floor for values near 0. A real dependence on the padding (a
        # missing mask, left padding) moves the features by O(0.1).
        torch.testing.assert_close(alone[0, :n], joint[row, :n], rtol=256 * FP32_U, atol=256 * FP32_U)
        # Padded to the joint length with mask False, the single result is the joint call's input to the DiT.
        padded_mask = torch.zeros_like(joint_mask[row])
        padded_mask[: alone_mask.shape[1]] = alone_mask[0]
        assert padded_mask.tolist() == joint_mask[row].tolist()
    assert torch.isfinite(joint).all()  # padded rows too: the masked mean of the DiT multiplies them by 0


def test_prompt_and_negative_encoded_apart_give_the_dit_the_joint_calls_input(encoder):
    """What a node does (one encode per prompt, then zero right-padding to a common length with mask False, as
    sampling.batch_text does) equals the original's joint call wherever the DiT looks: the masked mean it pools
    and cross-attention with the padded keys masked out."""
    prompt = PROMPTS[2]
    joint, joint_mask = encoder.encode([prompt, ""])
    rows = []
    for text in (prompt, ""):
        f, m = encoder.encode(text)
        extra = joint.shape[1] - f.shape[1]
        rows.append((torch.cat([f, f.new_zeros(1, extra, f.shape[2])], 1), torch.cat([m, m.new_zeros(1, extra)], 1)))
    apart = torch.cat([f for f, _ in rows])
    apart_mask = torch.cat([m for _, m in rows])
    assert apart_mask.tolist() == joint_mask.tolist()
    assert not torch.equal(apart, joint)  # the padded rows do differ ...

    def pooled(f, m):
        return (f * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True)

    def cross_attention(f, m):
        q = torch.randn(2, 2, 5, 8, generator=torch.Generator().manual_seed(0))
        k = f[..., :16].reshape(2, -1, 2, 8).transpose(1, 2)
        v = f[..., 16:].reshape(2, -1, 2, 8).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, None, :])

    # ... but not where the DiT reads them.
    torch.testing.assert_close(pooled(apart, apart_mask), pooled(joint, joint_mask), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        cross_attention(apart, apart_mask), cross_attention(joint, joint_mask), rtol=0, atol=1e-6
    )


def test_real_tokens_do_not_depend_on_padding_or_on_the_mask(encoder):
    """Hidden states of real tokens are those of the unpadded sequence, with or without the attention mask."""
    prompt = PROMPTS[0]
    ids, mask = encoder.tokenize([prompt, PROMPTS[2]])
    n = int(mask[0].sum())
    with torch.no_grad():
        unpadded = encoder.model(input_ids=ids[:1, :n], output_hidden_states=True).hidden_states[-2]
        no_mask = encoder.model(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    features, _ = encoder.encode([prompt, PROMPTS[2]])
    # As above: only the batch shape differs, so the fp32 reduction order (256 * 2^-24).
    torch.testing.assert_close(features[0, :n], unpadded[0], rtol=256 * FP32_U, atol=256 * FP32_U)
    torch.testing.assert_close(features[0, :n], no_mask[0, :n], rtol=256 * FP32_U, atol=256 * FP32_U)  # masked vs unmasked kernels


def test_single_string_equals_list_of_one(encoder):
    torch.testing.assert_close(encoder.encode("a red cat")[0], encoder.encode(["a red cat"])[0], rtol=0, atol=0)


def test_non_ascii_prompt_encodes(encoder):
    features, mask = encoder.encode("café crème, 東京の猫 🐱")
    assert torch.isfinite(features).all() and bool(mask[0, 0])


def test_prompts_must_not_be_empty(encoder):
    with pytest.raises(ValueError, match="No prompts"):
        encoder.encode([])


# --- what is loaded, and how --------------------------------------------------------------------------------------


def test_interface(encoder, folders):
    assert GemmaTextEncoder.family == encoder.family == "lumina_next"
    assert encoder.hidden_size == 32 and isinstance(encoder.model, GemmaModel)
    assert encoder.device == torch.device("cpu") and encoder.dtype == torch.float32
    assert encoder.to("cpu") is encoder
    assert encoder.tokenizer.padding_side == "right"


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_each_tensor_is_copied_once_and_nothing_but_gemmamodel(folders, layout, monkeypatch):
    copied = []
    real_copy = te._copy_as
    monkeypatch.setattr(te, "_copy_as", lambda t, *a: copied.append(tuple(t.shape)) or real_copy(t, *a))
    encoder = GemmaTextEncoder.from_folder(folders[layout], dtype=torch.bfloat16)
    expected = {name: tuple(t.shape) for name, t in encoder.model.state_dict().items()}
    assert sorted(copied) == sorted(expected.values())  # one read per parameter, no second copy
    assert not hasattr(encoder.model, "lm_head")


def test_lm_head_in_the_file_is_not_read(folders, tmp_path, monkeypatch):
    """An untied export may carry lm_head.weight; the text encoder never reads it."""
    from safetensors.torch import load_file, save_file

    folder = copy_folder(folders["single"], tmp_path / "untied")
    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"])
    save_file(state, folder / "model.safetensors")
    copied = []
    real_copy = te._copy_as
    monkeypatch.setattr(te, "_copy_as", lambda t, *a: copied.append(tuple(t.shape)) or real_copy(t, *a))
    encoder = GemmaTextEncoder.from_folder(folder, dtype=torch.float32)
    embedding_shape = tuple(state["model.embed_tokens.weight"].shape)
    assert copied.count(embedding_shape) == 1
    torch.testing.assert_close(encoder.encode(PROMPTS)[0], original_encode(folders["single"], PROMPTS)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_parameter_has_the_dtype_asked_for(folders, dtype):
    encoder = GemmaTextEncoder.from_folder(folders["sharded"], dtype=dtype)
    assert {p.dtype for p in encoder.model.parameters()} == {dtype}
    assert encoder.dtype == dtype
    features, _ = encoder.encode(["a red cat", ""])
    assert features.dtype == torch.float32
    reference, _ = original_encode(folders["sharded"], ["a red cat", ""])
    torch.testing.assert_close(features, reference, rtol=0, atol=0.15)


def test_non_float_dtype_is_refused(folders):
    with pytest.raises(ValueError, match="floating torch.dtype"):
        GemmaTextEncoder.from_folder(folders["single"], dtype=torch.int8)


def test_to_moves_the_model_and_encode_follows_it(encoder):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device to move to")
    cpu_features, _ = encoder.encode(PROMPTS)
    try:
        encoder.to("cuda")
        gpu_features, _ = encoder.encode(PROMPTS)
        on_gpu, mask_on_gpu = encoder.encode(PROMPTS, output_device="cuda")
        assert gpu_features.device.type == "cpu" and on_gpu.device.type == mask_on_gpu.device.type == "cuda"
    finally:
        encoder.to("cpu")
    torch.testing.assert_close(gpu_features, cpu_features, rtol=0, atol=1e-4)


def test_text_encoder_folder_of_a_diffusers_pipeline(folders, tmp_path):
    """Lumina-Next-SFT-diffusers keeps GemmaModel weights (no "model." prefix) in text_encoder/ and the tokenizer in
    tokenizer/; the same weights give the same features as the google/gemma-2b layout."""
    from safetensors.torch import load_file, save_file

    root = tmp_path / "pipeline"
    (root / "text_encoder").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "LuminaText2ImgPipeline"}))
    shutil.copytree(folders["single"], root / "tokenizer", ignore=shutil.ignore_patterns("config.json", "*.safet*"))
    shutil.copy(folders["single"] / "config.json", root / "text_encoder" / "config.json")
    _edit_json(root / "text_encoder" / "config.json", architectures=["GemmaModel"])
    state = load_file(folders["single"] / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, root / "text_encoder" / "model.safetensors")

    encoder = GemmaTextEncoder.from_folder(root / "text_encoder", dtype=torch.float32)
    reference, _ = original_encode(folders["single"], PROMPTS)
    torch.testing.assert_close(encoder.encode(PROMPTS)[0], reference, rtol=0, atol=1e-6)
    with pytest.raises(TextEncoderError, match=r"root of a diffusers pipeline; select .*pipeline/text_encoder"):
        GemmaTextEncoder.from_folder(root)


# --- which folder is what -----------------------------------------------------------------------------------------


def test_is_gemma_folder(folders, tmp_path):
    assert is_gemma_folder(folders["single"]) and is_gemma_folder(str(folders["bin"]))
    llama = make_tiny_llama_folder(tmp_path / "llama")
    assert not is_gemma_folder(llama)
    assert not is_gemma_folder(tmp_path / "nowhere")
    for name, config in {
        "gemma2": {"model_type": "gemma2"},
        "gemma3": {"model_type": "gemma3_text"},
        "broken": "{not json",
        "list": [],
    }.items():
        (tmp_path / name).mkdir()
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / name / "config.json").write_text(text)
        assert not is_gemma_folder(tmp_path / name), name
    (tmp_path / "arch_only").mkdir()
    (tmp_path / "arch_only" / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"]}))
    assert is_gemma_folder(tmp_path / "arch_only")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}, r"'gemma2'.*Gemma-2 .*Lumina-Image-2.0"),
        ({"model_type": "gemma3_text"}, r"Gemma-3 is the text encoder of no Lumina model"),
        ({"model_type": "llama"}, r"not Gemma-2B .*LLaMA is the text encoder of Lumina-T2I.*LlamaTextEncoder"),
        ({"model_type": "t5", "architectures": ["T5EncoderModel"]}, r"'t5'.*T5 .*SD3/Flux"),
        ({"model_type": "mistral"}, r"not Gemma-2B \(model_type 'mistral'.*google/gemma-2b"),
        ({"architectures": ["Gemma2ForCausalLM"]}, r"no model_type, architectures \['Gemma2ForCausalLM'\].*Gemma-2"),
    ],
)
def test_not_a_gemma_model(tmp_path, config, message):
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TextEncoderError, match=message):
        GemmaTextEncoder.from_folder(tmp_path)


def test_a_llama_folder_is_refused_naming_the_llama_encoder(tmp_path):
    folder = make_tiny_llama_folder(tmp_path / "llama")
    with pytest.raises(TextEncoderError, match=r"llama.*not Gemma-2B.*Lumina-T2I.*LlamaTextEncoder"):
        GemmaTextEncoder.from_folder(folder)


def test_the_llama_encoder_refuses_a_gemma_folder_naming_the_gemma_encoder(folders):
    message = r"not LLaMA .*'gemma'.*Lumina-Next's text encoder \(google/gemma-2b\).*GemmaTextEncoder"
    with pytest.raises(TextEncoderError, match=message):
        LlamaTextEncoder.from_folder(folders["single"])


# --- bad folders, refused as for LLaMA ----------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(TextEncoderError, match=r"nowhere does not exist.*google/gemma-2b"):
        GemmaTextEncoder.from_folder(tmp_path / "nowhere")


def test_a_file_instead_of_a_folder(folders):
    with pytest.raises(TextEncoderError, match=r"model.safetensors is a file, not a folder.*google/gemma-2b"):
        GemmaTextEncoder.from_folder(os.path.join(folders["single"], "model.safetensors"))


def test_missing_config(folders, tmp_path):
    folder = copy_folder(folders["single"], tmp_path / "no_config", without=["config.json"])
    with pytest.raises(TextEncoderError, match=r"No config.json in .*no_config.*Gemma-2B \(google/gemma-2b\)"):
        GemmaTextEncoder.from_folder(folder)


def test_missing_tokenizer(folders, tmp_path):
    folder = copy_folder(folders["single"], tmp_path / "no_tok", without=["tokenizer*"])
    with pytest.raises(TextEncoderError, match=r"No tokenizer in .*no_tok.*tokenizer.json.*google/gemma-2b"):
        GemmaTextEncoder.from_folder(folder)


def test_missing_weights(folders, tmp_path):
    folder = copy_folder(folders["single"], tmp_path / "no_weights", without=["*.safetensors"])
    with pytest.raises(TextEncoderError, match=r"No weights in .*no_weights.*google/gemma-2b"):
        GemmaTextEncoder.from_folder(folder)


def test_missing_shard_named_in_index(folders, tmp_path):
    folder = copy_folder(folders["sharded"], tmp_path / "lost_shard", without=["model-00002-of-*"])
    with pytest.raises(TextEncoderError, match=r"missing .*model-00002-of-.*Download every shard"):
        GemmaTextEncoder.from_folder(folder)


def test_truncated_safetensors(folders, tmp_path):
    folder = copy_folder(folders["single"], tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TextEncoderError, match=r"model[.]safetensors is truncated: .* Download it again"):
        GemmaTextEncoder.from_folder(folder)


def test_truncated_bin_names_gemma(folders, tmp_path):
    folder = copy_folder(folders["bin"], tmp_path / "truncated_bin")
    weights = folder / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TextEncoderError, match=r"pytorch_model.bin: it is not a zip-format .*from google/gemma-2b"):
        GemmaTextEncoder.from_folder(folder)


def test_git_lfs_pointer_instead_of_weights(folders, tmp_path):
    folder = copy_folder(folders["single"], tmp_path / "lfs")
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(TextEncoderError, match=r"Git LFS pointer.*git lfs pull"):
        GemmaTextEncoder.from_folder(folder)


class _WritesMarker:
    """Pickles to a call of open(marker, "w"): unpickling it without weights_only creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_run(folders, tmp_path):
    twin_marker = tmp_path / "twin_ran"  # the payload is real: the unsafe load of a twin runs it
    torch.save({"model.embed_tokens.weight": _WritesMarker(twin_marker)}, tmp_path / "twin.bin")
    torch.load(tmp_path / "twin.bin", weights_only=False)
    assert twin_marker.exists()

    folder = copy_folder(folders["bin"], tmp_path / "evil")
    marker = tmp_path / "payload_ran"
    torch.save({"model.embed_tokens.weight": _WritesMarker(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(
        TextEncoderError,
        match=r"pytorch_model.bin: it was refused because unpickling it needs arbitrary code .*nothing in it was "
        r"executed.*google/gemma-2b",
    ):
        GemmaTextEncoder.from_folder(folder)
    assert not marker.exists()


def test_config_and_weights_from_different_checkpoints(folders, tmp_path):
    folder = copy_folder(folders["sharded"], tmp_path / "more_layers")
    _edit_json(folder / "config.json", num_hidden_layers=4)
    with pytest.raises(TextEncoderError, match=r"do not match GemmaModel .* missing keys \['layers\.3\..*gemma-2b"):
        GemmaTextEncoder.from_folder(folder)


def test_a_one_layer_config_is_refused(folders, tmp_path):
    folder = copy_folder(folders["single"], tmp_path / "one_layer")
    _edit_json(folder / "config.json", num_hidden_layers=1)
    with pytest.raises(TextEncoderError, match=r"1 decoder layer.*second-to-last"):
        GemmaTextEncoder.from_folder(folder)


def test_a_vocabulary_smaller_than_the_tokenizer(folders, tmp_path):
    folder = copy_folder(folders["single"], tmp_path / "small_vocab")
    _edit_json(folder / "config.json", vocab_size=100)
    with pytest.raises(TextEncoderError, match=r"tokens but config.json declares vocab_size=100"):
        GemmaTextEncoder.from_folder(folder)


# --- the tiny folder ----------------------------------------------------------------------------------------------


def test_tiny_folder_has_the_released_layout_and_is_seeded(folders, tmp_path):
    from safetensors import safe_open

    with safe_open(folders["single"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        embedding = f.get_tensor("model.embed_tokens.weight")
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys and "lm_head.weight" not in keys
    assert all(k.startswith("model.") for k in keys)
    config = json.loads((folders["single"] / "config.json").read_text())
    assert config["model_type"] == "gemma" and config["architectures"] == ["GemmaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS, EOS, PAD)
    tokenizer = AutoTokenizer.from_pretrained(folders["single"])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    assert len(tokenizer) <= config["vocab_size"]

    def embedding_of(folder):
        with safe_open(folder / "model.safetensors", "pt") as f:
            return f.get_tensor("model.embed_tokens.weight")

    torch.testing.assert_close(embedding_of(make_tiny_gemma_folder(tmp_path / "again")), embedding, rtol=0, atol=0)
    assert not torch.equal(embedding_of(make_tiny_gemma_folder(tmp_path / "seed1", seed=1)), embedding)
    wide = make_tiny_gemma_folder(tmp_path / "wide", 48)
    assert GemmaTextEncoder.from_folder(wide, dtype=torch.float32).hidden_size == 48
