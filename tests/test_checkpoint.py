"""Checkpoint reading, writing, conversion and refusal of wrong or hostile files."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lumina_core import FLAG_DIT_5B, FlagDiT, FlagDiTConfig
from lumina_core.weights.convert import convert_checkpoint
from lumina_core.weights.dit_files import (
    infer_flag_dit_config,
    load_flag_dit,
    read_flag_dit_config,
    save_flag_dit,
)
from lumina_core.weights.layouts import CheckpointError
from tests.helpers_dit import make_tiny_flag_dit, random_text

REPO = Path(__file__).resolve().parents[1]


def empty_state_dict(config):
    with torch.device("meta"):
        return FlagDiT(config).state_dict()


@pytest.mark.parametrize(
    "config",
    [
        FLAG_DIT_5B,
        FlagDiTConfig.tiny(),
        FlagDiTConfig.tiny(dim=128, n_heads=8, n_kv_heads=2, n_layers=3),
        FlagDiTConfig(dim=256, n_layers=2, n_heads=4, cap_feat_dim=96, qk_norm=False, learn_sigma=False),
        FlagDiTConfig(dim=192, n_layers=1, n_heads=2, cap_feat_dim=64, multiple_of=1, ffn_dim_multiplier=1.3),
    ],
    ids=["5b", "tiny", "gqa", "cap_dim", "ffn_multiplier"],
)
def test_infer_config_recovers_every_field(config):
    state = {k: torch.empty(v.shape, device="meta") for k, v in empty_state_dict(config).items()}
    inferred = infer_flag_dit_config(state)
    # The FFN width is recoverable; (multiple_of, ffn_dim_multiplier) only up to pairs giving the same width.
    assert inferred.ffn_hidden_dim == config.ffn_hidden_dim
    assert inferred.replace(multiple_of=config.multiple_of, ffn_dim_multiplier=config.ffn_dim_multiplier) == config
    if config == FLAG_DIT_5B:
        assert inferred == config


def _inputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    feats, mask = random_text(2, 5, model.config.cap_feat_dim, seed=seed, lengths=[5, 2])
    return x, torch.tensor([0.25, 0.75]), feats, mask


def test_save_then_load_is_exact_in_fp32(tmp_path):
    model = make_tiny_flag_dit(seed=11, n_kv_heads=2)
    path = tmp_path / "tiny.safetensors"
    save_flag_dit(model, path)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())
    loaded = load_flag_dit(path, dtype=torch.float32)
    assert loaded.config == model.config
    args = _inputs(model)
    assert torch.equal(loaded(*args), model(*args))
    assert read_flag_dit_config(path) == model.config


@pytest.mark.parametrize("prefix", ["model.", "module.", "diffusion_model.", "model.diffusion_model."])
def test_prefixed_copies_load(tmp_path, prefix):
    model = make_tiny_flag_dit(seed=12)
    path = tmp_path / "prefixed.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_flag_dit(path, dtype=torch.float32)
    args = _inputs(model, 1)
    assert torch.equal(loaded(*args), model(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_load_casts_every_tensor(tmp_path, dtype):
    model = make_tiny_flag_dit(seed=13)
    path = tmp_path / "m.safetensors"
    save_flag_dit(model, path)
    loaded = load_flag_dit(path, dtype=dtype)
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key].to(dtype))


def test_pth_loads_weights_only(tmp_path):
    model = make_tiny_flag_dit(seed=14)
    path = tmp_path / "consolidated.pth"
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    loaded = load_flag_dit(path, dtype=torch.float32)
    args = _inputs(model, 2)
    assert torch.equal(loaded(*args), model(*args))


def test_convert_streams_to_bf16_and_the_result_loads(tmp_path):
    model = make_tiny_flag_dit(seed=15)
    src = tmp_path / "consolidated.00-of-01.safetensors"
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    dst = tmp_path / "out.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "lumina_core", "convert", str(src), str(dst), "--dtype", "bf16"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    with safe_open(str(dst), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # prefix stripped
        for key in f.keys():
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, model.state_dict()[key].to(torch.bfloat16))
    assert load_flag_dit(dst).config == model.config
    assert not list(tmp_path.glob("*.partial"))


def test_convert_refuses_to_overwrite_its_input(tmp_path):
    model = make_tiny_flag_dit()
    src = tmp_path / "m.safetensors"
    save_flag_dit(model, src)
    with pytest.raises(CheckpointError, match="is the input file"):
        convert_checkpoint(src, src)


# ------------------------------------------------------------------------------------------------------------
# Wrong, damaged and hostile files


def _write(tmp_path, name, state):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "keys, detected",
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight"], "SDXL UNet"),
        (["layers.0.attention_norm1.weight", "layers.0.ffn_norm2.weight", "x_embedder.weight"], "Lumina-Next"),
        (["noise_refiner.0.attention.qkv.weight", "context_refiner.0.attention.qkv.weight"], "Lumina-Image-2.0"),
        (["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"], "Lumina Load LLaMA"),
        (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
    ],
    ids=["sdxl", "lumina_next", "lumina_image_2", "llama", "flux"],
)
def test_foreign_checkpoints_are_named(tmp_path, keys, detected):
    path = _write(tmp_path, "wrong.safetensors", {k: torch.zeros(2, 2) for k in keys})
    with pytest.raises(CheckpointError, match=detected) as err:
        load_flag_dit(path)
    assert str(path) in str(err.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = make_tiny_flag_dit().state_dict()
    state.pop("layers.1.attention.wq.weight")
    state["layers.0.attention.extra.weight"] = torch.zeros(2)
    path = _write(tmp_path, "odd.safetensors", state)
    with pytest.raises(CheckpointError, match=r"1 missing \(first: layers\.1\.attention\.wq\.weight\).*1 unexpected"):
        load_flag_dit(path)


def test_truncated_safetensors_is_refused_with_its_name(tmp_path):
    path = tmp_path / "m.safetensors"
    save_flag_dit(make_tiny_flag_dit(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*(truncated|corrupted)"):
        load_flag_dit(path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 20) + b"not json at all!!!!!" + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors could not be read"):
        load_flag_dit(path)


def test_empty_file_and_directory_and_missing_file(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.safetensors is empty"):
        load_flag_dit(empty)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_flag_dit(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_flag_dit(tmp_path / "nope.safetensors")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    state = {k: v for k, v in make_tiny_flag_dit().state_dict().items()}
    state["payload"] = _Payload(str(marker))
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pth.*run code"):
        load_flag_dit(path)
    assert not marker.exists()


def test_saved_metadata_is_plain_json(tmp_path):
    path = tmp_path / "m.safetensors"
    save_flag_dit(make_tiny_flag_dit(), path)
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + n])
    assert header["__metadata__"]["format"] == "pt"


def test_positioned_reader_returns_what_safetensors_itself_reads(tmp_path):
    from lumina_core.weights.tensor_io import SafetensorsFile

    state = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "d": torch.randn(2, 2).half(),
    }
    path = _write(tmp_path, "mixed.safetensors", state)
    reader = SafetensorsFile(path)
    with safe_open(str(path), "pt") as f:
        assert sorted(reader.keys) == sorted(f.keys())
        for key in f.keys():
            got = reader.get(key)
            assert got.dtype == f.get_tensor(key).dtype and torch.equal(got, f.get_tensor(key))


def test_git_lfs_pointer_is_named(tmp_path):
    path = tmp_path / "lumina.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 20186648288\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer.*git lfs pull"):
        load_flag_dit(path)
