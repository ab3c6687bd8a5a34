"""fp8 weight storage (DiT and LLaMA), saved prompt encodings, and the demo and node paths that use them.

The references are computed another way: an fp8-stored model must equal a bf16 model whose linear weights were
rounded through fp8 by hand; a converted fp8 file must hold exactly the fp32 values cast to fp8 once.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from lumina_core import conditioning, dtypes
from lumina_core.__main__ import main as cli
from lumina_core.dtypes import dtype_from_name
from lumina_core.generation import sample
from lumina_core.sampling.schedule import make_noise
from lumina_core.text.llama import LlamaTextEncoder
from lumina_core.tiny import make_tiny_flag_dit, write_tiny_llama_folder
from lumina_core.weights.convert import convert_checkpoint
from lumina_core.weights.dit_files import load_flag_dit, save_flag_dit
from lumina_core.weights.fp8 import CastLinear, linear_weight_names, swap_linear_layers
from tests.conftest import BF16_U
from tests.helpers_dit import random_text

E4M3 = torch.float8_e4m3fn
FP8S = (torch.float8_e4m3fn, torch.float8_e5m2)


def _header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dit") / "consolidated.00-of-01.safetensors"
    save_flag_dit(make_tiny_flag_dit(seed=3), path)
    return path


# --------------------------------------------------------------------------------------------------------------
# dtype names


def test_dtype_names_include_fp8_and_refuse_unknown_ones():
    assert dtype_from_name("fp8_e4m3fn") is torch.float8_e4m3fn
    assert dtype_from_name("fp8_e5m2") is torch.float8_e5m2
    with pytest.raises(ValueError, match="unknown weight dtype 'fp4'.*bf16"):
        dtype_from_name("fp4")


def test_a_torch_without_float8_gets_a_clear_message(monkeypatch):
    monkeypatch.delitem(dtypes.DTYPES, "fp8_e4m3fn")
    with pytest.raises(ValueError, match=r"'fp8_e4m3fn' needs a PyTorch with float8 dtypes.*Choose bf16"):
        dtype_from_name("fp8_e4m3fn")


def test_cast_linear_computes_with_the_weight_cast_to_the_input_dtype():
    torch.manual_seed(0)
    layer = CastLinear(16, 8, bias=True)
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight.to(E4M3), requires_grad=False)
        layer.bias = nn.Parameter(layer.bias.to(torch.bfloat16), requires_grad=False)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    # Reference: the fp8 values decoded by hand from their bits (sign, 4-bit exponent bias 7, 3-bit mantissa).
    b = layer.weight.view(torch.uint8).to(torch.int32)
    sign = 1 - 2 * (b >> 7)
    exp, man = (b >> 3) & 15, b & 7
    value = torch.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7)) * sign
    expected = x.float() @ value.t().float() + layer.bias.float()
    assert torch.allclose(layer(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert layer(x).dtype == torch.bfloat16


def test_swap_linear_layers_on_meta_keeps_shapes_and_names():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 2, bias=False)))
    keys = {k: v.shape for k, v in model.state_dict().items()}
    swap_linear_layers(model)
    assert isinstance(model[0], CastLinear) and isinstance(model[2][0], CastLinear)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert linear_weight_names(model) == {"0.weight", "2.0.weight"}


# --------------------------------------------------------------------------------------------------------------
# Flag-DiT


@pytest.mark.parametrize("fp8", FP8S)
def test_fp8_dit_load_casts_linear_weights_once_and_keeps_the_rest(fp32_file, fp8):
    ref = load_flag_dit(fp32_file, dtype=torch.float32)
    model = load_flag_dit(fp32_file, dtype=fp8)
    linear = linear_weight_names(model)
    assert len(linear) > 0
    compute = dtypes.compute_dtype_for("cpu")
    assert model.compute_dtype == compute
    for key, value in model.state_dict().items():
        if key in linear:
            # Straight from fp32 to fp8: one rounding, not two (fp32 -> bf16 -> fp8 rounds some values differently).
            assert value.dtype == fp8 and torch.equal(_bits(value), _bits(ref.state_dict()[key].to(fp8))), key
        else:
            assert value.dtype == compute and torch.equal(value, ref.state_dict()[key].to(compute)), key


def test_fp8_dit_equals_bf16_dit_with_weights_rounded_through_fp8(fp32_file, monkeypatch):
    dtypes.force_cpu_compute_dtype(torch.bfloat16)  # the bf16 path, on any CPU (fp32: the test below)
    try:
        model = load_flag_dit(fp32_file, dtype=E4M3)
    finally:
        dtypes.force_cpu_compute_dtype(None)
    assert model.compute_dtype == torch.bfloat16
    # Reference: a plain bf16 model whose linear weights hold the fp8-rounded values.
    ref = load_flag_dit(fp32_file, dtype=torch.bfloat16)
    fp32_model = load_flag_dit(fp32_file, dtype=torch.float32)
    fp32_state = fp32_model.state_dict()
    with torch.no_grad():
        for key, p in ref.state_dict().items():
            if key in linear_weight_names(ref):
                p.copy_(fp32_state[key].to(E4M3).to(torch.bfloat16))
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([0.3, 0.7])
    feats, mask = random_text(2, 5, model.config.cap_feat_dim)
    out, expected = model(x, t, feats, mask), ref(x, t, feats, mask)
    assert torch.isfinite(out).all()
    # The same weight values and the same bf16 arithmetic: only a kernel's reduction order for the same inputs may
    # differ (CPUs without native bf16 emulate it), which stays within one bf16 rounding of the output (2^-8
    # relative). The fp8 rounding this test is about costs several times that (checked below against fp32).
    assert ((out - expected).norm() / expected.norm()).item() <= BF16_U
    fp32 = fp32_model(x, t, feats, mask)
    rel = ((out - fp32).norm() / fp32.norm()).item()
    assert 1e-3 < rel < 0.2  # fp8 is really used (not bf16), and stays close


def test_convert_to_fp8_writes_fp8_linear_weights_and_bf16_rest_and_loads_without_bf16(fp32_file, tmp_path,
                                                                                        cpu_compute):
    out = tmp_path / "lumina_fp8.safetensors"
    assert cli(["convert", str(fp32_file), str(out), "--dtype", "fp8_e4m3fn"]) == 0
    header = _header(out)
    model = make_tiny_flag_dit(seed=3)
    linear = linear_weight_names(model)
    for key in model.state_dict():
        assert header[key]["dtype"] == ("F8_E4M3" if key in linear else "BF16"), key
    n_linear = sum(model.state_dict()[k].numel() for k in linear)
    n_other = sum(v.numel() for k, v in model.state_dict().items() if k not in linear)
    data = out.stat().st_size - 8 - struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert data == n_linear + 2 * n_other
    # Loading the fp8 file into fp8 gives the very linear weights loading the fp32 release into fp8 gives, and the
    # other tensors as the file stores them (bf16) in the compute dtype: bf16, or fp32 on a CPU without bf16, where
    # the release's own fp32 values differ from the file's in the bits bf16 dropped.
    from_fp8 = load_flag_dit(out, dtype=E4M3).state_dict()
    from_fp32 = load_flag_dit(fp32_file, dtype=E4M3).state_dict()
    for key in from_fp32:
        assert from_fp8[key].dtype == from_fp32[key].dtype
        stored = from_fp32[key] if key in linear else from_fp32[key].to(torch.bfloat16).to(cpu_compute)
        assert from_fp8[key].dtype == stored.dtype and torch.equal(_bits(from_fp8[key]), _bits(stored)), key
    # dtype None keeps the file's fp8 (and computes through the casting layers).
    kept = load_flag_dit(out, dtype=None)
    assert kept.x_embedder.weight.dtype == E4M3 and isinstance(kept.x_embedder, CastLinear)


def test_fp8_file_loads_into_bf16_too(fp32_file, tmp_path):
    out = tmp_path / "fp8.safetensors"
    convert_checkpoint(fp32_file, out, dtype=torch.float8_e5m2)
    model = load_flag_dit(out, dtype=torch.bfloat16)
    ref = load_flag_dit(fp32_file, dtype=torch.float32)
    w = ref.layers[0].attention.wq.weight
    assert torch.equal(model.layers[0].attention.wq.weight, w.to(torch.float8_e5m2).to(torch.bfloat16))


# --------------------------------------------------------------------------------------------------------------
# LLaMA


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return write_tiny_llama_folder(tmp_path_factory.mktemp("llama") / "tiny-llama", hidden_size=64)


@pytest.mark.parametrize("fp8", FP8S)
def test_fp8_llama_equals_bf16_llama_with_weights_rounded_through_fp8(llama_folder, fp8):
    enc = LlamaTextEncoder.from_folder(llama_folder, dtype=fp8, compute_dtype=torch.bfloat16)
    ref = LlamaTextEncoder.from_folder(llama_folder, dtype=torch.bfloat16)
    fp32 = LlamaTextEncoder.from_folder(llama_folder, dtype=torch.float32)
    linear = linear_weight_names(enc.model)
    assert len(linear) == 7 * 2  # q, k, v, o, gate, up, down in each of the 2 layers
    state = enc.model.state_dict()
    with torch.no_grad():
        for key, p in ref.model.state_dict().items():
            if key in linear:
                assert state[key].dtype == fp8
                assert torch.equal(_bits(state[key]), _bits(fp32.model.state_dict()[key].to(fp8)))
                p.copy_(fp32.model.state_dict()[key].to(fp8).to(torch.bfloat16))
            else:
                assert state[key].dtype == torch.bfloat16
    assert enc.dtype == torch.bfloat16 and enc.storage_dtype == fp8
    prompts = ["a red cat sat on the mat", ""]
    feats, mask = enc.encode(prompts)
    want, want_mask = ref.encode(prompts)
    assert torch.isfinite(feats).all() and torch.equal(mask, want_mask)
    assert torch.equal(feats, want)
    full, _ = fp32.encode(prompts)
    rel = ((feats - full)[mask].norm() / full[mask].norm()).item()
    assert 1e-3 < rel < 0.2


def test_fp8_llama_holds_half_the_bytes_of_bf16(llama_folder):
    def nbytes(enc, linear_only):
        names = linear_weight_names(enc.model)
        return sum(v.numel() * v.element_size() for k, v in enc.model.state_dict().items()
                   if (k in names) == linear_only)

    fp8 = LlamaTextEncoder.from_folder(llama_folder, dtype=E4M3, compute_dtype=torch.bfloat16)
    bf16 = LlamaTextEncoder.from_folder(llama_folder, dtype=torch.bfloat16)
    assert 2 * nbytes(fp8, True) == nbytes(bf16, True)
    assert nbytes(fp8, False) == nbytes(bf16, False)


# --------------------------------------------------------------------------------------------------------------
# Saved encodings


def test_saved_conditioning_round_trips_bit_exactly(tmp_path):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 7, 48, generator=gen)
    feats[0, 0, :4] = torch.tensor([float("inf"), -0.0, 1e-45, 3.4e38])  # special values survive too
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    path = conditioning.save(tmp_path / "c.safetensors", feats, mask, family="lumina_t2i", prompt="a red cat ✓")
    saved = conditioning.load(path)
    assert saved.features.dtype == feats.dtype and torch.equal(saved.features.view(torch.int32), feats.view(torch.int32))
    assert saved.mask.dtype == torch.bool and torch.equal(saved.mask, mask)
    assert saved.meta == {"family": "lumina_t2i", "prompt": "a red cat ✓", "width": 48, "text_encoder": "LLaMA-2-7B"}
    bf = conditioning.save(tmp_path / "b.safetensors", feats.bfloat16(), mask)
    assert torch.equal(conditioning.load(bf).features, feats.bfloat16())


def test_saved_conditioning_refusals(tmp_path, fp32_file):
    with pytest.raises(ValueError, match="mask shape"):
        conditioning.save(tmp_path / "x.safetensors", torch.zeros(1, 3, 8), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(conditioning.ConditioningFileError, match="is not a saved Lumina conditioning.*Save Cond"):
        conditioning.load(fp32_file)
    with pytest.raises(conditioning.ConditioningFileError, match="does not exist"):
        conditioning.load(tmp_path / "missing.safetensors")
    assert not conditioning.is_conditioning_file(fp32_file)


def test_family_and_width_checks_name_both_sides():
    conditioning.check_family({"family": "lumina_t2i", "width": 4096}, family="lumina_t2i", width=4096)
    with pytest.raises(ValueError, match=r"encoded for lumina_next by Gemma-2B \(2048-wide.*needs LLaMA-2-7B"):
        conditioning.check_family({"family": "lumina_next", "width": 2048}, family="lumina_t2i", width=4096)
    with pytest.raises(ValueError, match=r"encoded for lumina_t2i by LLaMA-2-7B.*needs Gemma-2B"):
        conditioning.check_family({"family": "lumina_t2i", "width": 4096}, family="lumina_next", width=2048)
    with pytest.raises(ValueError, match="has 1024-wide features but this DiT expects 4096"):
        conditioning.check_family({"family": "lumina_t2i", "width": 1024}, family="lumina_t2i", width=4096)


def test_sampling_from_loaded_encodings_equals_sampling_from_fresh_ones(tmp_path, llama_folder):
    enc = LlamaTextEncoder.from_folder(llama_folder, dtype=torch.float32)
    dit = make_tiny_flag_dit(seed=1, cap_feat_dim=64)
    cond, uncond = enc.encode(["a fluffy mouse"]), enc.encode([""])
    conditioning.save(tmp_path / "p.safetensors", *cond, prompt="a fluffy mouse")
    conditioning.save(tmp_path / "n.safetensors", *uncond, prompt="")
    loaded_c, loaded_u = conditioning.load(tmp_path / "p.safetensors"), conditioning.load(tmp_path / "n.safetensors")
    kw = dict(steps=3, cfg=4.0, shift=4.0)
    fresh = sample(dit, make_noise(2, (1, 4, 8, 8)), cond, uncond, **kw)
    again = sample(dit, make_noise(2, (1, 4, 8, 8)), loaded_c[:2], loaded_u[:2], **kw)
    assert torch.equal(fresh, again)


# --------------------------------------------------------------------------------------------------------------
# Demo


def test_demo_saves_encodings_and_samples_from_them_without_the_encoder(tmp_path, llama_folder, capsys):
    from safetensors.torch import load_file

    dit = tmp_path / "dit.safetensors"
    save_flag_dit(make_tiny_flag_dit(seed=2, cap_feat_dim=64), dit)
    size = ["--width", "64", "--height", "64", "--steps", "2"]
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli(["demo", "--dit", str(dit), "--llama", str(llama_folder), *size, "--dit-dtype", "fp8_e4m3fn",
                "--save-cond", "--out", str(first)]) == 0
    assert (first / "lumina_demo_cond.safetensors").exists()
    assert conditioning.load(first / "lumina_demo_cond.safetensors").meta["prompt"].startswith("a fluffy mouse")
    assert cli(["demo", "--dit", str(dit), "--cond", str(first / "lumina_demo_cond.safetensors"),
                "--negative-cond", str(first / "lumina_demo_negative_cond.safetensors"), *size,
                "--dit-dtype", "fp8_e4m3fn", "--out", str(second)]) == 0
    out = capsys.readouterr().out
    assert "load saved encodings" in out and "load text encoder" not in out.split("load saved encodings")[-1]
    a = load_file(str(first / "lumina_demo.latent"))["latent_tensor"]
    b = load_file(str(second / "lumina_demo.latent"))["latent_tensor"]
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_demo_refuses_incomplete_saved_encoding_flags(tmp_path, capsys):
    assert cli(["demo", "--dit", "x.safetensors", "--cond", "c.safetensors", "--out", str(tmp_path)]) == 2
    assert "--cond needs --dit and --negative-cond" in capsys.readouterr().out
    assert cli(["demo", "--negative-cond", "c.safetensors", "--out", str(tmp_path)]) == 2


def test_demo_refuses_an_encoding_of_another_family(tmp_path, capsys):
    dit = tmp_path / "dit.safetensors"
    save_flag_dit(make_tiny_flag_dit(seed=2, cap_feat_dim=64), dit)
    mask = torch.ones(1, 3, dtype=torch.bool)
    conditioning.save(tmp_path / "g.safetensors", torch.randn(1, 3, 64), mask, family="lumina_next")
    assert cli(["demo", "--dit", str(dit), "--cond", str(tmp_path / "g.safetensors"), "--negative-cond",
                str(tmp_path / "g.safetensors"), "--width", "32", "--height", "32", "--steps", "1",
                "--out", str(tmp_path / "o")]) == 2
    assert "encoded for lumina_next by Gemma-2B" in capsys.readouterr().out


def test_fp8_computes_in_fp32_on_a_cpu_without_bf16(fp32_file, monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_supports_bf16", lambda: False)
    model = load_flag_dit(fp32_file, dtype=E4M3)
    assert model.compute_dtype == torch.float32 and model.eol_token.dtype == torch.float32
    feats, mask = random_text(1, 4, model.config.cap_feat_dim)
    x = torch.randn(1, 4, 16, 16)
    out = model(x, torch.tensor([0.5]), feats, mask)
    # Reference: an fp32 model holding the fp8-rounded linear weights.
    ref = load_flag_dit(fp32_file, dtype=torch.float32)
    with torch.no_grad():
        for key in linear_weight_names(ref):
            ref.get_parameter(key).copy_(ref.get_parameter(key).to(E4M3).float())
    assert torch.allclose(out, ref(x, torch.tensor([0.5]), feats, mask), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Nodes on plain Python


@pytest.fixture()
def node_models(tmp_path, monkeypatch):
    from nodes import model_files
    from tests.helpers_nodes import make_tiny_models

    paths = make_tiny_models(tmp_path / "models")
    monkeypatch.setattr(model_files, "_plain_folders", {
        "diffusion_models": [str(paths["root"] / "diffusion_models")],
        "text_encoders": [str(paths["root"] / "text_encoders")],
    })
    monkeypatch.setenv("LUMINA_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("LUMINA_INPUT_DIR", str(tmp_path / "input"))
    return paths


def test_loader_nodes_take_fp8_and_the_save_load_nodes_round_trip(node_models, tmp_path):
    from nodes import NODE_CLASS_MAPPINGS as N
    from nodes.common import DTYPE_CHOICES, FAMILY_KEY, PROMPT_KEY
    from tests.helpers_nodes import DIT_NAME, LLAMA_NAME

    assert {"fp8_e4m3fn", "fp8_e5m2"} <= set(DTYPE_CHOICES)
    (te,) = N["LuminaLlamaLoader"]().load(LLAMA_NAME, "fp8_e5m2")
    (model,) = N["LuminaFlagDiTLoader"]().load(DIT_NAME, "fp8_e4m3fn")
    assert te.encoder.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e5m2
    assert model.model.diffusion_model.layers[0].feed_forward.w1.weight.dtype == E4M3
    (pos,) = N["LuminaTextEncode"]().encode(te, "a red cat")
    (neg,) = N["LuminaTextEncode"]().encode(te, "")
    saver = N["LuminaSaveConditioning"]()
    out = saver.save(pos, "lumina_cond/positive")
    assert out["result"] == (pos,) and out["ui"]["text"] == ["lumina_cond/positive_00001_.safetensors [output]"]
    saver.save(neg, "lumina_cond/negative")
    assert saver.save(neg, "lumina_cond/negative")["ui"]["text"] == ["lumina_cond/negative_00002_.safetensors [output]"]
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "notes.txt").write_text("not listed")
    listed = N["LuminaLoadConditioning"].INPUT_TYPES()["required"]["conditioning_file"][0]
    assert listed == [f"lumina_cond/{n}_0000{i}_.safetensors [output]"
                      for n, i in (("negative", 1), ("negative", 2), ("positive", 1))]
    (loaded,) = N["LuminaLoadConditioning"]().load("lumina_cond/positive_00001_.safetensors [output]")
    (feats, extras), = loaded
    assert torch.equal(feats, pos[0][0]) and torch.equal(extras["attention_mask"], pos[0][1]["attention_mask"])
    assert extras[PROMPT_KEY] == "a red cat" and extras[FAMILY_KEY] == "lumina_t2i"
    (loaded_neg,) = N["LuminaLoadConditioning"]().load("lumina_cond/negative_00001_.safetensors [output]")
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 32, 32, 1)
    args = (latent, 4, 2, 4.0, "euler", 4.0, 1.0, "t2i", "faithful")
    (fresh,) = N["LuminaSampler"]().sample(model, pos, neg, *args)
    (again,) = N["LuminaSampler"]().sample(model, loaded, loaded_neg, *args)
    assert torch.isfinite(fresh["samples"]).all() and torch.equal(fresh["samples"], again["samples"])


def test_save_node_refuses_conditioning_of_another_text_encoder(node_models):
    from nodes import NODE_CLASS_MAPPINGS as N

    clip = [[torch.zeros(1, 77, 2048), {"pooled_output": torch.zeros(1, 1280)}]]
    with pytest.raises(ValueError, match="made by Lumina Text Encode; got a conditioning from another text encoder"):
        N["LuminaSaveConditioning"]().save(clip, "x")
