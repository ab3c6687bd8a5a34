"""GGUF DiTs of the three families: city96/ComfyUI-GGUF's naming conventions, weights kept quantized in memory, the
converter, bad files, and the nodes' lists and loader.

Truth: the same model loaded from a safetensors file of the weights the GGUF holds, dequantized by the `gguf`
package's reference `gguf.quants.dequantize`; the files are written with the `gguf` package's own writer.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lumina_core.__main__ import main as cli
from lumina_core.families import load_dit
from lumina_core.models.blocks import init_random_weights
from lumina_core.models.config import FlagDiTConfig, NextDiTConfig, UnifiedNextDiTConfig
from lumina_core.models.flag_dit import FlagDiT
from lumina_core.models.next_dit import NextDiT
from lumina_core.models.unified_next_dit import UnifiedNextDiT
from lumina_core.weights.dit_files import load_flag_dit, save_dit
from lumina_core.weights.gguf_file import GGUFFile
from lumina_core.weights.layouts import CheckpointError
from lumina_core.weights.quantized import GGUFLinear, quantized_bytes
from nodes import NODE_CLASS_MAPPINGS as N
from nodes import comfy_model, model_files
from tests.helpers_gguf import FLOATS, K_QUANTS, LEGACY, Q, encode, random_blocks, write_file

# Wide enough (rows of 256) for the K types; FFN widths 768 and 1024.
FAMILIES = {
    "lumina_t2i": (FlagDiT, FlagDiTConfig.tiny(dim=256, n_heads=4, multiple_of=256), 4),
    "lumina_next": (NextDiT, NextDiTConfig.tiny(dim=256, n_heads=4, n_kv_heads=2, multiple_of=256), 4),
    "lumina2": (UnifiedNextDiT, UnifiedNextDiTConfig.tiny(dim=256, n_heads=4, n_kv_heads=2, multiple_of=256,
                                                          axes_dims=(20, 22, 22)), 16),
}
# Every matrix gets the next type of this cycle that fits its rows (K types: rows of 256; legacy: of 32).
CYCLE = (Q.Q8_0, Q.Q2_K, Q.Q4_0, Q.Q3_K, Q.Q4_1, Q.F16, Q.Q4_K, Q.Q5_0, Q.Q5_K, Q.Q5_1, Q.Q6_K, Q.BF16)


# The converter's tests need no K types: the default tiny models (dim 64; the Flag-DiT's FFN rows of 176 are no
# whole number of blocks).
TINY = {"lumina_t2i": FlagDiTConfig.tiny(), "lumina_next": NextDiTConfig.tiny(), "lumina2": UnifiedNextDiTConfig.tiny()}


def _model(family: str, seed: int = 0, tiny: bool = False) -> torch.nn.Module:
    cls, config, _channels = FAMILIES[family]
    return init_random_weights(cls(TINY[family] if tiny else config), seed).eval().requires_grad_(False)


def _mixed_type(weight: torch.Tensor, turn: int, types) -> tuple:
    """(type, next turn): F32 for 1-D and small tensors; else the next type of the cycle whose blocks fit the rows."""
    if weight.ndim == 1 or weight.numel() <= 1024:
        return Q.F32, turn
    for step in range(len(types)):
        qtype = types[(turn + step) % len(types)]
        if weight.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
            return qtype, turn + step + 1
    return Q.F16, turn


def write_gguf_dit(directory, family: str, *, arch=None, prefix: str = "", seed: int = 0, types=CYCLE):
    """A GGUF of a tiny DiT with mixed types, in city96's conventions (1-D and small tensors F32), and the
    safetensors file of the same weights as the GGUF holds them. Returns (gguf path, safetensors path)."""
    rng = np.random.default_rng(seed)
    tensors, values = {}, {}
    turn = 0
    for key, weight in _model(family, seed).state_dict().items():
        qtype, turn = _mixed_type(weight, turn, types)
        data, values[key] = encode(weight, qtype, rng)
        tensors[prefix + key] = (data, qtype)
    name = f"{family}-{arch or 'none'}{'-prefixed' if prefix else ''}"
    path = directory / f"{name}.gguf"
    write_file(path, tensors, arch=arch)
    reference = directory / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in values.items()}, str(reference))
    return path, reference


def _inputs(family: str, seed: int = 0):
    _cls, config, channels = FAMILIES[family]  # the tiny models take the same inputs
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 6, 8, generator=g)
    cap = torch.randn(2, 5, config.cap_feat_dim, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return x, torch.tensor([0.3, 0.8]), cap, mask


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


CONVENTIONS = [
    ("lumina2", "lumina2", ""),
    ("lumina2", "lumina2", "model.diffusion_model."),
    ("lumina2", None, ""),
    ("lumina2", "pig", "model.diffusion_model."),
    ("lumina_t2i", None, ""),
    ("lumina_t2i", "pig", "model.diffusion_model."),
    ("lumina_next", None, "model.diffusion_model."),
    ("lumina_next", "pig", ""),
]


@pytest.mark.parametrize("family,arch,prefix", CONVENTIONS,
                         ids=[f"{f}-{a or 'none'}{'-prefixed' if p else ''}" for f, a, p in CONVENTIONS])
def test_gguf_dit_equals_the_dequantized_safetensors_and_stays_quantized(tmp_path, family, arch, prefix):
    path, reference_path = write_gguf_dit(tmp_path, family, arch=arch, prefix=prefix)
    model = load_dit(path, dtype=torch.float32)
    reference = load_dit(reference_path, dtype=torch.float32)
    assert model.family == reference.family == family and model.config == reference.config
    src = GGUFFile(path)
    used = {src.qtype(k) for k in src.keys}
    assert len(used & set(K_QUANTS)) >= 3 and len(used & set(LEGACY)) >= 3 and used & {Q.F16, Q.BF16}

    # Every quantized matrix stays blocks, in its own type.
    quantized = {prefix + name + ".weight": m.qtype for name, m in model.named_modules()
                 if isinstance(m, GGUFLinear) and m.qtype is not None}
    assert quantized == {k: src.qtype(k) for k in src.keys if src.is_quantized(k)}
    assert quantized_bytes(model) <= 1.3 * src.tensor_bytes
    assert quantized_bytes(reference) > 2.5 * src.tensor_bytes  # what dequantizing at load would have cost

    args = _inputs(family)
    out, expected = model(*args), reference(*args)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0
    assert _relative(out, expected) <= 1e-5


def test_bf16_compute_dequantizes_in_fp32_and_casts_once(tmp_path):
    path, reference_path = write_gguf_dit(tmp_path, "lumina2", arch="lumina2", seed=1)
    model = load_dit(path, dtype=torch.bfloat16)
    reference = load_dit(reference_path, dtype=torch.float32)
    assert model.compute_dtype == torch.bfloat16
    layer = model.layers[0].feed_forward.w1
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    weight, _ = layer.cast_weight_bias(x)
    assert torch.equal(weight, reference.layers[0].feed_forward.w1.weight.to(torch.bfloat16))
    args = _inputs("lumina2")
    out = model(*args)
    assert out.dtype == torch.float32 and _relative(out, reference(*args)) < 0.05


# --------------------------------------------------------------------------------------------------------------
# The converter


def _expected_type(key: str, shape: tuple, qtype) -> "Q":
    """city96's conventions, restated: 1-D and small tensors F32; the embedders, the final layer and the refiners
    unquantized (F16 from an fp32 source); the other matrices in the chosen type where their rows are whole blocks."""
    if len(shape) == 1 or math.prod(shape) <= 1024:
        return Q.F32
    keep = ("t_embedder.", "x_embedder.", "cap_embedder.", "final_layer.", "context_refiner.", "noise_refiner.")
    if key.startswith(keep) or shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


@pytest.mark.parametrize("family", list(FAMILIES))
def test_convert_writes_city96_conventions_and_round_trips(tmp_path, family):
    model = _model(family, seed=4, tiny=True)
    src = tmp_path / "model.safetensors"
    save_dit(model, src)
    dst = tmp_path / "model-q8_0.gguf"
    assert cli(["convert", str(src), str(dst), "--dtype", "q8_0"]) == 0

    reader = gguf.GGUFReader(dst)
    arch = reader.get_field("general.architecture")
    assert (arch.contents() if arch else None) == ("lumina2" if family == "lumina2" else None)
    state = model.state_dict()
    assert [t.name for t in reader.tensors] == list(state)
    for t in reader.tensors:
        assert t.tensor_type == _expected_type(t.name, tuple(state[t.name].shape), Q.Q8_0), t.name
    assert sum(t.tensor_type == Q.Q8_0 for t in reader.tensors) >= 8

    # The file loads as what it holds, and holds the model up to Q8_0's rounding.
    held = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), np.float32))
            .reshape(state[t.name].shape) for t in reader.tensors}
    save_file(held, str(tmp_path / "held.safetensors"))
    loaded = load_dit(dst, dtype=torch.float32)
    args = _inputs(family, seed=1)
    expected = load_dit(tmp_path / "held.safetensors", dtype=torch.float32)(*args)
    assert _relative(loaded(*args), expected) <= 1e-5
    assert 0 < _relative(loaded(*args), model(*args)) < 0.02

    # GGUF -> safetensors gives the same model back.
    back = tmp_path / "back.safetensors"
    assert cli(["convert", str(dst), str(back), "--dtype", "fp32"]) == 0
    assert _relative(load_dit(back, dtype=torch.float32)(*args), expected) <= 1e-5


@pytest.mark.parametrize("name,qtype", [("q5_1", Q.Q5_1), ("q5_0", Q.Q5_0), ("q4_1", Q.Q4_1), ("q4_0", Q.Q4_0),
                                        ("bf16", Q.BF16)])
def test_convert_other_types(tmp_path, name, qtype):
    model = _model("lumina2", seed=5, tiny=True)
    src = tmp_path / "model.safetensors"
    save_dit(model, src)
    dst = tmp_path / f"model-{name}.gguf"
    assert cli(["convert", str(src), str(dst), "--dtype", name]) == 0
    f = GGUFFile(dst)
    assert f.qtype("layers.0.feed_forward.w1.weight") == qtype
    assert f.qtype("noise_refiner.0.feed_forward.w1.weight") == (Q.BF16 if qtype == Q.BF16 else Q.F16)
    loaded = load_dit(dst, dtype=torch.float32)
    args = _inputs("lumina2")
    assert _relative(loaded(*args), model(*args)) < (0.01 if qtype == Q.BF16 else 0.2)


def test_convert_refuses_a_gguf_type_for_a_safetensors_output(tmp_path, capsys):
    src = tmp_path / "model.safetensors"
    save_dit(_model("lumina_t2i", tiny=True), src)
    assert cli(["convert", str(src), str(tmp_path / "out.safetensors"), "--dtype", "q4_0"]) == 2
    assert ".gguf" in capsys.readouterr().err


def test_convert_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    # Each tensor is read from the source only when the writer asks for it, after the previous one was written.
    from lumina_core.weights import gguf_write

    src = tmp_path / "model.safetensors"
    save_dit(_model("lumina_next", tiny=True), src)
    events = []
    original = gguf_write.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf_write.GGUFWriter, "write_tensor_data",
                        lambda self, tensor, *a, **k: (events.append("write"), original(self, tensor, *a, **k))[1])
    from lumina_core.weights import dit_files

    original_get = dit_files.DiTFile.get
    monkeypatch.setattr(dit_files.DiTFile, "get", lambda self, key: (events.append("read"), original_get(self, key))[1])
    assert cli(["convert", str(src), str(tmp_path / "x.gguf"), "--dtype", "q8_0"]) == 0
    assert events == ["read", "write"] * (len(events) // 2) and len(events) > 20


# --------------------------------------------------------------------------------------------------------------
# Bad files


def _good_file(tmp_path):
    return write_gguf_dit(tmp_path, "lumina2", arch="lumina2", types=(Q.Q8_0,))[0]


def test_truncated_gguf_dit_is_refused(tmp_path):
    path = _good_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{path.name} is truncated: tensor .* ends at byte"):
        load_dit(path)


def test_unsupported_type_is_refused_before_loading(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {}
    for key, weight in _model("lumina_next").state_dict().items():
        qtype = Q.F32 if weight.ndim == 1 or weight.numel() <= 1024 else Q.F16
        tensors[key] = (encode(weight, qtype, rng)[0], qtype)
    tensors["layers.1.attention.wq.weight"] = (random_blocks(Q.IQ4_XS, 256, 256, rng, finite=False), Q.IQ4_XS)
    path = tmp_path / "iq.gguf"
    write_file(path, tensors)
    with pytest.raises(CheckpointError, match=r"iq\.gguf: tensor 'layers\.1\.attention\.wq\.weight' is stored as "
                                              r"GGUF type IQ4_XS.*supported types: F32, F16, BF16, Q8_0"):
        load_dit(path)


@pytest.mark.parametrize("arch,message", [("flux", "a 'flux' diffusion model"), ("gemma2", "text encoder"),
                                          ("lumina3", "unknown architecture 'lumina3'")])
def test_unknown_architectures_are_refused(tmp_path, arch, message):
    path = write_gguf_dit(tmp_path, "lumina2", arch=arch, types=(Q.Q8_0,))[0]
    with pytest.raises(CheckpointError, match=message) as err:
        load_dit(path)
    assert str(path) in str(err.value) and "'lumina2'" in str(err.value)


def test_a_family_loader_names_what_a_gguf_holds(tmp_path):
    path = _good_file(tmp_path)
    with pytest.raises(CheckpointError, match="Lumina-Image-2.0"):
        load_flag_dit(path)


def test_a_gguf_without_a_dit_is_refused(tmp_path):
    path = tmp_path / "other.gguf"
    write_file(path, {"blk.0.attn_q.weight": (np.zeros((32, 32), np.float32), Q.F32)})
    with pytest.raises(CheckpointError, match="first keys: blk.0.attn_q.weight"):
        load_dit(path)


# --------------------------------------------------------------------------------------------------------------
# Nodes (plain Python)


def test_dit_loader_lists_and_loads_gguf_files(tmp_path):
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    path = write_gguf_dit(folder, "lumina2", arch="lumina2", prefix="model.diffusion_model.")[0]
    (tmp_path / "text_encoders").mkdir()
    write_file(tmp_path / "text_encoders" / "gemma.gguf", {"x": (np.zeros((2, 32), np.float32), Q.F32)}, arch="gemma2")
    model_files.set_model_folders("diffusion_models", [folder])
    model_files.set_model_folders("checkpoints", [])
    model_files.set_model_folders("text_encoders", [tmp_path / "text_encoders"])
    names = N["LuminaDiTLoader"].INPUT_TYPES()["required"]["dit_name"][0]
    assert path.name in names
    assert "gemma.gguf" in model_files.text_encoder_folder_names()  # a Gemma-2 GGUF (it asks for its tokenizer)
    (model,) = N["LuminaDiTLoader"]().load(path.name, "fp32")
    dit = comfy_model.lumina_dit(model)
    assert isinstance(dit, UnifiedNextDiT) and dit.layers[0].attention.qkv.qtype is not None
    assert FLOATS  # the float types appear in the mixed files above
