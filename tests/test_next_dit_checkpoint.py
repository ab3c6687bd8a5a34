"""Next-DiT checkpoints: both public layouts, family detection by `load_dit`, and refusal of wrong or hostile files."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lumina_core.families import load_dit
from lumina_core.models.config import NEXT_DIT_2B_GQA
from lumina_core.models.flag_dit import FlagDiT
from lumina_core.models.next_dit import NextDiT
from lumina_core.tiny import make_tiny_next_dit, write_tiny_flag_dit, write_tiny_next_dit
from lumina_core.weights.dit_files import load_flag_dit, load_next_dit, read_next_dit_config, save_next_dit
from lumina_core.weights.layouts import CheckpointError, diffusers_to_original, original_to_diffusers
from tests.helpers_dit import random_text


def diffusers_2b_keys():
    """The parameter names of diffusers' LuminaNextDiT2DModel(hidden_size=2304, num_layers=24, ...), written out
    from its module tree: patch_embedder.proj, time_caption_embed.{timestep_embedder,caption_embedder}, per layer
    gate, attn1 (to_q/k/v, norm_q/k; its to_out is an Identity), attn2 (to_q/k/v, norm_q/k, to_out.0),
    feed_forward.linear_1..3, norm1 (LuminaRMSNormZero: linear, norm), norm2, ffn_norm1/2, norm1_context, and
    norm_out (linear_1, linear_2; its LayerNorm has no parameters)."""
    keys = ["pad_token", "patch_embedder.proj.weight", "patch_embedder.proj.bias"]
    for lin in ("linear_1", "linear_2"):
        keys += [f"time_caption_embed.timestep_embedder.{lin}.{p}" for p in ("weight", "bias")]
        keys += [f"norm_out.{lin}.{p}" for p in ("weight", "bias")]
    keys += [f"time_caption_embed.caption_embedder.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")]
    for n in range(24):
        p = f"layers.{n}."
        keys.append(p + "gate")
        for attn in ("attn1", "attn2"):
            keys += [p + f"{attn}.to_{x}.weight" for x in "qkv"]
            keys += [p + f"{attn}.norm_{x}.{w}" for x in "qk" for w in ("weight", "bias")]
        keys.append(p + "attn2.to_out.0.weight")
        keys += [p + f"feed_forward.linear_{i}.weight" for i in (1, 2, 3)]
        keys += [p + "norm1.linear.weight", p + "norm1.linear.bias", p + "norm1.norm.weight"]
        keys += [p + f"{nrm}.weight" for nrm in ("norm2", "ffn_norm1", "ffn_norm2", "norm1_context")]
    return keys


def test_diffusers_keys_map_one_to_one_onto_the_original():
    with torch.device("meta"):
        original = set(NextDiT(NEXT_DIT_2B_GQA).state_dict())
    diffusers = diffusers_2b_keys()
    assert len(diffusers) == len(set(diffusers)) == 567 + 3 * 24
    targets, copies = [], []
    for key in diffusers:
        mapped, is_copy = diffusers_to_original(key)
        assert mapped in original, key
        (copies if is_copy else targets).append(mapped)
    # Every original key is held by exactly one non-copy diffusers key; the copies are attn2's query and its norm.
    assert sorted(targets) == sorted(original)
    assert sorted(copies) == sorted(
        f"layers.{n}.attention.{k}" for n in range(24) for k in ("wq.weight", "q_norm.weight", "q_norm.bias")
    )
    assert sorted(d for k in original for d in original_to_diffusers(k)) == sorted(diffusers)
    assert diffusers_to_original("layers.0.attn1.to_out.0.weight") == (None, False)


def _inputs(cap_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 6, generator=gen)
    feats, mask = random_text(2, 5, cap_dim, seed=seed, lengths=[5, 2])
    return x, torch.tensor([0.25, 0.75]), feats, mask


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_both_layouts_load_to_identical_outputs(tmp_path, suffix):
    model = make_tiny_next_dit(seed=3)
    original = tmp_path / f"consolidated.00-of-01{suffix}"
    if suffix == ".pth":
        torch.save(model.state_dict(), original)
    else:
        save_next_dit(model, original)
    diffusers = tmp_path / "diffusion_pytorch_model.safetensors"
    save_next_dit(model, diffusers, layout="diffusers")
    a = load_dit(original, dtype=torch.float32)
    b = load_dit(diffusers, dtype=torch.float32)
    assert isinstance(a, NextDiT) and isinstance(b, NextDiT) and a.family == b.family == "lumina_next"
    assert a.config == b.config == model.config
    inputs = _inputs(model.config.cap_feat_dim)
    want = model(*inputs, scale_factor=1.5, scale_watershed=0.5)
    assert torch.equal(a(*inputs, scale_factor=1.5, scale_watershed=0.5), want)
    assert torch.equal(b(*inputs, scale_factor=1.5, scale_watershed=0.5), want)


def test_load_dit_returns_a_flag_dit_for_lumina_t2i(tmp_path):
    path = write_tiny_flag_dit(tmp_path / "t2i.safetensors")
    model = load_dit(path, dtype=torch.float32)
    assert isinstance(model, FlagDiT) and model.family == "lumina_t2i"


def test_head_counts_come_from_the_weights(tmp_path):
    for kv in (None, 1, 2, 4):
        path = write_tiny_next_dit(tmp_path / f"kv{kv}.safetensors", layout="diffusers", n_kv_heads=kv)
        assert read_next_dit_config(path).kv_heads == (kv or 4)


@pytest.mark.parametrize("prefix", ["model.", "transformer.", "module."])
def test_prefixed_copies_load(tmp_path, prefix):
    model = make_tiny_next_dit(seed=5)
    path = tmp_path / "prefixed.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert torch.equal(load_next_dit(path, dtype=torch.float32).x_embedder.weight, model.x_embedder.weight)


def test_load_casts_to_the_target_dtype(tmp_path):
    path = write_tiny_next_dit(tmp_path / "m.safetensors", layout="diffusers")
    model = load_dit(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_diffusers_copies_that_differ_are_refused(tmp_path):
    model = make_tiny_next_dit(seed=6)
    path = tmp_path / "d.safetensors"
    save_next_dit(model, path, layout="diffusers")
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["layers.1.attn2.to_q.weight"] = state["layers.1.attn2.to_q.weight"] + 1
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn2\.to_q\.weight differs from layers\.1\.attn1\.to_q"):
        load_dit(path)


def test_missing_keys_are_listed(tmp_path):
    state = make_tiny_next_dit().state_dict()
    state.pop("layers.1.ffn_norm2.weight")
    path = tmp_path / "odd.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=r"Next-DiT \(original layout\).*1 missing \(first: layers\.1\.ffn_norm2"):
        load_dit(path)


def test_wrong_family_and_foreign_files_are_named(tmp_path):
    next_path = write_tiny_next_dit(tmp_path / "next.safetensors")
    with pytest.raises(CheckpointError, match="Lumina-Next.*Lumina Load DiT"):
        load_flag_dit(next_path)
    flag_path = write_tiny_flag_dit(tmp_path / "flag.safetensors")
    with pytest.raises(CheckpointError, match="not a Lumina-Next Next-DiT"):
        load_next_dit(flag_path)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(sdxl))
    with pytest.raises(CheckpointError, match="SDXL UNet"):
        load_dit(sdxl)
    lumina2 = tmp_path / "lumina2.safetensors"
    save_file({"x_embedder.weight": torch.zeros(2), "layers.0.attention_norm1.weight": torch.zeros(2),
               "noise_refiner.0.attention.qkv.weight": torch.zeros(2)}, str(lumina2))
    with pytest.raises(CheckpointError, match="Lumina-Image-2.0"):
        load_dit(lumina2)


def test_truncated_file_is_refused_with_its_name(tmp_path):
    path = write_tiny_next_dit(tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*(truncated|corrupted)"):
        load_dit(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "consolidated.00-of-01.pth"
    state = dict(make_tiny_next_dit().state_dict())
    state["payload"] = _Payload(str(marker))
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*consolidated\.00-of-01\.pth.*run code"):
        load_dit(path)
    assert not marker.exists()


def test_chunked_read_equals_safetensors_own_read_cast(tmp_path):
    from safetensors import safe_open

    from lumina_core.weights.tensor_io import SafetensorsFile

    state = {"a": torch.randn(1000, 37), "b": torch.randn(5).half(), "empty": torch.randn(0, 3)}
    path = tmp_path / "x.safetensors"
    save_file(state, str(path))
    reader = SafetensorsFile(path)
    with safe_open(str(path), "pt") as f:
        for key in state:
            for dtype in (torch.float32, torch.bfloat16):
                out = reader.read_into(key, torch.empty(state[key].shape, dtype=dtype), chunk_bytes=1000)
                assert torch.equal(out, f.get_tensor(key).to(dtype))
    with pytest.raises(ValueError, match="shape"):
        reader.read_into("a", torch.empty(37, 1000))


def test_loaded_weights_are_aligned_views_of_one_buffer(tmp_path):
    path = write_tiny_next_dit(tmp_path / "m.safetensors")
    model = load_dit(path, dtype=torch.bfloat16)
    params = list(model.parameters())
    assert len({p.untyped_storage().data_ptr() for p in params}) == 1
    assert all(p.data_ptr() % 64 == 0 for p in params)
