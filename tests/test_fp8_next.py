"""fp8 weight storage for Lumina-Next: the Next-DiT and the Gemma encoder keep their linear weights in fp8 and
compute in bf16, like the Flag-DiT and LLaMA. Truth: the fp32 model whose weights were rounded the same way."""

from __future__ import annotations

import pytest
import torch

from lumina_core.families import load_dit
from lumina_core.text.gemma import GemmaTextEncoder
from lumina_core.tiny import make_tiny_gemma_folder, write_tiny_next_dit
from lumina_core.weights.fp8 import linear_weight_names
from tests.conftest import BF16_U, FP32_U

FP8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = pytest.mark.skipif(FP8 is None, reason="this torch has no float8 dtypes")


def _rounded_like(reference: torch.nn.Module, linear: set[str], rest: torch.dtype) -> None:
    """Round the fp32 reference's weights as fp8 storage does: linear weights through fp8, the rest through the
    compute dtype they are stored in."""
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            through = FP8 if name in linear else rest
            tensor.copy_(tensor.to(through).to(torch.float32))


def _tolerance(compute: torch.dtype, depth: int) -> float:
    """Relative difference allowed between the fp8 model and the fp32 model holding the same rounded weights.

    Both hold the very same weight values, so the difference is the compute dtype's rounding of the activations:
    bf16 rounds each layer's output to 2^-8 relative, over `depth` layers plus the embedders and the final layer;
    fp32 compute is the reference's own arithmetic, where only the order of the reductions (over widths of up to 64)
    may differ. Measured on this model: 0.0086 in bf16 (bound 0.0156), 0 in fp32. A planted bug, the fp8 weights not
    used (the reference's unrounded weights instead), costs 0.072: fp8's own rounding, far above either bound."""
    u = BF16_U if compute == torch.bfloat16 else 64 * FP32_U
    return (depth + 2) * u



def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_next_dit_in_fp8_equals_the_rounded_fp32_model(tmp_path, cpu_compute):
    path = write_tiny_next_dit(tmp_path / "next.safetensors", seed=3)
    fp8 = load_dit(path, dtype=FP8)
    reference = load_dit(path, dtype=torch.float32)
    linear = linear_weight_names(fp8)
    assert fp8.compute_dtype == cpu_compute
    assert linear and all(fp8.state_dict()[k].dtype == FP8 for k in linear)
    assert all(v.dtype == cpu_compute for k, v in fp8.state_dict().items() if k not in linear)
    plain = load_dit(path, dtype=torch.float32)
    _rounded_like(reference, linear, cpu_compute)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 6, generator=g)
    t = torch.tensor([0.4, 0.4])
    cap = torch.randn(2, 5, reference.config.cap_feat_dim, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out = fp8(x, t, cap, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    expected = reference(x, t, cap, mask)
    # The compute dtype against fp32 compute on the same rounded weights; fp8 rounding itself costs several times more.
    assert _relative(out, expected) < _tolerance(cpu_compute, reference.config.n_layers)
    assert _relative(out, plain(x, t, cap, mask)) > 2 * _relative(out, expected)


def test_gemma_encoder_in_fp8_equals_the_rounded_fp32_encoder(tmp_path, cpu_compute):
    folder = make_tiny_gemma_folder(tmp_path / "gemma", hidden_size=32, seed=1)
    fp8 = GemmaTextEncoder.from_folder(folder, dtype=FP8)
    reference = GemmaTextEncoder.from_folder(folder, dtype=torch.float32)
    linear = linear_weight_names(fp8.model)
    assert fp8.dtype == cpu_compute
    assert linear and all(fp8.model.state_dict()[k].dtype == FP8 for k in linear)
    _rounded_like(reference.model, linear, cpu_compute)
    features, mask = fp8.encode(["a red cat on a blue mat", ""])
    expected, expected_mask = reference.encode(["a red cat on a blue mat", ""])
    assert torch.equal(mask, expected_mask) and torch.isfinite(features).all()
    assert _relative(features[mask], expected[mask]) < _tolerance(cpu_compute, reference.model.config.num_hidden_layers)
