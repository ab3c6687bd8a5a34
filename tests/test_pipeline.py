"""LuminaT2IPipeline on tiny models: every call of the "Use from Python" examples, checked against the core sampler
called directly and against the Lumina Sampler node; the SDXL VAE loading through diffusers; the generate command.

Tests that decode images need diffusers (the `pipeline` extra) and are skipped without it.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from lumina_core import LuminaT2IPipeline
from lumina_core.generation import sample
from lumina_core.image.latent import SDXL_SCALING_FACTOR, to_vae_space
from lumina_core.image.vae import INSTALL_HINT
from lumina_core.sampling.schedule import make_noise
from lumina_core.tiny import make_tiny_flag_dit
from tests.helpers_dit import check_negative_apart
from tests.helpers_nodes import DIT_NAME, LLAMA_NAME, make_tiny_models

try:
    import diffusers  # noqa: F401

    HAVE_DIFFUSERS = True
except ImportError:
    HAVE_DIFFUSERS = False

needs_diffusers = pytest.mark.skipif(
    not HAVE_DIFFUSERS, reason='diffusers is not installed (pip install ".[pipeline]"): the VAE decode is not tested'
)

PROMPT = "a red cat sat on the mat"
OTHER = "the blue dog ran in the park"
H, W = 48, 64  # pixels; latent 6x8
STEPS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_models")
    paths = make_tiny_models(root)
    paths["vae"] = None
    paths["vae_model"] = None
    if HAVE_DIFFUSERS:
        from lumina_core.tiny import write_tiny_sdxl_vae

        (root / "vae").mkdir()
        paths["vae"], paths["vae_model"] = write_tiny_sdxl_vae(root / "vae" / "sdxl_vae.safetensors")
    return paths


def _load(files, **kwargs):
    pipe = LuminaT2IPipeline.from_files(
        dit=files["dit"], text_encoder=files["llama"], vae=files["vae"], torch_dtype=torch.float32, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(files):
    return _load(files)


def _latent(pipe, prompt=PROMPT, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "height": H, "width": W, "output_type": "latent", **kwargs}
    return pipe(prompt, **kwargs).images


def _reference(pipe, prompts, negatives, noise, **kwargs):
    """The core sampler called directly with the encoder's features: raw VAE latents."""
    enc = pipe.text_encoder
    cond = enc.encode(prompts)
    uncond = enc.encode(negatives) if negatives is not None else None
    settings = {"steps": STEPS, "cfg": 4.0, "shift": 4.0, **kwargs}
    return to_vae_space(sample(pipe.transformer, noise, cond, uncond, **settings))


def _close(a, b, rtol=1e-5):
    """Equal within rtol of the larger magnitude (relative to the whole tensor, as the issue's 1e-5 relative)."""
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


# --------------------------------------------------------------------------------------------------------------
# The examples of "Use from Python"


