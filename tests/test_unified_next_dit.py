"""The Lumina-Image-2.0 Unified Next-DiT: its released shapes, its forward against an independent reference written
from the original code (tests/reference_lumina2.py), every checkpoint layout, and its refusals."""

import math

import pytest
import torch

import lumina_core
from lumina_core import families
from lumina_core.models.config import UnifiedNextDiTConfig
from lumina_core.models.unified_next_dit import UnifiedNextDiT
from lumina_core.weights.layouts import CheckpointError
from tests.helpers_lumina2 import LAYOUTS, write_dit
from tests.reference_lumina2 import LUMINA2_RELEASED, TINY, expected_shapes, random_state_dict, reference_forward

RELEASED_PARAMETERS = 2_609_771_456


def tiny_model(seed=0):
    model = UnifiedNextDiT(UnifiedNextDiTConfig.tiny())
    model.load_state_dict(random_state_dict(TINY, seed), strict=True)
    return model.eval()


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_released_configuration_has_the_original_keys_and_parameter_count():
    with torch.device("meta"):
        model = UnifiedNextDiT(UnifiedNextDiTConfig())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_shapes(LUMINA2_RELEASED)
    assert len(shapes) == 400
    assert shapes == expected
    assert sum(math.prod(s) for s in shapes.values()) == RELEASED_PARAMETERS
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETERS


def test_tiny_configuration_matches_the_reference_shapes():
    with torch.device("meta"):
        model = UnifiedNextDiT(UnifiedNextDiTConfig.tiny())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(TINY)


@pytest.mark.parametrize("size", [(6, 10), (8, 4), (2, 2)])
def test_forward_matches_the_reference_with_padded_captions_of_different_lengths(size):
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    h, w = size
    x = torch.randn(4, 16, h, w, generator=g)
    t = torch.tensor([0.0, 0.27, 0.81, 1.0])
    cap = torch.randn(4, 9, TINY["cap_feat_dim"], generator=g)
    lengths = torch.tensor([9, 5, 1, 7])
    mask = torch.arange(9)[None] < lengths[:, None]
    out = model(x, t, cap, mask)
    ref = reference_forward(random_state_dict(TINY, 0), TINY, x, t, cap, mask, dtype=torch.float64)
    assert out.shape == (4, 16, h, w) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


def test_forward_without_padding_and_per_sample_independence():
    """A full mask takes the unmasked path; each sample's output does not depend on the others in the batch."""
    model = tiny_model(seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 4, 6, generator=g)
    t = torch.tensor([0.5, 0.1])
    cap = torch.randn(2, 5, TINY["cap_feat_dim"], generator=g)
    full = torch.ones(2, 5, dtype=torch.bool)
    ref = reference_forward(random_state_dict(TINY, 3), TINY, x, t, cap, full, dtype=torch.float64)
    assert rel_err(model(x, t, cap, full), ref) < 1e-5
    # The first sample alone, its caption padded with 3 masked tokens of garbage: the same output.
    padded = torch.cat([cap[:1], torch.randn(1, 3, TINY["cap_feat_dim"], generator=g)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    alone = model(x[:1], t[:1], padded, mask)
    assert rel_err(alone, ref[:1]) < 1e-5


def test_prepared_text_gives_the_same_velocity_as_the_plain_forward():
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 16, 4, 4, generator=g)
    cap = torch.randn(2, 6, TINY["cap_feat_dim"], generator=g)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    text = model.prepare_text(cap, mask)
    for t in (0.0, 0.4, 0.9):
        tt = torch.full((2,), t)
        assert torch.equal(model.forward_with_text(x, tt, text), model(x, tt, cap, mask))


def test_bf16_forward_stays_close_to_the_reference():
    model = tiny_model().to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, 4, 6, generator=g)
    t = torch.tensor([0.3, 0.7])
    cap = torch.randn(2, 5, TINY["cap_feat_dim"], generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    ref = reference_forward(random_state_dict(TINY, 0), TINY, x, t, cap, mask, dtype=torch.float64)
    out = model(x, t, cap, mask)
    assert out.dtype == torch.float32
    # bf16 weights and activations through 4 blocks: a few bf16 units of relative error
    assert rel_err(out, ref) < 0.05


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_to_the_same_module(tmp_path, layout):
    sd = random_state_dict(TINY, 7)
    path = write_dit(tmp_path, layout, sd)
    assert families.checkpoint_family(path) is families.LUMINA_2
    model = lumina_core.load_dit(path, dtype=torch.float32)
    assert isinstance(model, UnifiedNextDiT) and model.family == "lumina2"
    tiny = UnifiedNextDiTConfig.tiny()
    assert model.config.ffn_hidden_dim == tiny.ffn_hidden_dim  # 256 either way (multiple_of 16 or 256)
    assert model.config.replace(multiple_of=16) == tiny
    loaded = model.state_dict()
    assert list(loaded) == list(expected_shapes(TINY))
    lossy = layout in ("comfy_bf16", "comfy_all_in_one")
    for key, value in sd.items():
        if key == "norm_final.weight" and layout.startswith("diffusers"):
            assert torch.equal(loaded[key], torch.ones_like(value))  # absent there, unused by the forward
            continue
        want = value.to(torch.bfloat16).float() if lossy else value
        assert torch.equal(loaded[key], want), key


def test_norm_final_is_ignored_by_the_forward():
    model = tiny_model()
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.5])
    cap, mask = torch.randn(1, 3, TINY["cap_feat_dim"], generator=g), torch.ones(1, 3, dtype=torch.bool)
    before = model(x, t, cap, mask)
    with torch.no_grad():
        model.norm_final.weight.mul_(7.0)
    assert torch.equal(model(x, t, cap, mask), before)


