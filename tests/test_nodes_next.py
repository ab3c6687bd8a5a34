"""Lumina-Next in the nodes (plain Python) and the family registry: detection of DiTs and text-encoder folders,
loading through the family-detecting loaders, sampling with Gemma conditioning, and refusal of mixed families."""

from __future__ import annotations

import pytest
import torch

from lumina_core import families
from lumina_core.generation import sample
from lumina_core.image.latent import SDXL_SCALING_FACTOR
from lumina_core.models.next_dit import NextDiT
from lumina_core.sampling.schedule import make_noise
from lumina_core.text.gemma import GemmaTextEncoder
from lumina_core.text.llama import LlamaTextEncoder
from lumina_core.tiny import write_tiny_next_dit
from lumina_core.weights.dit_files import load_next_dit
from nodes import NODE_CLASS_MAPPINGS as N
from nodes import comfy_model, model_files
from nodes.common import FAMILY_KEY
from nodes.flow_model import ComfyNextDiT, comfy_output_from_velocity
from tests.helpers_nodes import DIT_NAME, GEMMA_NAME, LLAMA_NAME, NEXT_DIT_NAME, TINY_HIDDEN, make_tiny_models

PROMPT = "a red cat sat on the mat"
DIFFUSERS_NAME = "lumina_next_sft_diffusers.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = make_tiny_models(tmp_path_factory.mktemp("models"), lumina_next=True)
    root = paths["root"]
    paths["next_diffusers"] = write_tiny_next_dit(root / "diffusion_models" / DIFFUSERS_NAME, seed=0,
                                                  layout="diffusers")
    (root / "text_encoders" / "t5xxl").mkdir()
    (root / "text_encoders" / "t5xxl" / "config.json").write_text('{"model_type": "t5"}')
    (root / "text_encoders" / "gemma2").mkdir()
    (root / "text_encoders" / "gemma2" / "config.json").write_text('{"model_type": "gemma2"}')
    model_files.set_model_folders("diffusion_models", [root / "diffusion_models"])
    model_files.set_model_folders("text_encoders", [root / "text_encoders"])
    return paths


@pytest.fixture(scope="module")
def loaded(models):
    (gemma,) = N["LuminaTextEncoderLoader"]().load(GEMMA_NAME, "fp32")
    (llama,) = N["LuminaTextEncoderLoader"]().load(LLAMA_NAME, "fp32")
    (next_model,) = N["LuminaDiTLoader"]().load(NEXT_DIT_NAME, "fp32")
    (flag_model,) = N["LuminaDiTLoader"]().load(DIT_NAME, "fp32")
    encode = N["LuminaTextEncode"]().encode
    return {
        "gemma": gemma, "llama": llama, "next": next_model, "flag": flag_model,
        "g_pos": encode(gemma, PROMPT)[0], "g_neg": encode(gemma, "")[0],
        "l_pos": encode(llama, PROMPT)[0], "l_neg": encode(llama, "")[0],
    }


def test_registry_detects_dits_and_text_encoder_folders(models):
    assert families.checkpoint_family(models["dit"]) is families.LUMINA_T2I
    assert families.checkpoint_family(models["next"]) is families.LUMINA_NEXT
    assert families.checkpoint_family(models["next_diffusers"]) is families.LUMINA_NEXT
    assert families.text_encoder_family(models["llama"]) is families.LUMINA_T2I
    assert families.text_encoder_family(models["gemma"]) is families.LUMINA_NEXT
    root = models["root"] / "text_encoders"
    assert families.text_encoder_family(root / "gemma2") is families.LUMINA_2
    with pytest.raises(families.TextEncoderFolderError, match="No config.json"):
        families.text_encoder_family(models["root"])
    assert isinstance(families.load_text_encoder(models["gemma"], dtype=torch.float32), GemmaTextEncoder)
    assert isinstance(families.load_text_encoder(models["llama"], dtype=torch.float32), LlamaTextEncoder)


