"""Area and mask conditioning and Lumina Region Grid in the nodes (plain Python): conditioning entries as the core's
text by region, the merge of ComfyUI's per-branch cond entries into one forward, and the MODEL's forward with it.
The same inside a real ComfyUI: tests/integration/test_comfyui_regions.py."""

from __future__ import annotations

import types
import uuid

import pytest
import torch

from lumina_core.generation import sample
from lumina_core.image.latent import SDXL_SCALING_FACTOR
from lumina_core.models.regions import grid_regions, region_text
from lumina_core.sampling.schedule import make_noise
from lumina_core.text.gemma import GemmaTextEncoder
from nodes import NODE_CLASS_MAPPINGS as N
from nodes import comfy_model, model_files
from nodes.common import make_conditioning
from nodes.flow_model import ComfyNextDiT, TextCache, comfy_output_from_velocity, make_step
from nodes.region_grid import DEMO_CAPTIONS, grid_captions
from nodes.regions import (
    GLOBAL_CAPTION_KEY,
    POOLED,
    POOLED_MASK,
    REGION_WEIGHTS,
    entry_weights,
    merge_branches,
)
from tests.helpers_nodes import GEMMA_NAME, NEXT_DIT_NAME, TINY_HIDDEN, make_tiny_models

CELLS = grid_captions(DEMO_CAPTIONS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    paths = make_tiny_models(tmp_path_factory.mktemp("models"), lumina_next=True)
    model_files.set_model_folders("diffusion_models", [paths["root"] / "diffusion_models"])
    model_files.set_model_folders("text_encoders", [paths["root"] / "text_encoders"])
    return paths


@pytest.fixture(scope="module")
def loaded(models):
    (gemma,) = N["LuminaTextEncoderLoader"]().load(GEMMA_NAME, "fp32")
    (model,) = N["LuminaDiTLoader"]().load(NEXT_DIT_NAME, "fp32")
    return {"gemma": gemma, "model": model, "encoder": GemmaTextEncoder.from_folder(models["gemma"], dtype=torch.float32),
            "dit": comfy_model.lumina_dit(model)}


def _sample_node(model, pos, neg, latent, **over):
    args = dict(seed=3, steps=3, cfg=4.0, solver="midpoint", shift=4.0, denoise=1.0, extrapolation="time_aware",
                guidance="faithful")
    args.update(over)
    (out,) = N["LuminaSampler"]().sample(model, pos, neg, latent, **args)
    return out["samples"] * SDXL_SCALING_FACTOR


def test_region_grid_encodes_the_demo_and_the_sampler_draws_it_as_the_core(loaded):
    positive, negative = N["LuminaRegionGrid"]().encode(loaded["gemma"], 2, 2, DEMO_CAPTIONS, "")
    encode = loaded["encoder"].encode
    assert len(positive) == 4 and len(negative) == 1
    global_caption = encode([" ".join(CELLS)])
    for index, (features, extras) in enumerate(positive):
        row, column = divmod(index, 2)
        assert extras["area"] == ("percentage", 0.5, 0.5, row / 2, column / 2)  # row-major
        want = encode([CELLS[index]])
        assert torch.equal(features, want[0]) and torch.equal(extras["attention_mask"], want[1])
        assert all(torch.equal(a, b) for a, b in zip(extras[GLOBAL_CAPTION_KEY], global_caption))
    assert all(torch.equal(a, b) for a, b in zip(negative[0][1][GLOBAL_CAPTION_KEY], global_caption))

    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 64, 64, 1)
    got = _sample_node(loaded["model"], positive, negative, latent)
    cells = [encode([c]) for c in CELLS]
    uncond = region_text([(encode([""]), None)], (8, 8), pooled=global_caption)
    want = sample(loaded["dit"], make_noise(3, (1, 4, 8, 8)), global_caption, uncond, steps=3, solver="midpoint",
                  extrapolation="time_aware", regions=grid_regions(cells, 2, 2))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_region_grid_refuses_a_wrong_caption_count_and_lumina_image_2():
    handle = types.SimpleNamespace(encoder=types.SimpleNamespace(family="lumina_next"))
    with pytest.raises(ValueError, match="2 x 3 grid takes 6 captions.*hold 4"):
        N["LuminaRegionGrid"]().encode(handle, 2, 3, DEMO_CAPTIONS, "")
    handle.encoder.family = "lumina2"
    with pytest.raises(ValueError, match="no caption cross-attention"):
        N["LuminaRegionGrid"]().encode(handle, 2, 2, DEMO_CAPTIONS, "")


