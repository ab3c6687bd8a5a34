"""Next-DiT architecture checks against the original's key list (SPEC.md §8) and an independent reference."""

import math

import pytest
import torch

from lumina_core.models.config import NEXT_DIT_2B, NEXT_DIT_2B_GQA, NextDiTConfig
from lumina_core.models.layers import apply_rope, rope_2d_cos_sin
from lumina_core.models.next_dit import NextDiT
from lumina_core.tiny import make_tiny_next_dit
from tests.helpers_dit import random_text
from tests.reference_next_dit import reference_forward


def original_key_shapes(kv_heads):
    """The 567 tensors of the original NextDiT_2B(_GQA)_patch2 with qk_norm and Gemma-2B features, written out
    from the original constructor."""
    d, heads, cap, ada, ffn, layers, hd = 2304, 32, 2048, 1024, 6144, 24, 72
    kv = kv_heads * hd
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
        "final_layer.adaLN_modulation.1.weight": (d, ada),
        "final_layer.adaLN_modulation.1.bias": (d,),
        "pad_token": (d,),
    }
    for n in range(layers):
        p = f"layers.{n}."
        keys[p + "attention.wq.weight"] = (d, d)
        keys[p + "attention.wk.weight"] = (kv, d)
        keys[p + "attention.wv.weight"] = (kv, d)
        keys[p + "attention.wo.weight"] = (d, d)
        keys[p + "attention.wk_y.weight"] = (kv, cap)
        keys[p + "attention.wv_y.weight"] = (kv, cap)
        keys[p + "attention.gate"] = (heads,)
        for name, width in (("q_norm", d), ("k_norm", kv), ("ky_norm", kv)):
            keys[p + f"attention.{name}.weight"] = (width,)
            keys[p + f"attention.{name}.bias"] = (width,)
        keys[p + "feed_forward.w1.weight"] = (ffn, d)
        keys[p + "feed_forward.w3.weight"] = (ffn, d)
        keys[p + "feed_forward.w2.weight"] = (d, ffn)
        for name in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
            keys[p + f"{name}.weight"] = (d,)
        keys[p + "attention_y_norm.weight"] = (cap,)
        keys[p + "adaLN_modulation.1.weight"] = (4 * d, ada)
        keys[p + "adaLN_modulation.1.bias"] = (4 * d,)
    return keys