def test_loader_lists_hold_both_families(models):
    folders = N["LuminaTextEncoderLoader"].INPUT_TYPES()["required"]["text_encoder_folder"][0]
    assert folders == sorted([GEMMA_NAME, LLAMA_NAME, "gemma2"])  # a Gemma-2 folder is Lumina-Image-2.0's
    dits = N["LuminaDiTLoader"].INPUT_TYPES()["required"]["dit_name"][0]
    assert set(dits) == {DIT_NAME, NEXT_DIT_NAME, DIFFUSERS_NAME}
    # The LLaMA-only list of the older loader still shows LLaMA folders only.
    assert N["LuminaLlamaLoader"].INPUT_TYPES()["required"]["llama_folder"][0] == [LLAMA_NAME]


def test_loaders_return_the_family_of_the_file(loaded, models):
    next_dit = comfy_model.lumina_dit(loaded["next"])
    assert isinstance(next_dit, NextDiT) and next_dit.family == "lumina_next"
    assert comfy_model.lumina_dit(loaded["flag"]).family == "lumina_t2i"
    assert isinstance(loaded["gemma"].encoder, GemmaTextEncoder)
    (diffusers,) = N["LuminaDiTLoader"]().load(DIFFUSERS_NAME, "bf16")
    dit = comfy_model.lumina_dit(diffusers)
    assert dit.x_embedder.weight.dtype == torch.bfloat16
    assert torch.equal(dit.x_embedder.weight, next_dit.x_embedder.weight.to(torch.bfloat16))


def test_gemma_conditioning_carries_its_family_and_the_encoders_features(loaded, models):
    (features, extras), = loaded["g_pos"]
    assert extras[FAMILY_KEY] == "lumina_next"
    direct = GemmaTextEncoder.from_folder(models["gemma"], dtype=torch.float32).encode([PROMPT])
    assert torch.equal(features, direct[0]) and torch.equal(extras["attention_mask"], direct[1])


def _sample_node(model, pos, neg, latent, **over):
    args = dict(seed=3, steps=3, cfg=4.0, solver="midpoint", shift=4.0, denoise=1.0, extrapolation="time_aware",
                guidance="faithful")
    args.update(over)
    (out,) = N["LuminaSampler"]().sample(model, pos, neg, latent, **args)
    return out


def test_sampler_runs_a_next_dit_as_the_core_does(loaded, models):
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 64, 32, 1)
    out = _sample_node(loaded["next"], loaded["g_pos"], loaded["g_neg"], latent)
    encoder = GemmaTextEncoder.from_folder(models["gemma"], dtype=torch.float32)
    # The original's joint encoding of [prompt, negative]: the sampler pads the separately encoded pair the same way.
    feats, mask = encoder.encode([PROMPT, ""])
    dit = load_next_dit(models["next"], dtype=torch.float32)
    want = sample(dit, make_noise(3, (1, 4, 4, 8)), (feats[:1], mask[:1]), (feats[1:], mask[1:]), steps=3)
    torch.testing.assert_close(out["samples"] * SDXL_SCALING_FACTOR, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model, pos, neg, encoder",
    [("flag", "g_pos", "g_neg", "LLaMA-2-7B"), ("next", "l_pos", "l_neg", "Gemma-2B")],
    ids=["gemma_into_flag_dit", "llama_into_next_dit"],
)
def test_mixed_families_are_refused_naming_the_right_encoder(loaded, model, pos, neg, encoder):
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 32, 32, 1)
    with pytest.raises(ValueError, match=f"positive conditioning comes from .*which needs {encoder} features"):
        _sample_node(loaded[model], loaded[pos], loaded[neg], latent)


def test_comfy_forward_of_a_next_dit_is_the_flow_convention(models):
    dit = load_next_dit(models["next"], dtype=torch.float32)
    wrapped = ComfyNextDiT(dit.config, dtype=torch.float32)
    wrapped.load_state_dict(dit.state_dict())
    x = torch.randn(2, 4, 8, 16, generator=torch.Generator().manual_seed(0))
    feats = torch.randn(2, 5, TINY_HIDDEN)
    mask = torch.ones(2, 5, dtype=torch.bool)
    sigma = torch.tensor([0.6, 0.6])
    got = wrapped(x, sigma, context=feats, attention_mask=mask.long())
    kwargs = families.LUMINA_NEXT.extrapolation_kwargs("time_aware", 8, 16, 0.4, 0.3)
    want = comfy_output_from_velocity(dit(x, 1 - sigma, feats, mask, **kwargs))
    torch.testing.assert_close(got, want)
