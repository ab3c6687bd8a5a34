"""Lumina2Pipeline (Lumina-Image-2.0) on tiny models: the calls of diffusers' Lumina2Pipeline guide, each checked
against the core sampler called directly and the Lumina Sampler node; diffusers' own Lumina2Pipeline on the same
tiny weights (cfg_trunc_ratio, cfg_normalization); the original's sampling (tests/reference_lumina2_sampling.py) with
the pack's cfg_trunc and renorm_cfg; ComfyUI's all-in-one file, a GGUF transformer, the FLUX AE decode and the
generate command.

Tests that decode images or run diffusers' pipeline need diffusers (the `pipeline` extra) and are skipped without it.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lumina_core import Lumina2Pipeline, LuminaPipeline, load_dit, load_text_encoder
from lumina_core.generation import sample
from lumina_core.image.latent import to_vae_space
from lumina_core.pipeline_lumina2 import diffusers_cfg_trunc
from lumina_core.sampling.schedule import make_noise, time_grid
from tests.helpers_dit import check_negative_apart
from tests.helpers_lora import identical, make_entries, merged, snapshot, spell
from tests.helpers_nodes import GEMMA2_NAME, LUMINA2_DIT_NAME, make_tiny_models
from tests.reference_lumina2 import TINY
from tests.reference_lumina2_sampling import sample_original

pytest.importorskip("sentencepiece")  # the tiny Gemma-2's tokenizer is trained with it (tests/helpers_gemma2.py)
pytest.importorskip("google.protobuf")

try:
    import diffusers  # noqa: F401

    HAVE_DIFFUSERS = True
except ImportError:
    HAVE_DIFFUSERS = False

needs_diffusers = pytest.mark.skipif(not HAVE_DIFFUSERS, reason='diffusers is not installed (pip install ".[pipeline]")')

PROMPT = "a red fox in the snow"
OTHER = "a lighthouse at dusk, waves below"
H, W = 48, 64  # pixels; latent 6x8
STEPS = 3
SYSTEM = "You are an assistant designed to generate superior images with the superior degree of image-text " \
         "alignment based on textual prompts or user prompts."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from tests.helpers_gemma2 import make_tiny_gemma2_folder
    from tests.helpers_lumina2 import write_dit

    root = tmp_path_factory.mktemp("pipeline_lumina2_models")
    paths = {"dit": write_dit(root / "dit", "original"),
             "gemma2": make_tiny_gemma2_folder(root / "gemma-2-2b", hidden_size=TINY["cap_feat_dim"]),
             "vae": None, "vae_model": None}
    if HAVE_DIFFUSERS:
        from lumina_core.tiny import write_tiny_flux_ae

        (root / "vae").mkdir()
        paths["vae"], paths["vae_model"] = write_tiny_flux_ae(root / "vae" / "ae.safetensors")
    comfy = make_tiny_models(root / "comfy", lumina2=True, flux_vae=paths["vae"])
    paths.update(root=comfy["root"], comfy_dit=comfy["lumina2"], comfy_gemma2=comfy["gemma2"],
                 all_in_one=comfy["lumina2_all_in_one"])
    return paths


def _load(files, **kwargs):
    pipe = Lumina2Pipeline.from_files(dit=files["dit"], text_encoder=files["gemma2"], vae=files["vae"],
                                      torch_dtype=torch.float32, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(files):
    return _load(files)


def _latent(pipe, prompt=PROMPT, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "height": H, "width": W, "output_type": "latent", **kwargs}
    return pipe(prompt, **kwargs).images


def _noise(seed, batch=1, height=H, width=W):
    return make_noise(seed, (batch, 16, height // 8, width // 8))


def _texts(pipe, prompts, negatives, system_prompt=None):
    enc = pipe.text_encoder
    cond = enc.encode(prompts, system_prompt=system_prompt)
    return cond, None if negatives is None else enc.encode(negatives, system_prompt="empty")


def _reference(pipe, prompts, negatives, noise, system_prompt=None, **kwargs):
    """The core sampler called directly with the encoder's features (the negatives without system prompt)."""
    cond, uncond = _texts(pipe, prompts, negatives, system_prompt)
    settings = {"steps": STEPS, "cfg": 4.0, "shift": 6.0, "solver": "euler", "cfg_trunc": 1.0, "renorm_cfg": 0.0,
                "cfg_normalization": True, **kwargs}
    return sample(pipe.transformer, noise, cond, uncond, **settings)


