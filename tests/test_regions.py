"""Text by region (Lumina-Next's compositional generation, `lumina_core.models.regions`): grids against a plain
re-implementation of the original, one whole-image region against plain generation, the weights of boxes, masks and
strengths, the Flag-DiT extension."""

import math

import pytest
import torch

from lumina_core.generation import sample
from lumina_core.models.regions import (
    box_weights,
    grid_boxes,
    grid_regions,
    mask_weights,
    region_cross_attention,
    region_text,
    token_weights,
)
from lumina_core.tiny import make_tiny_next_dit
from tests.helpers_dit import make_tiny_flag_dit, random_text
from tests.reference_compositional import (
    compositional_demo,
    compositional_forward,
    original_region_id,
    row_major_region_id,
)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def texts(cap, n, seed=4):
    """n captions of different lengths, each (features [1, L, D], mask [1, L])."""
    lengths = [6, 4, 3, 5, 2, 6][:n]
    feats, mask = random_text(n, 6, cap, seed=seed, lengths=lengths)
    return [(feats[i:i + 1, :l], mask[i:i + 1, :l]) for i, l in enumerate(lengths)]


def one(caption):
    return caption[0][0], caption[1][0]


@pytest.fixture(scope="module")
def next_dit():
    return make_tiny_next_dit(seed=2)


class CountingRegions:
    """Counts prepare_regions calls of a DiT (so that a test knows the text by region was used)."""

    def __init__(self, model):
        self.calls = 0
        original = model.prepare_regions

        def counted(*a, **k):
            self.calls += 1
            return original(*a, **k)

        model.prepare_regions = counted


@pytest.mark.parametrize("make", [lambda: make_tiny_next_dit(seed=2), lambda: make_tiny_flag_dit(seed=1)],
                         ids=["next_dit", "flag_dit"])
@pytest.mark.parametrize("region", [None, (0.0, 0.0, 1.0, 1.0), "mask"])
def test_one_whole_image_region_equals_plain_generation_bit_for_bit(make, region):
    model = make()
    counter = CountingRegions(model)
    cond, uncond = texts(model.config.cap_feat_dim, 2)
    z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    if region == "mask":
        region = torch.ones(64, 96)
    plain = sample(model, z, cond, uncond, steps=3, solver="midpoint")
    by_region = sample(model, z, None, uncond, steps=3, solver="midpoint", regions=[(cond, region)])
    assert counter.calls == 1
    assert torch.equal(by_region, plain)


@pytest.mark.parametrize("rows, cols", [(1, 2), (2, 1)])
def test_a_1x2_and_2x1_grid_give_the_original_compositional_output(next_dit, rows, cols):
    """The demo's settings (midpoint, cfg 4, shift 4, proportional attention; 16 grid points instead of 30 to keep
    the float64 reference short), its negative (adaLN from the global caption too) and its numbering, which is
    row-major for one row or column."""
    c1, c2, negative, global_caption = texts(next_dit.config.cap_feat_dim, 4)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    want = compositional_demo(next_dit, z, [one(c1), one(c2)], one(negative), one(global_caption), rows, cols,
                              num_steps=16, cfg=4.0, t_shift=4.0, region_id=original_region_id)
    uncond = region_text([(negative, None)], z.shape[-2:], pooled=global_caption)
    got = sample(next_dit, z, global_caption, uncond, steps=15, regions=grid_regions([c1, c2], rows, cols))
    assert rel(got, want) < 1e-5
    # The regions matter: the same captions without them are another image.
    assert rel(sample(next_dit, z, global_caption, negative), want) > 0.1


def test_a_2x2_grid_numbers_its_cells_row_major(next_dit):
    captions = texts(next_dit.config.cap_feat_dim, 6)
    cells, (negative, global_caption) = captions[:4], captions[4:]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    args = ([one(c) for c in cells], one(negative), one(global_caption), 2, 2)
    want = compositional_demo(next_dit, z, *args, num_steps=6, cfg=4.0, t_shift=4.0, region_id=row_major_region_id)
    uncond = region_text([(negative, None)], z.shape[-2:], pooled=global_caption)
    got = sample(next_dit, z, global_caption, uncond, steps=5, regions=grid_regions(cells, 2, 2))
    assert rel(got, want) < 1e-5
    # The original's numbering gives the bottom-left cell the second caption and never uses the third.
    assert [original_region_id(h, w, 2, 2) for h in range(2) for w in range(2)] == [0, 1, 1, 3]
    x = torch.cat([z, z])
    t = torch.full((2,), 0.3)
    ours = compositional_forward(next_dit, x, t, *args, region_id=row_major_region_id)
    theirs = compositional_forward(next_dit, x, t, *args, region_id=original_region_id)
    assert rel(ours, theirs) > 1e-2


def test_a_forward_by_region_equals_the_reference(next_dit):
    """One evaluation, a 1 x 3 grid on a latent the grid does not divide into patches: a partly covered patch mixes
    its two captions (the reference with row-major numbering covers whole cells only, so compare a divisible one)."""
    c1, c2, c3, negative, global_caption = texts(next_dit.config.cap_feat_dim, 5)
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([0.4, 0.4])
    cond = region_text(grid_regions([c1, c2, c3], 1, 3), x.shape[-2:], pooled=global_caption)
    uncond = region_text([(negative, None)], x.shape[-2:], pooled=global_caption)
    text = next_dit.prepare_regions([cond, uncond], 1)
    got = next_dit.forward_with_text(x, t, text)
    want = compositional_forward(next_dit, x, t, [one(c1), one(c2), one(c3)], one(negative), one(global_caption),
                                 1, 3, region_id=row_major_region_id)
    assert rel(got, want) < 1e-5