def test_load_in_bf16_casts_as_read(tmp_path):
    path = write_dit(tmp_path, "original", random_state_dict(TINY, 0))
    model = lumina_core.load_dit(path)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.state_dict()["layers.1.attention.qkv.weight"],
                       random_state_dict(TINY, 0)["layers.1.attention.qkv.weight"].to(torch.bfloat16))


def test_truncated_file_is_refused_with_its_name(tmp_path):
    path = write_dit(tmp_path, "original", random_state_dict(TINY, 0))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        lumina_core.load_dit(path)
    assert str(path) in str(err.value)


def test_missing_shard_and_missing_qkv_block_are_refused(tmp_path):
    folder = write_dit(tmp_path / "a", "diffusers_sharded", random_state_dict(TINY, 0))
    next(folder.glob("*00002-of-00002.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard"):
        lumina_core.load_dit(folder)
    from safetensors.torch import load_file, save_file

    single = write_dit(tmp_path / "b", "diffusers", random_state_dict(TINY, 0))
    tensors = load_file(str(single))
    del tensors["layers.1.attn.to_v.weight"]
    save_file(tensors, str(single))
    with pytest.raises(CheckpointError, match="layers.1.attention.qkv.weight"):
        lumina_core.load_dit(single)


def test_caption_beyond_the_rope_table_is_refused():
    model = tiny_model()
    x, t = torch.zeros(1, 16, 2, 2), torch.tensor([0.5])
    ok = model(x, t, torch.zeros(1, 299, TINY["cap_feat_dim"]), torch.ones(1, 299, dtype=torch.bool))
    assert torch.isfinite(ok).all()
    with pytest.raises(ValueError, match=r"300 tokens.*at most 299"):
        model(x, t, torch.zeros(1, 300, TINY["cap_feat_dim"]), torch.ones(1, 300, dtype=torch.bool))


def test_image_side_beyond_512_patches_is_refused():
    model = tiny_model()
    cap, mask = torch.zeros(1, 2, TINY["cap_feat_dim"]), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"513.*at most 512x512.*8192x8192"):
        model(torch.zeros(1, 16, 2, 1026), torch.tensor([0.5]), cap, mask)


@pytest.mark.parametrize("width,encoder", [(2048, "Gemma-2B"), (4096, "LLaMA")])
def test_text_features_of_another_family_are_refused(width, encoder):
    model = UnifiedNextDiT(UnifiedNextDiTConfig.tiny(cap_feat_dim=2304))
    with pytest.raises(ValueError, match=r"\[batch, tokens, 2304\].*Gemma-2-2B"):
        model(torch.zeros(1, 16, 2, 2), torch.tensor([0.5]), torch.zeros(1, 3, width), torch.ones(1, 3, dtype=torch.bool))


def test_wrong_latent_channels_name_the_flux_vae():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"4 channels.*expects 16.*FLUX"):
        model(torch.zeros(1, 4, 2, 2), torch.tensor([0.5]), torch.zeros(1, 2, 32), torch.ones(1, 2, dtype=torch.bool))


def test_other_families_files_are_refused_by_the_lumina2_loader(tmp_path):
    from lumina_core.models.config import NextDiTConfig
    from lumina_core.models.next_dit import NextDiT
    from lumina_core.weights.dit_files import save_dit

    next_path = tmp_path / "next.safetensors"
    save_dit(NextDiT(NextDiTConfig.tiny()), next_path)
    with pytest.raises(CheckpointError, match=r"Lumina-Next.*not a Lumina-Image-2.0 Unified Next-DiT"):
        families.LUMINA_2.load_dit(next_path, dtype=torch.float32, device="cpu")
    l2_path = write_dit(tmp_path, "original", random_state_dict(TINY, 0))
    with pytest.raises(CheckpointError, match=r"Lumina-Image-2.0.*not a Lumina-Next"):
        families.LUMINA_NEXT.load_dit(l2_path, dtype=torch.float32, device="cpu")