def _close(a, b, rtol=1e-5):
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


# --------------------------------------------------------------------------------------------------------------
# The examples of diffusers' Lumina2Pipeline guide


@needs_diffusers
def test_text_to_image_pixels_are_the_flux_ae_decode_of_the_latent(pipe, files):
    image = pipe(PROMPT, num_inference_steps=STEPS, height=H, width=W, seed=0).images[0]
    assert image.size == (W, H) and image.mode == "RGB"
    latent = _latent(pipe, seed=0)
    with torch.no_grad():
        ref = files["vae_model"].decode(latent / 0.3611 + 0.1159).sample  # as diffusers' Lumina2Pipeline decodes
    expected = ((ref / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0)
    assert np.array_equal(np.asarray(image), expected.numpy())
    arr = pipe(PROMPT, num_inference_steps=STEPS, height=H, width=W, seed=0, output_type="np").images
    assert arr.shape == (1, H, W, 3) and float(arr.min()) >= 0 and float(arr.max()) <= 1


def test_default_call_is_diffusers_guidance_on_the_core_sampler(pipe):
    out = _latent(pipe, seed=3)
    assert out.shape == (1, 16, H // 8, W // 8)
    assert _close(out, _reference(pipe, [PROMPT], [""], _noise(3)))
    # cfg_normalization False, then a truncation: the core with diffusers' row rescale off, then guiding 2 of 4 steps.
    assert _close(_latent(pipe, seed=3, cfg_normalization=False),
                  _reference(pipe, [PROMPT], [""], _noise(3), cfg_normalization=False))
    out = _latent(pipe, seed=3, num_inference_steps=4, cfg_trunc_ratio=0.5)
    assert _close(out, _reference(pipe, [PROMPT], [""], _noise(3), steps=4, cfg_trunc=float(time_grid(4, 6.0)[2])))


def test_cfg_trunc_ratio_counts_steps():
    grid = time_grid(4, 6.0)
    assert diffusers_cfg_trunc(1.0, grid) == 1.0  # all 4 guided
    assert diffusers_cfg_trunc(0.5, grid) == float(grid[2])  # steps 0 and 1: (i + 1)/4 <= 0.5
    assert diffusers_cfg_trunc(0.6, grid) == float(grid[2])
    assert diffusers_cfg_trunc(0.2, grid) == float(grid[0]) == 0.0  # none guided: t < 0 never holds


def test_guidance_only_above_one_and_the_system_prompt(pipe):
    a = _latent(pipe, seed=3, guidance_scale=1.0, negative_prompt="blurry")
    assert torch.equal(a, _latent(pipe, seed=3, guidance_scale=1.0))
    assert _close(a, _reference(pipe, [PROMPT], None, _noise(3), cfg=1.0))
    out = _latent(pipe, seed=3, system_prompt="base", negative_prompt="blurry")
    assert _close(out, _reference(pipe, [PROMPT], ["blurry"], _noise(3), system_prompt="base"))
    assert torch.equal(_latent(pipe, seed=3, system_prompt=SYSTEM), _latent(pipe, seed=3))  # the default's text


def test_batches_generators_and_precomputed_embeddings(files, pipe):
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    batch = _latent(pipe, [PROMPT, OTHER], generator=gens, negative_prompt=["ugly", ""])
    for i, (prompt, seed, negative) in enumerate(((PROMPT, 10, "ugly"), (OTHER, 11, ""))):
        single = _latent(pipe, prompt, generator=torch.Generator().manual_seed(seed), negative_prompt=negative)
        assert _close(batch[i : i + 1], single)
    noise = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(42))
    assert torch.equal(_latent(pipe, generator=torch.Generator().manual_seed(42)), _latent(pipe, latents=noise))
    four = _latent(pipe, [PROMPT, OTHER], num_images_per_prompt=2, seed=7)
    assert _close(four[3:4], _latent(pipe, OTHER, latents=_noise(7, 4)[3:4]))
    embeds, mask, neg, neg_mask = pipe.encode_prompt([PROMPT, OTHER], negative_prompt="blurry", system_prompt="base")
    expected = _latent(pipe, [PROMPT, OTHER], negative_prompt="blurry", system_prompt="base", seed=8)
    no_encoder = _load(files)
    no_encoder.text_encoder = None
    out = _latent(no_encoder, None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                  negative_prompt_attention_mask=neg_mask, seed=8)
    assert torch.equal(out, expected)


def test_sigmas_are_diffusers_custom_schedule(pipe):
    sigmas = [1.0, 0.7, 0.2]
    times = torch.tensor([1 - 6 * s / (1 + 5 * s) for s in sigmas] + [1.0])
    out = _latent(pipe, seed=5, sigmas=sigmas, cfg_trunc_ratio=0.5)
    assert _close(out, _reference(pipe, [PROMPT], [""], _noise(5), times=times, steps=3, cfg_trunc=float(times[1])))


def test_offload_slicing_and_a_compiled_transformer(files, monkeypatch):
    import torch._dynamo

    pipe = _load(files)
    expected = _latent(pipe, seed=4)
    pipe.enable_model_cpu_offload(device="cpu")
    moves = []
    for name in ("text_encoder", "transformer"):
        model = getattr(pipe, name)
        original = model.to

        def recorder(*args, _name=name, _original=original, **kwargs):
            moves.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, "to", recorder)
    assert torch.equal(_latent(pipe, seed=4), expected)
    assert moves == ["text_encoder"] * 4 + ["transformer"] * 2
    monkeypatch.undo()
    pipe.to("cpu")

    pipe.enable_attention_slicing(7)
    assert torch.allclose(_latent(pipe, seed=4), expected, rtol=1e-5, atol=1e-5)
    pipe.disable_attention_slicing()

    graphs, calls = [], []

    def backend(gm, example_inputs):
        graphs.append(gm)

        def run(*args):
            calls.append(len(graphs))
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    try:
        pipe.transformer = torch.compile(pipe.transformer, backend=backend, fullgraph=True)
        out = _latent(pipe, seed=4)
    finally:
        torch._dynamo.reset()
    assert graphs and len(calls) >= STEPS
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_callback_on_step_end_and_errors(pipe, files):
    seen = []
    _latent(pipe, seed=1, callback_on_step_end=lambda p, i, t, kw: seen.append((i, round(float(t), 2))))
    assert seen == [(i, round((1 - float(t)) * 1000, 2)) for i, t in enumerate(time_grid(STEPS, 6.0)[:-1])]
    with pytest.raises(ValueError, match="attention_kwargs"):
        _latent(pipe, attention_kwargs={"scale": 0.5})
    with pytest.raises(ValueError, match="not both"):
        _latent(pipe, cfg_trunc_ratio=0.5, cfg_trunc=0.25)
    with pytest.raises(ValueError, match="max_sequence_length"):
        _latent(pipe, max_sequence_length=600)
    with pytest.raises(ValueError, match="negative_prompt or negative_prompt_embeds"):
        embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPT)
        _latent(pipe, None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                negative_prompt_attention_mask=neg_mask, negative_prompt="x")
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 6, 8\), expected \(1, 16, 6, 8\)"):
        _latent(pipe, latents=torch.zeros(1, 4, 6, 8))
    with pytest.raises(ValueError, match="Lumina-Image-2.0 Unified Next-DiT; LuminaPipeline runs Lumina-Next"):
        LuminaPipeline.from_files(dit=files["dit"])