def test_box_weights_cover_latent_pixels_by_their_share():
    w = box_weights((0.25, 0.0, 0.5, 0.5), 2, 8)
    assert w.tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]
    third = box_weights((0.0, 0.0, 1 / 3, 1.0), 1, 4)
    assert third[0].tolist() == pytest.approx([1.0, 1 / 3, 0.0, 0.0])
    # A grid that divides the latent gives exact 0s and 1s, each pixel in one cell.
    cells = torch.stack([box_weights(b, 6, 9) for b in grid_boxes(3, 3)])
    assert set(cells.unique().tolist()) == {0.0, 1.0} and torch.equal(cells.sum(0), torch.ones(6, 9))
    assert cells[5].nonzero().tolist() == [[2, 6], [2, 7], [2, 8], [3, 6], [3, 7], [3, 8]]  # row 1, column 2
    with pytest.raises(ValueError, match="left, top, right, bottom"):
        box_weights((0.5, 0.0, 0.25, 1.0), 4, 4)


def test_masks_are_resized_to_the_latent_and_strength_scales():
    mask = torch.zeros(64, 64)
    mask[:, 32:] = 1.0
    text = region_text([(torch.randn(1, 3, 8), mask, 0.5)], (8, 8))
    assert text.weights.shape == (1, 1, 8, 8)
    assert torch.equal(text.weights[0, 0, :, 4:], torch.full((8, 4), 0.5)) and text.weights[0, 0, :, :4].sum() == 0
    # The default global caption is every region caption's tokens together.
    a, b = torch.randn(1, 3, 8), torch.randn(1, 2, 8)
    text = region_text([(a, None), (b, (0.0, 0.0, 0.5, 1.0))], (4, 4))
    assert torch.equal(text.pooled_feats, torch.cat([a, b], dim=1)) and text.pooled_mask.all()
    assert text.feats.shape == (1, 2, 3, 8) and text.mask[0, 1].tolist() == [True, True, False]
    assert mask_weights(torch.ones(2, 5, 5), 3, 3).shape == (2, 3, 3)


def test_token_weights_average_patches_and_end_of_line_tokens_average_their_row():
    w = torch.tensor([[1.0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]])[None, None]
    assert token_weights(w, 2).tolist() == [[[1.0, 0.0, 0.75]]]
    assert token_weights(w, 2, end_of_line=True)[0, 0].tolist() == pytest.approx([1.0, 0.0, 0.75, 1.75 / 3])


def test_region_cross_attention_mixes_each_regions_own_attention_by_normalised_weight():
    g = torch.Generator().manual_seed(0)
    b, r, heads, lq, lt, d = 2, 3, 2, 5, 4, 8
    q = torch.randn(b, heads, lq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b * r, heads, lt, d, generator=g, dtype=torch.float64)
    v = torch.randn(b * r, heads, lt, d, generator=g, dtype=torch.float64)
    mask = torch.ones(b * r, 1, 1, lt, dtype=torch.bool)
    mask[1, ..., 2:] = False
    weights = torch.rand(b, r, lq, generator=g, dtype=torch.float64)
    weights[0, :, 4] = 0  # a token no region covers
    got = region_cross_attention(lambda q_, k_, v_, mask: torch.nn.functional.scaled_dot_product_attention(
        q_, k_, v_, attn_mask=mask), q, k, v, mask, weights)
    for i in range(b):
        for token in range(lq):
            total = torch.zeros(heads, d, dtype=torch.float64)
            for j in range(r):
                keep = mask[i * r + j, 0, 0]
                logits = torch.einsum("hd,hld->hl", q[i, :, token], k[i * r + j][:, keep]) / math.sqrt(d)
                attended = torch.einsum("hl,hld->hd", logits.softmax(-1), v[i * r + j][:, keep])
                total += float(weights[i, j, token]) * attended
            norm = float(weights[i, :, token].sum())
            want = total / norm if norm > 0 else total
            assert torch.allclose(got[i, :, token].double(), want, atol=1e-6), (i, token)


def test_the_flag_dit_takes_regions_too():
    """The Flag-DiT has the same gated caption attention: two regions of one caption are that caption (the mixture
    is normalised), two captions are another image."""
    model = make_tiny_flag_dit(seed=1)
    cond, other, uncond = texts(model.config.cap_feat_dim, 3)
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    plain = sample(model, z, cond, uncond, steps=3)
    halves = sample(model, z, cond, uncond, steps=3, regions=[(cond, (0, 0, 0.5, 1)), (cond, (0.5, 0, 1, 1))])
    assert rel(halves, plain) < 1e-5
    mixed = sample(model, z, cond, uncond, steps=3, regions=[(cond, (0, 0, 0.5, 1)), (other, (0.5, 0, 1, 1))])
    assert rel(mixed, plain) > 1e-3


def test_regions_of_another_latent_size_and_dits_without_caption_attention_are_refused(next_dit):
    cond, uncond = texts(next_dit.config.cap_feat_dim, 2)
    text = next_dit.prepare_regions([region_text([(cond, None)], (8, 8))], 1)
    with pytest.raises(ValueError, match="laid out for 16 image tokens, this latent has 24"):
        next_dit.forward_with_text(torch.randn(1, 4, 8, 12), torch.tensor([0.5]), text)
    with pytest.raises(ValueError, match="2 x 2 grid takes 4 captions"):
        grid_regions([cond], 2, 2)

    class OneCaption:
        family = "lumina_next"

        def __call__(self, *a, **k):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="text by region needs a Flag-DiT or Next-DiT"):
        sample(OneCaption(), torch.zeros(1, 4, 8, 8), None, uncond, regions=[(cond, None)])