def _texts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 3, 4, 2][:n]
    return [(torch.randn(1, l, TINY_HIDDEN, generator=g), torch.ones(1, l, dtype=torch.bool)) for l in lengths]


def gemma(text):
    return make_conditioning(*text, family="lumina_next")


def test_area_mask_and_strength_entries_sample_as_the_cores_regions(loaded):
    """ConditioningSetArea (latent pixels, strength), ConditioningSetAreaPercentage and ConditioningSetMask
    (mask_strength), combined: the Lumina Sampler's plain path = the core's regions with the same boxes and masks."""
    a, b, c, neg = _texts(4)
    mask = torch.zeros(1, 64, 96)
    mask[:, 32:, :48] = 1.0
    positive = (
        gemma(a)  # the whole image
        + [[b[0], dict(gemma(b)[0][1], area=(8, 6, 0, 6), strength=2.0)]]  # the right half: 6 of 12 latent pixels
        + [[c[0], dict(gemma(c)[0][1], mask=mask, mask_strength=0.5, set_area_to_bounds=False)]]
    )
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 96, 64, 1)
    got = _sample_node(loaded["model"], positive, gemma(neg), latent)
    regions = [(a, None), (b, (0.5, 0.0, 1.0, 1.0), 2.0), (c, mask, 0.5)]
    want = sample(loaded["dit"], make_noise(3, (1, 4, 8, 12)), None, neg, steps=3, solver="midpoint",
                  extrapolation="time_aware", regions=regions)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    plain = _sample_node(loaded["model"], gemma(a), gemma(neg), latent)
    assert float((plain - got).abs().max()) > 1e-3