# --------------------------------------------------------------------------------------------------------------
# diffusers' Lumina2Pipeline, the original's sampling, the Lumina Sampler node


@needs_diffusers
@pytest.mark.parametrize("cfg_trunc_ratio, cfg_normalization, system_prompt",
                         [(1.0, True, None), (0.5, True, "You are a painter."), (0.75, False, None)])
def test_reproduces_diffusers_lumina2_pipeline(files, pipe, cfg_trunc_ratio, cfg_normalization, system_prompt):
    """diffusers' own pipeline on the same tiny weights: its Lumina2Transformer2DModel (the diffusers layout of
    SPEC.md §9), the tiny Gemma-2 through transformers (eager attention, which soft-caps as Gemma-2 must), the
    scheduler with shift 6 (Lumina-Image-2.0's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Transformer2DModel
    from diffusers import Lumina2Pipeline as DiffusersLumina2Pipeline
    from transformers import AutoTokenizer, Gemma2Model

    from tests.helpers_gemma2 import _dtype_kwarg
    from tests.helpers_lumina2 import to_diffusers
    from tests.reference_lumina2 import random_state_dict

    transformer = Lumina2Transformer2DModel(
        sample_size=128, patch_size=TINY["patch_size"], in_channels=16, hidden_size=TINY["dim"],
        num_layers=TINY["n_layers"], num_refiner_layers=TINY["n_refiner_layers"], num_attention_heads=TINY["n_heads"],
        num_kv_heads=TINY["n_kv_heads"], multiple_of=TINY["multiple_of"], norm_eps=TINY["norm_eps"],
        axes_dim_rope=TINY["axes_dims"], axes_lens=TINY["axes_lens"], cap_feat_dim=TINY["cap_feat_dim"])
    transformer.load_state_dict(to_diffusers(random_state_dict(TINY, 0)), strict=True)
    folder = str(files["gemma2"])
    encoder = Gemma2Model.from_pretrained(folder, attn_implementation="eager", **{_dtype_kwarg(): torch.float32})
    theirs = DiffusersLumina2Pipeline(transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
                                      vae=files["vae_model"], text_encoder=encoder.eval(),
                                      tokenizer=AutoTokenizer.from_pretrained(folder))
    theirs.set_progress_bar_config(disable=True)
    kw = dict(height=H, width=W, num_inference_steps=4, guidance_scale=4.5, negative_prompt=["blurry", ""],
              cfg_trunc_ratio=cfg_trunc_ratio, cfg_normalization=cfg_normalization, system_prompt=system_prompt,
              output_type="latent")
    prompts = [PROMPT, OTHER]
    expected = theirs(prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw).images
    out = pipe(prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], **kw).images
    assert out.shape == expected.shape == (2, 16, H // 8, W // 8)
    assert float((out - expected).abs().max()) <= 1e-4 * float(expected.abs().max())


@pytest.mark.parametrize("solver, points, cfg_trunc, renorm_cfg, rtol", [
    ("midpoint", 5, 0.25, 1.0, 1e-5), ("euler", 5, 0.5, 0.8, 1e-5), ("dpm", 4, 0.3, 1.0, 1e-4)])
def test_pack_cfg_trunc_and_renorm_cfg_are_the_originals(pipe, solver, points, cfg_trunc, renorm_cfg, rtol):
    """The original's sampling loop (re-implemented in tests/reference_lumina2_sampling.py) on the same DiT: its
    steps count grid points for the ODE solvers (points - 1 steps here) and intervals for dpm (whose data prediction
    the original computes as (x - s * noise) / (1 - s), rounded otherwise than the core's)."""
    cond, uncond = _texts(pipe, [PROMPT], ["blurry"])
    dit = pipe.transformer

    def velocity(x, t, which):
        feats, mask = cond if which == "cond" else uncond
        return dit(x, t, feats, mask)

    z = _noise(6)
    expected = sample_original(velocity, z, solver, points, 6.0, cfg_scale=4.0, cfg_trunc=cfg_trunc,
                               renorm_cfg=renorm_cfg)
    steps = points if solver == "dpm" else points - 1
    out = _latent(pipe, seed=6, negative_prompt="blurry", solver=solver, num_inference_steps=steps,
                  cfg_trunc=cfg_trunc, renorm_cfg=renorm_cfg)
    assert _close(out, expected, rtol)
    assert not _close(out, _latent(pipe, seed=6, negative_prompt="blurry", solver=solver, num_inference_steps=steps),
                      1e-3)


def test_pipeline_latent_equals_the_lumina_sampler_node(files):
    from nodes import NODE_CLASS_MAPPINGS as N
    from nodes import model_files

    model_files.set_model_folders("diffusion_models", [files["root"] / "diffusion_models"])
    model_files.set_model_folders("text_encoders", [files["root"] / "text_encoders"])
    (te,) = N["LuminaTextEncoderLoader"]().load(GEMMA2_NAME, "fp32")
    (model,) = N["LuminaDiTLoader"]().load(LUMINA2_DIT_NAME, "fp32")
    pipe = Lumina2Pipeline.from_files(dit=files["comfy_dit"], text_encoder=files["comfy_gemma2"],
                                      torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    (pos,) = N["LuminaTextEncode"]().encode(te, PROMPT, "alignment")
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", W, H, 2)
    # The pipeline encodes a negative prompt without system prompt, as diffusers: the node's "empty".
    (neg,) = N["LuminaTextEncode"]().encode(te, "ugly", "empty")
    for solver, cfg_trunc, renorm_cfg in (("midpoint", 0.25, 1.0), ("euler", 1.0, 0.0)):
        (node,) = N["LuminaSampler"]().sample(model, pos, neg, latent, 123, 3, 5.0, solver, 6.0, 1.0, "off",
                                              "faithful", cfg_trunc, renorm_cfg)
        out = _latent(pipe, PROMPT, negative_prompt="ugly", system_prompt="alignment", num_images_per_prompt=2,
                      seed=123, guidance_scale=5.0, solver=solver, cfg_trunc=cfg_trunc, renorm_cfg=renorm_cfg)
        assert out.shape == node["samples"].shape
        assert _close(to_vae_space(out, "flux"), node["samples"])  # the node's LATENT holds raw FLUX-AE latents


# --------------------------------------------------------------------------------------------------------------
# Files: the all-in-one checkpoint, a GGUF transformer, from_pretrained, the FLUX AE


@needs_diffusers
def test_from_single_file_reads_every_part_of_the_all_in_one_checkpoint(files):
    pipe = Lumina2Pipeline.from_single_file(files["all_in_one"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    dit = load_dit(files["all_in_one"], dtype=torch.float32)
    gemma = load_text_encoder(files["all_in_one"], dtype=torch.float32)
    cond, uncond = gemma.encode([PROMPT]), gemma.encode([""], system_prompt="empty")
    ref = sample(dit, _noise(2), cond, uncond, steps=STEPS, cfg=4.0, shift=6.0, solver="euler", cfg_trunc=1.0,
                 renorm_cfg=0.0, cfg_normalization=True)
    out = _latent(pipe, seed=2)
    assert torch.equal(out, ref)
    # The VAE under vae. in the file is the FLUX AE file it was written from.
    with torch.no_grad():
        expected = (files["vae_model"].decode(to_vae_space(out, "flux")).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(pipe.decode_latents(out, "pt"), expected)


def test_a_gguf_transformer_stays_quantized_and_samples_as_the_core(files, tmp_path):
    from lumina_core.weights.convert import convert_to_gguf
    from lumina_core.weights.quantized import QuantizedWeight

    gguf = tmp_path / "lumina2-q8_0.gguf"
    convert_to_gguf(files["dit"], gguf, qtype="q8_0")
    pipe = Lumina2Pipeline.from_files(dit=gguf, text_encoder=files["gemma2"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert any(isinstance(m, QuantizedWeight) for m in pipe.transformer.modules())
    ref = _reference(pipe, [PROMPT], [""], _noise(2))
    assert torch.equal(ref, sample(load_dit(gguf, dtype=torch.float32), _noise(2), *_texts(pipe, [PROMPT], [""]),
                                   steps=STEPS, cfg=4.0, shift=6.0, solver="euler", cfg_trunc=1.0, renorm_cfg=0.0,
                                   cfg_normalization=True))
    assert _close(_latent(pipe, seed=2), ref)


def test_from_pretrained_reads_the_diffusers_layout(files, pipe, tmp_path):
    from tests.helpers_gemma2 import make_tiny_gemma2_folder
    from tests.helpers_lumina2 import write_dit

    write_dit(tmp_path, "diffusers_sharded")  # tmp_path/transformer/ with the index json
    make_tiny_gemma2_folder(tmp_path, layout="diffusers", hidden_size=TINY["cap_feat_dim"])  # text_encoder/, tokenizer/
    if files["vae"] is not None:
        (tmp_path / "vae").mkdir()
        (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").symlink_to(files["vae"])
    loaded = Lumina2Pipeline.from_pretrained(tmp_path, torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert _close(_latent(loaded, seed=1), _latent(pipe, seed=1))
    gguf = tmp_path / "t.gguf"
    from lumina_core.weights.convert import convert_to_gguf

    convert_to_gguf(files["dit"], gguf, qtype="bf16")
    assert Lumina2Pipeline.from_pretrained(tmp_path, transformer=gguf, torch_dtype=torch.float32) is not None


def test_packaged_flux_ae_config_is_the_released_one():
    from lumina_core.image.vae import flux_ae_config

    config = flux_ae_config()
    # Facts of black-forest-labs/FLUX.1's ae.safetensors: ch 128 x (1, 2, 4, 4), 2 resnets per level, 16 latent
    # channels, no quant convolutions, scaling 0.3611 and shift 0.1159 (ComfyUI's Flux latent format has the same).
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["layers_per_block"] == 2
    assert config["latent_channels"] == 16 and config["scaling_factor"] == 0.3611 and config["shift_factor"] == 0.1159
    assert config["use_quant_conv"] is False and config["use_post_quant_conv"] is False


@needs_diffusers
def test_flux_ae_loads_in_both_layouts_and_refuses_the_sdxl_vae(tmp_path):
    from lumina_core.image.vae import VAEError, config_for_file, decode, load_vae
    from lumina_core.tiny import write_tiny_flux_ae, write_tiny_sdxl_vae

    raw = torch.randn(1, 16, 5, 7, generator=torch.Generator().manual_seed(0))
    for ldm in (True, False):
        path, reference = write_tiny_flux_ae(tmp_path / f"ae{ldm}.safetensors", seed=3, ldm_layout=ldm)
        with torch.no_grad():
            expected = (reference.decode(raw).sample / 2 + 0.5).clamp(0, 1)
        assert torch.equal(decode(load_vae(path, "flux"), raw), expected)
    sdxl, _ = write_tiny_sdxl_vae(tmp_path / "sdxl_vae.safetensors")
    with pytest.raises(VAEError, match="4 latent channels; Lumina-Image-2.0 uses the FLUX.1 AE"):
        config_for_file(sdxl, "flux")
    with pytest.raises(VAEError, match="16 latent channels.*sdxl_vae.safetensors"):
        config_for_file(tmp_path / "aeTrue.safetensors", "sdxl")


def test_lora_on_the_fused_qkv_loads_and_unloads(files, tmp_path):
    pipe = _load(files)
    dit = pipe.transformer
    before, expected = snapshot(dit), _latent(pipe, seed=2)
    entries = make_entries("lumina2", "peft", dit)
    reference = merged(dit, (entries, 0.8))
    save_file(spell(entries, "lumina2", "peft"), str(tmp_path / "lora.safetensors"))
    pipe.load_lora_weights(tmp_path / "lora.safetensors", 0.8)
    with_lora = _latent(pipe, seed=2)
    pipe.unload_lora_weights()
    assert identical(snapshot(dit), before) and torch.equal(_latent(pipe, seed=2), expected)
    pipe.transformer = reference
    assert _close(with_lora, _latent(pipe, seed=2)) and not _close(with_lora, expected, 1e-3)


def test_without_diffusers_latents_work(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    pipe = Lumina2Pipeline.from_files(dit=files["dit"], text_encoder=files["gemma2"], vae=files["vae"] or files["dit"],
                                      torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert _latent(pipe, seed=0).shape == (1, 16, H // 8, W // 8)
    with pytest.raises(ImportError, match="diffusers"):
        pipe(PROMPT, num_inference_steps=1, height=H, width=W)


# --------------------------------------------------------------------------------------------------------------
# Command line


@needs_diffusers
def test_generate_writes_pngs_of_the_flux_decode_with_the_originals_settings(files, tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import load_file

    from lumina_core.__main__ import main

    argv = ["generate", "--dit", str(files["dit"]), "--text-encoder", str(files["gemma2"]), "--vae",
            str(files["vae"]), "--prompt", PROMPT, "--negative", "blurry", "--width", "64", "--height", "32",
            "--steps", "3", "--cfg", "3.5", "--seed", "9", "--batch", "2", "--system-prompt", "A painter's assistant.",
            "--save-latent", "--out", str(tmp_path)]
    assert main(argv) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    raw = torch.cat([load_file(str(p.with_suffix(".latent")))["latent_tensor"] for p in pngs])
    with torch.no_grad():
        ref = files["vae_model"].decode(raw).sample
    for i, png in enumerate(pngs):
        expected = ((ref[i] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        with Image.open(png) as image:
            assert np.array_equal(np.asarray(image.convert("RGB")), expected)
            text = dict(image.text)
        assert "Sampler: midpoint" in text["parameters"] and "Shift: 6.0" in text["parameters"]
        assert "System prompt: A painter's assistant., CFG trunc: 0.25, Renorm CFG: 1.0" in text["parameters"]
        graph = json.loads(text["prompt"])
        encodes = [n["inputs"] for n in graph.values() if n["class_type"] == "LuminaTextEncode"]
        assert encodes[0]["system_prompt"] == "custom" and encodes[0]["custom_system_prompt"] == "A painter's assistant."
        assert encodes[1]["system_prompt"] == "empty"
        sampler = next(n["inputs"] for n in graph.values() if n["class_type"] == "LuminaSampler")
        assert (sampler["cfg_trunc"], sampler["renorm_cfg"], sampler["steps"]) == (0.25, 1.0, 3)
    pipe = _load(files)
    expected = pipe(PROMPT, negative_prompt="blurry", height=32, width=64, num_inference_steps=3, guidance_scale=3.5,
                    seed=9, num_images_per_prompt=2, solver="midpoint", system_prompt="A painter's assistant.",
                    cfg_trunc=0.25, renorm_cfg=1.0, output_type="latent").images
    assert torch.equal(raw, to_vae_space(expected, "flux"))
    assert "Lumina-Image-2.0" in capsys.readouterr().out


def test_demo_of_the_family_writes_a_16_channel_latent(tmp_path):
    from safetensors.torch import load_file

    from lumina_core.__main__ import main

    assert main(["demo", "--family", "lumina2", "--out", str(tmp_path), "--width", "48", "--height", "32",
                 "--steps", "2"]) == 0
    raw = load_file(str(tmp_path / "lumina_demo.latent"))["latent_tensor"]
    assert raw.shape == (1, 16, 4, 6) and torch.isfinite(raw).all()


def test_power_solver_grid_is_the_cores(pipe):
    """grid="power" with a few-step solver: the core sampler on `power_time_grid` (an independent formula here)."""
    s, rho, n = 4.0, 1.2, 4
    sig = [(1 - i / n) ** rho for i in range(n + 1)]
    times = torch.tensor([1 - s * x / (1 + (s - 1) * x) for x in sig], dtype=torch.float32)
    out = _latent(pipe, seed=2, num_inference_steps=n, solver="dpmpp_2m", grid="power", grid_shift=s, grid_rho=rho)
    ref = _reference(pipe, [PROMPT], [""], _noise(2), steps=n, solver="dpmpp_2m", times=times)
    assert _close(out, ref)
    assert not _close(out, _latent(pipe, seed=2, num_inference_steps=n, solver="dpmpp_2m"), rtol=1e-3)


def test_batch_cfg_false_gives_the_batched_latent(pipe):
    check_negative_apart(pipe, _latent)
