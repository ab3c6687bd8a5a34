"""Per-token work on the CPU a chunk of tokens at a time (`layers.over_token_chunks`): the DiTs' norms and RoPE give
the same values, bit for bit, as over the whole sequence, and the in-place feed-forward those of the plain one; so do
the blocks' in-place modulation and gates at inference against the out-of-place forward autograd records."""

from __future__ import annotations

import pytest
import torch

from lumina_core.models import layers
from lumina_core.models.blocks import FeedForward
from lumina_core.models.config import FlagDiTConfig
from lumina_core.tiny import make_tiny_flag_dit, make_tiny_next_dit, make_tiny_unified_next_dit

MODELS = {"lumina_t2i": make_tiny_flag_dit, "lumina_next": make_tiny_next_dit, "lumina2": make_tiny_unified_next_dit}


def _forward(model, dtype, seed=0, grad=False):
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    # 16x24 latent: 96 image tokens with patch 2 (plus Flag-DiT's end-of-line tokens), two prompts of other lengths
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=gen).to(dtype)
    feats = torch.randn(2, 7, cfg.cap_feat_dim, generator=gen).to(dtype)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    with torch.set_grad_enabled(grad):
        return model(x, torch.tensor([0.3, 0.8]), feats, mask)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_each_dit_gives_the_same_output_bit_for_bit_in_chunks_of_tokens(monkeypatch, family, dtype, chunk):
    model = MODELS[family]().to(dtype)
    whole = _forward(model, dtype)  # the tiny latents' sequences are shorter than TOKEN_CHUNK: all at once
    calls = []
    real = layers.over_token_chunks

    def spy(fn, length, device, chunk=None):
        calls.append(length)
        return real(fn, length, device, chunk)

    monkeypatch.setattr(layers, "TOKEN_CHUNK", chunk)
    monkeypatch.setattr(layers, "over_token_chunks", spy)
    chunked = _forward(model, dtype)
    assert calls and max(calls) > chunk  # some sequence really was cut
    assert torch.equal(chunked, whole)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_in_place_gives_the_bits_of_the_autograd_forward(family, dtype):
    model = MODELS[family]().to(dtype)
    assert torch.equal(_forward(model, dtype), _forward(model, dtype, grad=True))


def test_chunks_cover_every_token_once_in_order():
    seen = []

    def fn(start, end):
        seen.append((start, end))
        return torch.arange(start, end, dtype=torch.float32).view(1, -1, 1).expand(2, -1, 3)

    out = layers.over_token_chunks(fn, 10, "cpu", chunk=4)
    assert seen == [(0, 4), (4, 8), (8, 10)]
    assert torch.equal(out, torch.arange(10.0).view(1, -1, 1).expand(2, -1, 3))
    seen.clear()
    layers.over_token_chunks(fn, 10, "meta", chunk=4)  # not the CPU: all at once
    assert seen == [(0, 10)]


def test_the_in_place_feed_forward_equals_the_plain_one():
    cfg = FlagDiTConfig.tiny()
    ff = FeedForward(cfg)
    x = torch.randn(2, 9, cfg.dim)
    plain = ff.w2(torch.nn.functional.silu(ff.w1(x)) * ff.w3(x))
    with torch.no_grad():
        assert torch.equal(ff(x), plain)
    out = ff(x)  # with autograd: the plain form, which backward can go through
    out.sum().backward()
    assert torch.equal(out, plain) and ff.w1.weight.grad is not None