def test_combined_conditioning_without_areas_is_two_captions_over_the_whole_image(loaded):
    """ConditioningCombine of two prompts: each token mixes its attention to both captions equally (ComfyUI would
    average two predictions); two of the same prompt are that prompt."""
    a, b, neg = _texts(3, seed=2)
    (latent,) = N["LuminaEmptyLatent"]().generate("custom", 64, 32, 1)
    got = _sample_node(loaded["model"], gemma(a) + gemma(b), gemma(neg), latent)
    want = sample(loaded["dit"], make_noise(3, (1, 4, 4, 8)), None, neg, steps=3, solver="midpoint",
                  extrapolation="time_aware", regions=[(a, None), (b, None)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    twice = _sample_node(loaded["model"], gemma(a) + gemma(a), gemma(neg), latent)
    torch.testing.assert_close(twice, _sample_node(loaded["model"], gemma(a), gemma(neg), latent), rtol=1e-5,
                               atol=1e-5)


def test_entry_weights_follow_comfyuis_areas_masks_and_strengths():
    assert torch.equal(entry_weights({}, (2, 3)), torch.ones(1, 2, 3))
    w = entry_weights({"area": (1, 2, 1, 1), "strength": 0.5}, (2, 3))
    assert w.tolist() == [[[0, 0, 0], [0, 0.5, 0.5]]]
    # ComfyUI rounds a percentage area to latent pixels: round(0.34 * 3) = 1 wide at round(0.5 * 3) = 2.
    assert entry_weights({"area": ("percentage", 1.0, 0.34, 0.0, 0.5)}, (2, 3)).tolist() == [[[0, 0, 1], [0, 0, 1]]]
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert entry_weights({"mask": mask, "mask_strength": 2.0}, (2, 2)).tolist() == [[[2, 0], [0, 2]]]
    # An area beyond the latent covers nothing there (ComfyUI would fail to crop it).
    assert entry_weights({"area": (8, 8, 16, 16)}, (4, 4)).sum() == 0


class Cond:
    """Stands in for ComfyUI's CONDRegular (what the merge reads and builds)."""

    def __init__(self, cond):
        self.cond = cond


def _entry(text, **extras):
    features, mask = text
    return {"model_conds": {"c_crossattn": Cond(features), "attention_mask": Cond(mask.long())}, "uuid": uuid.uuid4(),
            **extras}


def test_merge_puts_each_branch_in_one_entry_and_pads_them_alike():
    a, b, neg = _texts(3)
    x = torch.zeros(2, 4, 4, 6)
    pos = [_entry(a, area=(4, 3, 0, 0)), _entry(b, area=(4, 3, 0, 3), strength=2.0)]
    negative = [_entry(neg)]
    # ComfyUI gives the negative a copy of itself for every area of the positive (create_cond_with_same_area_if_none).
    negative.append(dict(pos[1], model_conds=dict(negative[0]["model_conds"])))
    merged = merge_branches([pos, negative], x, torch.tensor([0.5, 0.5]), Cond)
    assert [len(m) for m in merged] == [1, 1]
    (p,), (n,) = merged
    assert set(p["model_conds"]) == set(n["model_conds"]) == {"c_crossattn", "attention_mask", REGION_WEIGHTS, POOLED,
                                                               POOLED_MASK}
    for key in p["model_conds"]:  # the same shapes: ComfyUI batches the two branches into one call
        assert p["model_conds"][key].cond.shape == n["model_conds"][key].cond.shape, key
    assert p["model_conds"]["c_crossattn"].cond.shape == (2, 2, 5, TINY_HIDDEN)
    weights = p["model_conds"][REGION_WEIGHTS].cond
    assert weights[0, 0, :, :3].eq(1).all() and weights[0, 0, :, 3:].eq(0).all() and weights[0, 1, :, 3:].eq(2).all()
    # The negative's copy shares its text: one region, weight 1 everywhere and 1 + 2 in the copied area.
    n_weights = n["model_conds"][REGION_WEIGHTS].cond
    assert n_weights[0, 0, :, :3].eq(1).all() and n_weights[0, 0, :, 3:].eq(3).all() and n_weights[0, 1].eq(0).all()
    assert "area" not in p and "strength" not in p
    # The global caption: both positive captions' tokens together; the negative's own.
    pooled = p["model_conds"][POOLED].cond[0]
    assert torch.equal(pooled[:8], torch.cat([a[0][0], b[0][0]])) and p["model_conds"][POOLED_MASK].cond[0].sum() == 8
    # The same entries at the next step: the same uuid (the generation's text cache finds its text).
    again = merge_branches([pos, negative], x, torch.tensor([0.4, 0.4]), Cond)
    assert again[0][0]["uuid"] == p["uuid"] and again[1][0]["uuid"] == n["uuid"]


def test_merge_leaves_plain_conditioning_and_controlnets_to_comfyui_and_honours_timestep_ranges():
    a, b = _texts(2)
    x = torch.zeros(1, 4, 4, 4)
    sigma = torch.tensor([0.5])
    assert merge_branches([[_entry(a)], [_entry(b)]], x, sigma, Cond) is None
    assert merge_branches([[_entry(a, area=(2, 2, 0, 0), control=object())], None], x, sigma, Cond) is None
    later = _entry(b, area=(2, 4, 2, 0), timestep_start=0.4)  # active from sigma 0.4 on
    merged = merge_branches([[_entry(a), later], None], x, sigma, Cond)
    assert merged[1] is None and merged[0][0]["model_conds"]["c_crossattn"].cond.shape[1] == 1
    merged = merge_branches([[_entry(a), later], None], x, torch.tensor([0.3]), Cond)
    assert merged[0][0]["model_conds"]["c_crossattn"].cond.shape[1] == 2


def test_the_models_forward_with_merged_conds_is_the_cores_text_by_region(loaded):
    """ComfyUI's call of the MODEL with the merged model conds = the core's forward with the same regions."""
    dit = loaded["dit"]
    wrapped = ComfyNextDiT(dit.config, dtype=torch.float32)
    wrapped.load_state_dict(dit.state_dict())
    a, b, neg = _texts(3, seed=1)
    x = torch.randn(4, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    pos = [_entry(a, area=(6, 4, 0, 0)), _entry(b, area=(6, 4, 0, 4))]
    merged = merge_branches([pos, [_entry(neg)]], x[:2], torch.tensor([0.6, 0.6]), Cond)
    conds = {k: torch.cat([m[0]["model_conds"][k].cond for m in merged]) for k in merged[0][0]["model_conds"]}
    sigma = torch.full((4,), 0.6)
    options = {"uuids": [1, 2], "cond_or_uncond": [0, 1], "lumina_text_cache": TextCache()}
    got = wrapped(x, sigma, context=conds.pop("c_crossattn"), attention_mask=conds.pop("attention_mask"),
                  transformer_options=options, **conds)
    cond = region_text([(a, (0, 0, 0.5, 1)), (b, (0.5, 0, 1, 1))], (6, 8))
    text = dit.prepare_regions([cond, neg], 2)
    extrapolation = make_step(dit, x, sigma, torch.zeros(4, 1, TINY_HIDDEN), None, {}).extrapolation
    want = comfy_output_from_velocity(dit.forward_with_text(x, 1 - sigma, text, **extrapolation))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert options["lumina_text_cache"].prepared == 1
