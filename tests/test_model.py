"""Flag-DiT architecture checks against the released key list (SPEC.md §2) and independent references."""

import math

import pytest
import torch

from lumina_core import FLAG_DIT_5B, FlagDiT, FlagDiTConfig
from lumina_core.models.layers import apply_rope, rope_cos_sin
from tests.helpers_dit import make_tiny_flag_dit, random_text
from tests.reference_flag_dit import reference_forward


def released_key_shapes():
    """The 688 tensors of consolidated.00-of-01.safetensors, written out from the published listing."""
    d, h, cap, ada, ffn, layers = 3072, 32, 4096, 1024, 8192, 32
    keys = {
        "x_embedder.weight": (d, 16),
        "x_embedder.bias": (d,),
        "t_embedder.mlp.0.weight": (ada, 256),
        "t_embedder.mlp.0.bias": (ada,),
        "t_embedder.mlp.2.weight": (ada, ada),
        "t_embedder.mlp.2.bias": (ada,),
        "cap_embedder.0.weight": (cap,),
        "cap_embedder.0.bias": (cap,),
        "cap_embedder.1.weight": (ada, cap),
        "cap_embedder.1.bias": (ada,),
        "final_layer.linear.weight": (32, d),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, ada),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
        "eol_token": (d,),
        "pad_token": (d,),
    }
    for n in range(layers):
        p = f"layers.{n}."
        for w in ("wq", "wk", "wv", "wo"):
            keys[p + f"attention.{w}.weight"] = (d, d)
        keys[p + "attention.wk_y.weight"] = (d, cap)
        keys[p + "attention.wv_y.weight"] = (d, cap)
        keys[p + "attention.gate"] = (h,)
        for nrm in ("q_norm", "k_norm", "ky_norm"):
            keys[p + f"attention.{nrm}.weight"] = (d,)
            keys[p + f"attention.{nrm}.bias"] = (d,)
        keys[p + "feed_forward.w1.weight"] = (ffn, d)
        keys[p + "feed_forward.w3.weight"] = (ffn, d)
        keys[p + "feed_forward.w2.weight"] = (d, ffn)
        keys[p + "attention_norm.weight"] = (d,)
        keys[p + "ffn_norm.weight"] = (d,)
        keys[p + "attention_y_norm.weight"] = (cap,)
        keys[p + "adaLN_modulation.1.weight"] = (6 * d, ada)
        keys[p + "adaLN_modulation.1.bias"] = (6 * d,)
    return keys