@needs_diffusers
def test_text_to_image_gives_pil_images_of_the_requested_size(pipe, files):
    image = pipe(PROMPT, num_inference_steps=STEPS, height=H, width=W, seed=0).images[0]
    assert image.size == (W, H) and image.mode == "RGB"
    # The pixels are the VAE decode of the latent the same call returns with output_type="latent".
    raw = _latent(pipe, seed=0)
    with torch.no_grad():
        ref = files["vae_model"].decode(raw).sample
    expected = ((ref / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0)
    import numpy as np

    assert np.array_equal(np.asarray(image), expected.numpy())
    pt = pipe(PROMPT, num_inference_steps=STEPS, height=H, width=W, seed=0, output_type="pt").images
    assert pt.shape == (1, 3, H, W) and 0 <= float(pt.min()) and float(pt.max()) <= 1


def test_guidance_and_steps_equal_the_core_sampler(pipe):
    out = _latent(pipe, seed=3, num_inference_steps=5, guidance_scale=7.5)
    ref = _reference(pipe, [PROMPT], [""], make_noise(3, (1, 4, H // 8, W // 8)), steps=5, cfg=7.5)
    assert out.shape == (1, 4, H // 8, W // 8) and _close(out, ref)
    # guidance_scale 1 never evaluates the negative prompt: changing it changes nothing.
    a = _latent(pipe, seed=3, guidance_scale=1.0, negative_prompt="blurry")
    b = _latent(pipe, seed=3, guidance_scale=1.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _latent(pipe, seed=3))


@pytest.mark.parametrize("height, width", [(512, 3072), (64, 32)])
def test_variable_resolution(pipe, height, width):
    # One step without guidance keeps 512x3072 (6176 tokens) quick on a CPU; the extrapolation settings still apply.
    out = _latent(pipe, seed=1, height=height, width=width, num_inference_steps=1, guidance_scale=1.0)
    ref = _reference(pipe, [PROMPT], None, make_noise(1, (1, 4, height // 8, width // 8)), steps=1, cfg=1.0)
    assert out.shape == (1, 4, height // 8, width // 8) and _close(out, ref)


@needs_diffusers
def test_variable_resolution_decodes_to_the_requested_size(pipe):
    image = pipe(PROMPT, num_inference_steps=1, height=32, width=192, seed=1, guidance_scale=1.0).images[0]
    assert image.size == (192, 32)


def test_negative_prompt_is_the_unconditional_text(pipe):
    out = _latent(pipe, seed=2, negative_prompt="blurry, low quality")
    ref = _reference(pipe, [PROMPT], ["blurry, low quality"], make_noise(2, (1, 4, H // 8, W // 8)))
    assert _close(out, ref)
    assert not torch.allclose(out, _latent(pipe, seed=2))


def test_reproducible_generator(pipe):
    a = _latent(pipe, generator=torch.Generator().manual_seed(42))
    b = _latent(pipe, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, b)
    assert not torch.allclose(a, _latent(pipe, generator=torch.Generator().manual_seed(43)))
    noise = torch.randn(1, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(42))
    assert torch.equal(a, _latent(pipe, latents=noise))


def test_batch_of_prompts_equals_the_prompts_one_by_one(pipe):
    gens = [torch.Generator().manual_seed(s) for s in (10, 11)]
    batch = _latent(pipe, [PROMPT, OTHER], generator=gens)
    for i, (prompt, seed) in enumerate(((PROMPT, 10), (OTHER, 11))):
        single = _latent(pipe, prompt, generator=torch.Generator().manual_seed(seed))
        assert _close(batch[i : i + 1], single)
    # With seed=, image i gets the nodes' noise of batch position i.
    seeded = _latent(pipe, [PROMPT, OTHER], seed=7)
    noise = make_noise(7, (2, 4, H // 8, W // 8))
    for i, prompt in enumerate((PROMPT, OTHER)):
        assert _close(seeded[i : i + 1], _latent(pipe, prompt, latents=noise[i : i + 1]))
    # num_images_per_prompt: prompt i's images are consecutive.
    four = _latent(pipe, [PROMPT, OTHER], num_images_per_prompt=2, seed=7)
    noise4 = make_noise(7, (4, 4, H // 8, W // 8))
    assert _close(four[2:3], _latent(pipe, OTHER, latents=noise4[2:3]))


def test_model_cpu_offload_moves_each_model_only_while_it_runs(files, monkeypatch):
    pipe = _load(files)
    expected = _latent(pipe, seed=4)
    pipe.enable_model_cpu_offload(device="cpu")  # the schedule is the same with a GPU; here every move is a no-op
    moves = []
    for name in ("text_encoder", "transformer"):
        model = getattr(pipe, name)
        original = model.to

        def recorder(*args, _name=name, _original=original, **kwargs):
            moves.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, "to", recorder)
    out = _latent(pipe, seed=4)
    assert torch.equal(out, expected)
    # encoder there and back for the prompt, again for the negative, then the transformer there and back.
    assert moves == ["text_encoder"] * 4 + ["transformer"] * 2
    assert pipe.device == torch.device("cpu")


def test_enable_model_cpu_offload_without_gpu_is_harmless(files):
    pipe = _load(files)
    pipe.enable_model_cpu_offload()
    assert pipe.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        assert torch.equal(_latent(pipe, seed=4), _latent(_load(files), seed=4))


def test_attention_slicing_gives_the_same_latent_in_query_chunks(files, monkeypatch):
    pipe = _load(files)
    embeds, mask, neg, neg_mask = pipe.encode_prompt(PROMPT)  # the text encoder's attention is not counted below
    text = {"prompt_embeds": embeds, "prompt_attention_mask": mask, "negative_prompt_embeds": neg,
            "negative_prompt_attention_mask": neg_mask, "seed": 5}
    expected = _latent(pipe, None, **text)
    pipe.enable_attention_slicing(5)
    lengths = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        lengths.append(q.shape[-2])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    out = _latent(pipe, None, **text)
    monkeypatch.undo()
    # 3x4 patches + 3 end-of-line tokens = 15 queries -> chunks of 5; image and text attention per chunk.
    assert lengths and set(lengths) == {5}
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    pipe.disable_attention_slicing()
    assert torch.equal(_latent(pipe, None, **text), expected)
    with pytest.raises(ValueError, match="slice_size"):
        pipe.enable_attention_slicing(0)


def test_sliced_attention_equals_unsliced_on_an_uneven_split():
    model = make_tiny_flag_dit(1)
    x = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    feats = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    t = torch.tensor([0.3, 0.7])
    full = model(x, t, feats, mask, ntk_factor=2.0, proportional_attn=True, base_seqlen=10)
    model.set_attention_slicing(7)  # 4 rows x (3 + 1) tokens = 16 queries: chunks of 7, 7, 2
    sliced = model(x, t, feats, mask, ntk_factor=2.0, proportional_attn=True, base_seqlen=10)
    assert torch.allclose(sliced, full, rtol=1e-5, atol=1e-6)
    # The prepared-text form of forward gives the same as the features form.
    assert torch.equal(model(x, t, text=model.prepare_text(feats, mask), ntk_factor=2.0, proportional_attn=True,
                             base_seqlen=10), sliced)
    with pytest.raises(ValueError, match="not both"):
        model(x, t, feats, mask, text=model.prepare_text(feats, mask))


def test_torch_compile_of_the_transformer_runs_compiled_frames(files):
    import torch._dynamo

    pipe = _load(files)
    expected = _latent(pipe, seed=6)
    graphs, calls = [], []

    def backend(gm, example_inputs):  # records each graph dynamo compiles and each call of one
        graphs.append(gm)

        def run(*args):
            calls.append(len(graphs))
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    try:
        pipe.transformer = torch.compile(pipe.transformer, backend=backend, fullgraph=True)
        out = _latent(pipe, seed=6)
    finally:
        torch._dynamo.reset()
    assert graphs, "no graph was compiled: the sampler bypassed the compiled module"
    assert len(calls) >= STEPS  # every step (one evaluation each for euler) ran a compiled graph
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_precomputed_embeddings_give_the_prompt_path_latent(files, pipe):
    embeds, mask, neg, neg_mask = pipe.encode_prompt([PROMPT, OTHER], "blurry")
    assert embeds.shape[0] == 2 and neg.shape[0] == 2 and mask.dtype == torch.bool
    expected = _latent(pipe, [PROMPT, OTHER], negative_prompt="blurry", seed=8)
    # Without the text encoder at all, as after saving the embeddings and freeing its memory.
    no_encoder = _load(files)
    no_encoder.text_encoder = None
    out = _latent(no_encoder, None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                  negative_prompt_attention_mask=neg_mask, seed=8)
    assert torch.equal(out, expected)
    # Negative embeddings omitted: the negative prompt is encoded ("" by default).
    # (embeds[:1] is padded to the longer prompt: the masked padding changes only rounding.)
    out = _latent(pipe, None, prompt_embeds=embeds[:1], prompt_attention_mask=mask[:1], seed=8)
    assert _close(out, _latent(pipe, PROMPT, seed=8))
    with pytest.raises(ValueError, match="no text encoder"):
        _latent(no_encoder, None, prompt_embeds=embeds, prompt_attention_mask=mask, seed=8)


# --------------------------------------------------------------------------------------------------------------
# The same generation as the Lumina Sampler node


def test_pipeline_latent_equals_the_lumina_sampler_node(files, pipe):
    from nodes import NODE_CLASS_MAPPINGS as N
    from nodes import model_files

    model_files.set_model_folders("diffusion_models", [files["root"] / "diffusion_models"])
    model_files.set_model_folders("text_encoders", [files["root"] / "text_encoders"])
    (te,) = N["LuminaLlamaLoader"]().load(LLAMA_NAME, "fp32")
    (model,) = N["LuminaFlagDiTLoader"]().load(DIT_NAME, "fp32")
    (pos,) = N["LuminaTextEncode"]().encode(te, PROMPT)
    (neg,) = N["LuminaTextEncode"]().encode(te, "ugly")
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", W, H, 2)
    for solver, extrapolation, guidance in (("euler", "t2i", "faithful"), ("midpoint", "time_aware", "all")):
        (node,) = N["LuminaSampler"]().sample(model, pos, neg, latent, 123, 4, 5.0, solver, 3.0, 1.0, extrapolation,
                                              guidance)
        out = _latent(pipe, PROMPT, negative_prompt="ugly", num_images_per_prompt=2, seed=123, num_inference_steps=4,
                      guidance_scale=5.0, solver=solver, shift=3.0, extrapolation=extrapolation, guidance=guidance)
        assert out.shape == node["samples"].shape
        assert _close(out, node["samples"])
        assert not _close(out * SDXL_SCALING_FACTOR, node["samples"])  # both are raw VAE latents


# --------------------------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_value_and_the_fix(pipe):
    with pytest.raises(ValueError, match=r"width 100 is not a multiple of 16 \(use 96 or 112\)"):
        _latent(pipe, width=100)
    with pytest.raises(ValueError, match="height 16 is below the minimum 32"):
        _latent(pipe, height=16)
    with pytest.raises(ValueError, match=r"3 generators for 2 images \(2 prompts x 1"):
        _latent(pipe, [PROMPT, OTHER], generator=[torch.Generator() for _ in range(3)])
    embeds, mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match="prompt_attention_mask has shape"):
        _latent(pipe, None, prompt_embeds=embeds, prompt_attention_mask=mask[:, :-1], guidance_scale=1.0)
    with pytest.raises(ValueError, match="without prompt_attention_mask"):
        _latent(pipe, None, prompt_embeds=embeds, guidance_scale=1.0)
    with pytest.raises(ValueError, match="expects 32-wide"):
        _latent(pipe, None, prompt_embeds=torch.zeros(1, 3, 16), prompt_attention_mask=torch.ones(1, 3, dtype=bool))
    with pytest.raises(ValueError, match="negative_prompt_embeds have batch 3"):
        _latent(pipe, None, prompt_embeds=embeds.expand(2, -1, -1), prompt_attention_mask=mask.expand(2, -1),
                negative_prompt_embeds=embeds.expand(3, -1, -1), negative_prompt_attention_mask=mask.expand(3, -1))
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        _latent(pipe, PROMPT, prompt_embeds=embeds, prompt_attention_mask=mask)
    with pytest.raises(ValueError, match="either seed or generator"):
        _latent(pipe, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 2, 2\), expected \(1, 4, 6, 8\)"):
        _latent(pipe, latents=torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        _latent(pipe, [PROMPT, OTHER, PROMPT], negative_prompt=["a", "b"])
    with pytest.raises(ValueError, match="output_type 'np'"):
        _latent(pipe, output_type="np")
    with pytest.raises(ValueError, match="unknown solver 'heun'"):
        _latent(pipe, solver="heun")


def test_without_diffusers_latents_work_and_images_say_what_to_install(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    pipe = LuminaT2IPipeline.from_files(dit=files["dit"], text_encoder=files["llama"],
                                        vae=files["vae"] or files["dit"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert _latent(pipe, seed=0).shape == (1, 4, H // 8, W // 8)
    with pytest.raises(ImportError, match=r'pip install "comfyui-lumina\[pipeline\]"'):
        pipe(PROMPT, num_inference_steps=1, height=H, width=W)
    assert 'output_type="latent" works without it' in INSTALL_HINT


def test_no_vae_and_missing_files(files):
    pipe = LuminaT2IPipeline.from_files(dit=files["dit"], text_encoder=files["llama"], torch_dtype=torch.float32)
    with pytest.raises(ValueError, match='no VAE: load it with vae="sdxl_vae.safetensors"'):
        pipe(PROMPT, num_inference_steps=1, height=H, width=W)
    with pytest.raises(FileNotFoundError, match="nope.safetensors does not exist"):
        LuminaT2IPipeline.from_files(dit=files["dit"], text_encoder=files["llama"], vae="nope.safetensors")


# --------------------------------------------------------------------------------------------------------------
# from_pretrained


def test_from_pretrained_folder_layout(files, pipe, tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / DIT_NAME).symlink_to(files["dit"])
    (tmp_path / "text_encoder").symlink_to(files["llama"], target_is_directory=True)
    if files["vae"] is not None:
        (tmp_path / "vae").mkdir()
        (tmp_path / "vae" / "sdxl_vae.safetensors").symlink_to(files["vae"])
    loaded = LuminaT2IPipeline.from_pretrained(tmp_path, torch_dtype=torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(_latent(loaded, seed=1), _latent(pipe, seed=1))
    assert (loaded._vae_path is not None) == (files["vae"] is not None)
    (tmp_path / "transformer" / "second.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"holds 2 .*expected exactly one.*Layout: transformer/"):
        LuminaT2IPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        LuminaT2IPipeline.from_pretrained(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------------
# The SDXL VAE through diffusers


def test_packaged_config_is_the_released_sdxl_vae():
    from lumina_core.image.vae import sdxl_vae_config

    config = sdxl_vae_config()
    # Facts of stabilityai/sdxl-vae: 4 levels of 128/256/512/512 channels, 2 resnets each, 4 latent channels, the
    # SDXL scaling factor, fp16 overflow (force_upcast).
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["layers_per_block"] == 2
    assert config["latent_channels"] == 4 and config["scaling_factor"] == SDXL_SCALING_FACTOR
    assert config["force_upcast"] is True and config["norm_num_groups"] == 32 and config["sample_size"] == 1024


def test_released_shapes_use_the_packaged_config(tmp_path):
    """A file with the released VAE's tensor shapes (only the keys the shape reading needs, stored as bytes) is read
    as exactly the packaged configuration, so the packaged folder itself is what from_single_file gets."""
    from safetensors.torch import save_file

    from lumina_core.image.vae import config_for_file, sdxl_vae_config

    tensors, cin = {}, 128
    for level, width in enumerate((128, 256, 512, 512)):
        for block in range(2):
            tensors[f"encoder.down.{level}.block.{block}.conv1.weight"] = torch.zeros(width, cin, 3, 3,
                                                                                      dtype=torch.uint8)
            cin = width
    tensors["post_quant_conv.weight"] = torch.zeros(4, 4, 1, 1, dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "sdxl_vae.safetensors"))
    assert config_for_file(tmp_path / "sdxl_vae.safetensors") == sdxl_vae_config()


@needs_diffusers
@pytest.mark.parametrize("ldm_layout", [True, False])
def test_vae_file_in_either_layout_decodes_as_the_model_it_was_written_from(tmp_path, ldm_layout):
    from lumina_core.image.vae import decode, load_sdxl_vae
    from lumina_core.tiny import write_tiny_sdxl_vae

    path, reference = write_tiny_sdxl_vae(tmp_path / "vae.safetensors", seed=3, ldm_layout=ldm_layout)
    vae = load_sdxl_vae(path)
    raw = torch.randn(2, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = (reference.decode(raw).sample / 2 + 0.5).clamp(0, 1)
    assert torch.equal(decode(vae, raw), expected)


def test_vae_files_that_are_not_an_sdxl_vae_are_refused(tmp_path, files):
    from safetensors.torch import save_file

    from lumina_core.image.vae import VAEError, config_for_file

    with pytest.raises(VAEError, match="not a VAE in the SDXL layout"):
        config_for_file(files["dit"])
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
               "post_quant_conv.weight": torch.zeros(16, 16, 1, 1)}, str(tmp_path / "flux_ae.safetensors"))
    with pytest.raises(VAEError, match="16 latent channels.*sdxl_vae.safetensors"):
        config_for_file(tmp_path / "flux_ae.safetensors")


# --------------------------------------------------------------------------------------------------------------
# Command line


@needs_diffusers
def test_generate_writes_pngs_of_the_vae_decode_with_their_settings(files, tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from lumina_core.__main__ import main

    argv = ["generate", "--dit", str(files["dit"]), "--llama", str(files["llama"]), "--vae", str(files["vae"]),
            "--prompt", PROMPT, "--negative", "blurry", "--width", "64", "--height", "32", "--steps", "2",
            "--cfg", "3.5", "--seed", "9", "--batch", "2", "--save-latent", "--out", str(tmp_path)]
    assert main(argv) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert [p.name for p in pngs] == ["lumina_00001.png", "lumina_00002.png"]
    # The returned latents, decoded as one batch (as the command decodes them) by the model the VAE file was
    # written from.
    raw = torch.cat([load_file(str(p.with_suffix(".latent")))["latent_tensor"] for p in pngs])
    with torch.no_grad():
        ref = files["vae_model"].decode(raw).sample
    for i, png in enumerate(pngs):
        expected = ((ref[i] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        with Image.open(png) as image:
            assert image.size == (64, 32)
            assert np.array_equal(np.asarray(image.convert("RGB")), expected)
            text = dict(image.text)
        assert text["parameters"].startswith(f"{PROMPT}\nNegative prompt: blurry\nSteps: 2, Sampler: euler, "
                                             f"CFG scale: 3.5, Seed: 9, Batch index: {i}, Size: 64x32")
        graph = json.loads(text["prompt"])
        sampler = next(n for n in graph.values() if n["class_type"] == "LuminaSampler")["inputs"]
        assert (sampler["seed"], sampler["steps"], sampler["cfg"]) == (9, 2, 3.5)
        assert {n["class_type"] for n in graph.values()} >= {"LuminaFlagDiTLoader", "VAEDecode", "SaveImage"}
    # The latents are the pipeline's for the same settings (the nodes' noise for seed 9).
    pipe = _load(files)
    expected_raw = pipe(PROMPT, negative_prompt="blurry", height=32, width=64, num_inference_steps=2,
                        guidance_scale=3.5, seed=9, num_images_per_prompt=2, output_type="latent").images
    assert torch.equal(load_file(str(pngs[1].with_suffix(".latent")))["latent_tensor"], expected_raw[1:2])
    # A second run numbers after the existing files instead of overwriting them.
    assert main(argv[:-2] + ["--batch", "1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "lumina_00003.png").exists()
    assert "wrote" in capsys.readouterr().out


def test_generate_refuses_bad_input_before_loading(files, tmp_path, capsys, monkeypatch):
    from lumina_core.__main__ import main

    base = ["generate", "--dit", str(files["dit"]), "--llama", str(files["llama"]), "--vae",
            str(files["vae"] or files["dit"]), "--prompt", PROMPT, "--out", str(tmp_path)]
    assert main(base + ["--width", "1000"]) == 2
    assert "width 1000 is not a multiple of 16 (use 992 or 1008)" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "diffusers", None)
    assert main(base) == 2
    assert "pip install" in capsys.readouterr().out


def test_demo_preview_png_is_the_latent_to_rgb_of_its_latent(tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from lumina_core.__main__ import main
    from lumina_core.image.latent import latent_to_rgb

    assert main(["demo", "--out", str(tmp_path), "--width", "48", "--height", "32", "--steps", "2"]) == 0
    raw = load_file(str(tmp_path / "lumina_demo.latent"))["latent_tensor"]
    expected = latent_to_rgb(raw * SDXL_SCALING_FACTOR)[0].repeat_interleave(8, 0).repeat_interleave(8, 1)
    with Image.open(tmp_path / "lumina_demo_preview.png") as image:
        assert image.size == (48, 32) and image.mode == "RGB"
        pixels = np.asarray(image)
    # The latent file holds float32 raw latents (latent / 0.13025): allow one level for the round trip.
    assert np.abs(pixels.astype(int) - expected.numpy().astype(int)).max() <= 1


def test_demo_unbatched_cfg_gives_the_batched_latent(tmp_path):
    from safetensors.torch import load_file

    from lumina_core.__main__ import main

    args = ["demo", "--width", "48", "--height", "32", "--steps", "2", "--dtype", "fp32"]
    assert main(args + ["--out", str(tmp_path / "batched")]) == 0
    assert main(args + ["--out", str(tmp_path / "apart"), "--unbatched-cfg"]) == 0
    batched, apart = (load_file(str(tmp_path / d / "lumina_demo.latent"))["latent_tensor"] for d in ("batched", "apart"))
    torch.testing.assert_close(apart, batched, rtol=1e-4, atol=1e-4)  # raw latents: the model-space ones / 0.13
    assert batched.abs().max() > 0.1


def test_callback_on_step_end_sees_every_step_and_can_stop(pipe):
    seen = []

    def callback(p, step, t, kwargs):
        assert p is pipe
        seen.append((step, round(t, 6), tuple(kwargs["latents"].shape)))

    out = _latent(pipe, seed=1, callback_on_step_end=callback, num_inference_steps=4)
    from lumina_core.sampling.schedule import time_grid

    grid = [round(float(t), 6) for t in time_grid(4, 4.0)[1:]]
    assert seen == [(i, grid[i], (1, 4, H // 8, W // 8)) for i in range(4)]
    assert out.shape == (1, 4, H // 8, W // 8)

    class Stop(Exception):
        pass

    def stop(p, step, t, kwargs):
        raise Stop(step)

    with pytest.raises(Stop):
        _latent(pipe, seed=1, callback_on_step_end=stop)


def test_batch_cfg_false_gives_the_batched_latent(pipe):
    check_negative_apart(pipe, _latent)