@pytest.mark.parametrize(
    "config, kv_heads, params",
    [(NEXT_DIT_2B, 32, 1_988_524_576), (NEXT_DIT_2B_GQA, 8, 1_627_386_400)],
    ids=["32kv", "8kv_gqa"],
)
def test_2b_config_matches_original_keys_and_parameter_count(config, kv_heads, params):
    expected = original_key_shapes(kv_heads)
    assert len(expected) == 567
    with torch.device("meta"):
        model = NextDiT(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert sum(p.numel() for p in model.parameters()) == params
    assert config.head_dim == 72 and config.ffn_hidden_dim == 6144 and model.family == "lumina_next"


def test_config_invariants():
    with pytest.raises(ValueError, match="multiple of 4 for 2-D RoPE"):
        NextDiTConfig(dim=96, n_heads=16)  # head_dim 6
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        NextDiTConfig(dim=64, n_heads=4, n_kv_heads=3)


def test_2d_rope_pairs_follow_rows_and_columns():
    head_dim, rows, cols = 16, 3, 5
    cos, sin = rope_2d_cos_sin(rows, cols, head_dim, theta=100.0, ntk_factor=2.0, linear_factor=3.0)
    angles = torch.atan2(sin, cos).double()
    for r in range(rows):
        for c in range(cols):
            for i in range(head_dim // 4):
                f = 1.0 / (200.0 ** (4 * i / head_dim)) / 3.0
                for pair, pos in ((2 * i, r), (2 * i + 1, c)):
                    want = math.atan2(math.sin(pos * f), math.cos(pos * f))
                    assert abs(float(angles[r * cols + c, pair]) - want) < 1e-5
    # The rotation preserves norms and makes dot products depend on the offset only.
    q = torch.randn(1, rows * cols, 1, head_dim)
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def _rel(out, ref):
    return float((out.double() - ref).abs().max() / ref.abs().max())


CASES = {
    "plain": dict(),
    "proportional": dict(proportional_attn=True, base_seqlen=7),
    "time_aware_linear": dict(scale_factor=1.7, scale_watershed=0.5),  # t[0] = 0.2 < 0.5: linear scaling
    "time_aware_ntk": dict(scale_factor=1.7, scale_watershed=0.1),  # t[0] = 0.2 >= 0.1: NTK
    "time_aware_and_proportional": dict(scale_factor=2.3, scale_watershed=0.3, proportional_attn=True,
                                        base_seqlen=16),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("size", [(8, 8), (6, 10)], ids=["square", "non_square"])
def test_forward_matches_independent_reference(case, size):
    model = make_tiny_next_dit(seed=1)
    cfg = model.config
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, *size, generator=gen)
    t = torch.tensor([0.2, 0.8])
    feats, mask = random_text(2, 6, cfg.cap_feat_dim, seed=3, lengths=[6, 3])  # the second caption is padded
    out = model(x, t, feats, mask, **CASES[case])
    ref = reference_forward(model, x, t, feats, mask, **CASES[case])
    assert out.shape == (2, 4) + size
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize(
    "overrides", [dict(n_kv_heads=None), dict(n_heads=2, n_kv_heads=1, dim=32), dict(learn_sigma=False)],
    ids=["no_gqa", "one_kv_head", "no_sigma"],
)
def test_variants_match_reference(overrides):
    model = make_tiny_next_dit(seed=4, **overrides)
    x = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(5))
    feats, mask = random_text(1, 4, model.config.cap_feat_dim, seed=6)
    t = torch.tensor([0.6])
    assert _rel(model(x, t, feats, mask), reference_forward(model, x, t, feats, mask)) < 1e-5


def test_scaling_keywords_change_the_output_and_leave_no_state():
    model = make_tiny_next_dit(seed=7)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    feats, mask = random_text(1, 4, model.config.cap_feat_dim, seed=9)
    t = torch.tensor([0.5])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(x, t, feats, mask)
    for kwargs in (dict(scale_factor=2.0), dict(scale_factor=2.0, scale_watershed=0.9),
                   dict(proportional_attn=True, base_seqlen=4)):
        assert not torch.allclose(model(x, t, feats, mask, **kwargs), plain, atol=1e-4)
    assert torch.equal(model(x, t, feats, mask), plain)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Proportional attention at its base length is the plain scale.
    torch.testing.assert_close(model(x, t, feats, mask, proportional_attn=True, base_seqlen=16), plain)


def test_text_work_once_equals_forward():
    model = make_tiny_next_dit(seed=10)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    feats, mask = random_text(2, 5, model.config.cap_feat_dim, seed=12, lengths=[5, 2])
    t = torch.tensor([0.4, 0.4])
    text = model.prepare_text(feats, mask)
    torch.testing.assert_close(model.forward_with_text(x, t, text, scale_factor=1.5), model(x, t, feats, mask,
                                                                                             scale_factor=1.5))


def test_masked_caption_tokens_do_not_change_the_output():
    model = make_tiny_next_dit(seed=13)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(14))
    feats, mask = random_text(1, 5, model.config.cap_feat_dim, seed=15)
    base = model(x, torch.tensor([0.3]), feats, mask)
    junk = torch.randn(1, 3, model.config.cap_feat_dim) * 50
    padded = model(x, torch.tensor([0.3]), torch.cat([feats, junk], 1),
                   torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], 1))
    torch.testing.assert_close(padded, base, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_refused():
    model = make_tiny_next_dit()
    feats, mask = random_text(1, 3, model.config.cap_feat_dim)
    with pytest.raises(ValueError, match="16 channels"):
        model(torch.zeros(1, 16, 8, 8), torch.tensor([0.5]), feats, mask)
    with pytest.raises(ValueError, match="Gemma-2B"):
        model(torch.zeros(1, 4, 8, 8), torch.tensor([0.5]), *random_text(1, 3, 4096))
    with pytest.raises(ValueError, match="base_seqlen"):
        model(torch.zeros(1, 4, 8, 8), torch.tensor([0.5]), feats, mask, proportional_attn=True)


def test_bf16_tracks_fp32():
    model = make_tiny_next_dit(seed=16)
    bf16 = make_tiny_next_dit(seed=16).to(torch.bfloat16)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(17))
    feats, mask = random_text(1, 4, model.config.cap_feat_dim, seed=18)
    ref = model(x, torch.tensor([0.5]), feats, mask)
    out = bf16(x, torch.tensor([0.5]), feats, mask)
    assert out.dtype == torch.float32 and (out - ref).norm() / ref.norm() < 0.05