def test_5b_config_matches_released_keys_and_parameter_count():
    expected = released_key_shapes()
    assert len(expected) == 688
    with torch.device("meta"):
        model = FlagDiT(FLAG_DIT_5B)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == 5_046_643_744
    assert FLAG_DIT_5B.head_dim == 96 and FLAG_DIT_5B.ffn_hidden_dim == 8192 and FLAG_DIT_5B.adaln_dim == 1024


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=100, n_heads=3), "divisible by n_heads"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
        (dict(dim=60, n_heads=4), "must be even"),
        (dict(n_layers=0), "n_layers must be a positive integer"),
    ],
)
def test_config_invariants(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FlagDiTConfig(**kwargs)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(n_heads=4, n_kv_heads=2), dict(qk_norm=False, learn_sigma=False), dict(cap_feat_dim=48)],
)
def test_forward_matches_independent_reference(overrides):
    model = make_tiny_flag_dit(seed=1, **overrides)
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 6, generator=gen)
    t = torch.tensor([0.1, 0.8])
    feats, mask = random_text(2, 5, cfg.cap_feat_dim, seed=3, lengths=[5, 3])
    out = model(x, t, feats, mask)
    ref = reference_forward(model, x, t, feats, mask)
    assert out.shape == (2, 4, 8, 6)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_extrapolation_arguments_match_reference():
    model = make_tiny_flag_dit(seed=4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])
    feats, mask = random_text(1, 4, model.config.cap_feat_dim, seed=1)
    L = 4 * 5
    out = model(x, t, feats, mask, ntk_factor=2.5, proportional_attn=True, base_seqlen=7, rope_scaling_factor=1.5)
    scale = math.sqrt(math.log(L, 7) / model.config.head_dim)
    ref = reference_forward(model, x, t, feats, mask, ntk_factor=2.5, softmax_scale=scale, rope_scaling_factor=1.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_rope_dot_product_depends_only_on_position_difference_and_matches_formula():
    head_dim, L = 16, 40
    cos, sin = rope_cos_sin(L, head_dim, theta=10000.0)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(head_dim, generator=gen)
    k = torch.randn(head_dim, generator=gen)
    # Same vectors at every position: [1, L, 1, D].
    qr = apply_rope(q.expand(1, L, 1, head_dim), cos, sin)[0, :, 0]
    kr = apply_rope(k.expand(1, L, 1, head_dim), cos, sin)[0, :, 0]
    dots = qr @ kr.T  # dots[m, n] = <R_m q, R_n k>
    for shift in (0, 3, 17):
        diag = torch.diagonal(dots, offset=shift)
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=0, atol=1e-4)
    # Direct formula: pair k rotated by angle p * 10000^(-2k/D).
    p = 7
    ang = p * 10000.0 ** (-2 * torch.arange(head_dim // 2, dtype=torch.float64) / head_dim)
    qe, qo = q[0::2].double(), q[1::2].double()
    expect = torch.stack([qe * torch.cos(ang) - qo * torch.sin(ang), qe * torch.sin(ang) + qo * torch.cos(ang)], -1)
    torch.testing.assert_close(qr[p].double(), expect.flatten(), rtol=0, atol=1e-5)


def test_masked_text_tokens_do_not_change_the_output():
    model = make_tiny_flag_dit(seed=5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.3])
    feats, mask = random_text(1, 6, model.config.cap_feat_dim, seed=2)
    base = model(x, t, feats, mask)
    junk = torch.randn(1, 5, model.config.cap_feat_dim) * 100
    padded = model(x, t, torch.cat([feats, junk], 1), torch.cat([mask, torch.zeros(1, 5, dtype=torch.bool)], 1))
    torch.testing.assert_close(padded, base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_chunk", [None, 16])
def test_inference_in_place_gives_the_same_bits_as_the_autograd_forward(dtype, query_chunk):
    """Without autograd the blocks modulate and gate their fresh tensors in place: the same operations, so the
    same bits as the forward autograd records (which computes each into a new tensor)."""
    model = make_tiny_flag_dit(seed=5).to(dtype)
    model.set_attention_slicing(query_chunk)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 10, generator=gen).to(dtype)
    t = torch.tensor([0.2, 0.7])
    feats, mask = random_text(2, 6, model.config.cap_feat_dim, seed=2, lengths=[6, 3])
    with torch.enable_grad():  # the out-of-place path is chosen by the grad mode, whatever requires grad
        recorded = model(x, t, feats, mask)
    with torch.no_grad():
        inference = model(x, t, feats, mask)
    assert torch.equal(inference, recorded)


def test_batch_items_equal_items_run_alone():
    model = make_tiny_flag_dit(seed=6)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 10, generator=gen)
    t = torch.tensor([0.0, 0.4, 0.9])
    feats, mask = random_text(3, 7, model.config.cap_feat_dim, seed=4, lengths=[7, 2, 5])
    batch = model(x, t, feats, mask)
    for i in range(3):
        alone = model(x[i:i + 1], t[i:i + 1], feats[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-5)


def test_non_square_latent_runs_and_keeps_its_orientation():
    model = make_tiny_flag_dit(seed=7)
    x = torch.randn(1, 4, 48, 32)
    feats, mask = random_text(1, 3, model.config.cap_feat_dim)
    out = model(x, torch.tensor([0.5]), feats, mask)
    assert out.shape == (1, 4, 48, 32) and torch.isfinite(out).all()


def test_ntk_one_is_the_plain_path_and_forward_keeps_no_state():
    model = make_tiny_flag_dit(seed=8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([0.6])
    feats, mask = random_text(1, 4, model.config.cap_feat_dim, seed=6)
    plain = model(x, t, feats, mask)
    ntk2 = model(x, t, feats, mask, ntk_factor=2.0)
    assert not torch.allclose(ntk2, plain, atol=1e-4)
    again = model(x, t, feats, mask, ntk_factor=1.0)
    assert torch.equal(again, plain)


def test_proportional_attention_at_base_length_is_the_plain_scale():
    model = make_tiny_flag_dit(seed=9)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    feats, mask = random_text(1, 4, model.config.cap_feat_dim, seed=8)
    L = (8 // 2) * (8 // 2 + 1)
    plain = model(x, torch.tensor([0.2]), feats, mask)
    prop = model(x, torch.tensor([0.2]), feats, mask, proportional_attn=True, base_seqlen=L)
    torch.testing.assert_close(prop, plain, rtol=1e-5, atol=1e-6)
    other = model(x, torch.tensor([0.2]), feats, mask, proportional_attn=True, base_seqlen=4 * L)
    assert not torch.allclose(other, plain, atol=1e-4)


def test_bf16_weights_keep_norms_in_fp32_and_track_fp32():
    model = make_tiny_flag_dit(seed=10)
    bf16 = make_tiny_flag_dit(seed=10, dtype=torch.bfloat16)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    feats, mask = random_text(1, 4, model.config.cap_feat_dim, seed=10)
    ref = model(x, torch.tensor([0.5]), feats, mask)
    out = bf16(x, torch.tensor([0.5]), feats, mask)
    assert out.dtype == torch.float32  # returned in the caller's dtype
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05


@pytest.mark.parametrize(
    "shape, message", [((1, 16, 8, 8), "16 channels"), ((1, 4, 7, 8), "multiple of the patch size")]
)
def test_bad_latents_are_refused(shape, message):
    model = make_tiny_flag_dit()
    feats, mask = random_text(1, 3, model.config.cap_feat_dim)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape), torch.tensor([0.5]), feats, mask)


def test_text_width_mismatch_names_both_sides():
    model = make_tiny_flag_dit()
    feats, mask = random_text(1, 3, 2048)
    with pytest.raises(ValueError, match=r"2048.*32|cap_feat_dim"):
        model(torch.zeros(1, 4, 8, 8), torch.tensor([0.5]), feats, mask)


@pytest.mark.parametrize("pixels", [(512, 4096), (2048, 2048)], ids=["4096x512", "2048x2048"])
def test_extreme_sizes_run_with_rope_computed_on_the_fly(pixels):
    model = make_tiny_flag_dit(seed=11)
    h, w = pixels[0] // 8, pixels[1] // 8
    feats, mask = random_text(1, 3, model.config.cap_feat_dim)
    tokens = (h // 2) * (w // 2 + 1)
    ntk = (h // 2) * (w // 2) / 64**2
    out = model(torch.randn(1, 4, h, w), torch.tensor([0.5]), feats, mask, ntk_factor=ntk, proportional_attn=True,
                base_seqlen=4224)
    assert tokens > 4224 and out.shape == (1, 4, h, w) and torch.isfinite(out).all()


def test_forward_traces_as_one_graph_for_torch_compile():
    # backend="eager" runs dynamo's tracing only: fullgraph=True fails on any graph break.
    torch._dynamo.reset()
    model = make_tiny_flag_dit(seed=12)
    feats, mask = random_text(2, 5, model.config.cap_feat_dim, lengths=[5, 3])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.7])
    kwargs = dict(ntk_factor=2.0, proportional_attn=True, base_seqlen=20)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t, feats, mask, **kwargs), model(x, t, feats, mask, **kwargs))
    text = model.prepare_text(feats, mask)
    step = torch.compile(model.forward_with_text, fullgraph=True, backend="eager")
    torch.testing.assert_close(step(x, t, text, **kwargs), model.forward_with_text(x, t, text, **kwargs))
