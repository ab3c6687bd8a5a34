"""GGUF reading, dequantization and the quantized linear layer. Truths: the `gguf` package's GGUFReader, writer and
reference `gguf.quants.dequantize`, and plain `torch.nn.functional.linear` on the dequantized weight."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
import torch

from lumina_core import dequantize_gguf
from lumina_core.weights.gguf_file import GGUFFile, LazyArray
from lumina_core.weights.quantized import (
    GGUFLinear,
    Workspace,
    dequantize_rows_into,
    quantized_bytes,
    share_workspace,
)
from lumina_core.weights.tensor_io import WeightsFileError, open_tensor_file
from tests.helpers_gguf import ALL_13, K_QUANTS, Q, encode, random_blocks, write_file

# Odd shapes: one row, an odd number of rows, three dimensions; rows are whole blocks, as GGUF requires.
SHAPES = [(1, 1), (7, 3), (3, 5, 2)]  # (leading dims..., blocks per row)


def _same_bits(ours: torch.Tensor, reference: np.ndarray) -> bool:
    """Bit-equal, NaNs (random scale bytes make some) compared as NaN only: numpy and torch may quiet them differently."""
    ours = ours.numpy()
    nan = np.isnan(reference)
    return ours.shape == reference.shape and ours.dtype == np.float32 and bool(
        (np.isnan(ours) == nan).all() and (ours.view(np.int32)[~nan] == reference.view(np.int32)[~nan]).all())


@pytest.mark.parametrize("qtype", ALL_13, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("finite", [True, False], ids=["scaled", "random_bytes"])
def test_dequantize_is_bit_equal_to_the_reference(qtype, shape, finite):
    rng = np.random.default_rng(abs(hash((qtype.name, shape, finite))) % 2**32)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    columns = shape[-1] * block
    rows = int(np.prod(shape[:-1]))
    raw = random_blocks(qtype, rows, columns, rng, finite=finite).reshape(*shape[:-1], -1)
    torch_shape = (*shape[:-1], columns)
    with np.errstate(all="ignore"):
        reference = gguf.quants.dequantize(raw, qtype)
    out = dequantize_gguf(torch.from_numpy(raw), qtype, torch_shape)
    assert tuple(out.shape) == torch_shape
    assert _same_bits(out, reference)
    if finite and qtype not in (Q.F32, Q.F16, Q.BF16):
        assert torch.isfinite(out).all() and out.abs().max() > 0


def test_dequantize_on_a_strided_view_and_from_the_integer_id():
    rng = np.random.default_rng(5)
    raw = torch.from_numpy(random_blocks(Q.Q4_K, 4, 512, rng))
    expected = dequantize_gguf(raw, Q.Q4_K, (4, 512))
    assert torch.equal(dequantize_gguf(raw.t().contiguous().t(), int(Q.Q4_K), (4, 512)), expected)
    assert torch.equal(dequantize_gguf(raw.clone(), "q4_k", (4, 512)), expected)
    assert torch.equal(dequantize_gguf(raw[1:3], Q.Q4_K, (2, 512)), expected[1:3])  # whole rows stay whole blocks


@pytest.mark.parametrize("qtype", [Q.IQ2_XXS, Q.IQ4_NL, Q.TQ1_0, Q.Q8_1], ids=lambda q: q.name)
def test_other_types_are_refused_with_the_supported_list(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    with pytest.raises(ValueError, match=qtype.name) as err:
        dequantize_gguf(torch.zeros(size, dtype=torch.uint8), qtype, (block,))
    assert "Q8_0" in str(err.value) and "Q6_K" in str(err.value) and "BF16" in str(err.value)


def test_wrong_byte_counts_and_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="bytes"):
        dequantize_gguf(torch.zeros(33, dtype=torch.uint8), Q.Q8_0, (32,))
    with pytest.raises(ValueError, match="whole number"):
        dequantize_gguf(torch.zeros(34, dtype=torch.uint8), Q.Q8_0, (2, 16))
    with pytest.raises(ValueError, match="uint8"):
        dequantize_gguf(torch.zeros(34, dtype=torch.int8), Q.Q8_0, (32,))


# --------------------------------------------------------------------------------------------------------------
# The reader


def _sample_file(path, alignment=None):
    rng = np.random.default_rng(0)
    tensors = {}
    shapes = {"a.f32": ((6, 4), Q.F32), "b.f16": ((3, 64), Q.F16), "c.bf16": ((5,), Q.BF16),
              "d.q8": ((8, 64), Q.Q8_0), "e.q5_1": ((2, 3, 32), Q.Q5_1), "f.q4k": ((4, 512), Q.Q4_K),
              "g.q6k": ((3, 256), Q.Q6_K)}
    for name, (shape, qtype) in shapes.items():
        tensors[name] = encode(torch.randn(shape), qtype, rng)[0], qtype
    metadata = {"general.name": "tiny", "llama.block_count": 3, "llama.rope.freq_base": 10000.0,
                "tokenizer.ggml.tokens": [f"tok{i}" for i in range(2000)], "small": [3, 1, 4],
                "tokenizer.ggml.scores": [float(i) / 7 for i in range(1500)]}
    if alignment:
        metadata["general.alignment"] = alignment
    write_file(path, tensors, arch="llama", metadata=metadata)
    return shapes


@pytest.mark.parametrize("alignment", [None, 64])
def test_reader_agrees_with_gguf_reader(tmp_path, alignment):
    path = tmp_path / "sample.gguf"
    shapes = _sample_file(path, alignment)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.keys == [t.name for t in theirs.tensors] == list(shapes)
    assert ours.data_offset == theirs.data_offset and ours.alignment == (alignment or 32)
    for t in theirs.tensors:
        assert ours.qtype(t.name) == t.tensor_type
        assert ours.shape(t.name) == tuple(int(d) for d in reversed(t.shape.tolist())) == shapes[t.name][0]
        assert ours.offset(t.name) == t.data_offset and ours.nbytes(t.name) == t.n_bytes
        assert ours.raw(t.name).numpy().tobytes() == t.data.tobytes()
        expected = gguf.quants.dequantize(t.data, t.tensor_type) if ours.is_quantized(t.name) else t.data
        if t.tensor_type == Q.BF16:
            expected = gguf.quants.dequantize(t.data, Q.BF16)
        assert np.array_equal(ours.get(t.name).float().numpy().reshape(-1), np.asarray(expected, np.float32).reshape(-1))
    assert ours.tensor_bytes == sum(t.n_bytes for t in theirs.tensors)
    meta = ours.metadata()
    for name, field in theirs.fields.items():
        if name.startswith("GGUF."):
            continue  # the reader's own entries for the header counts
        expected = field.contents()
        assert ours.value(name) == expected  # float32 values decode to the same Python floats
        if isinstance(expected, list) and len(expected) > 1024:
            assert isinstance(meta[name], LazyArray) and len(meta[name]) == len(expected)
        else:
            assert meta[name] == expected
    assert set(meta) == {name for name in theirs.fields if not name.startswith("GGUF.")}
    assert ours.architecture == "llama"
    assert isinstance(open_tensor_file(path), GGUFFile)


def test_a_256k_vocabulary_is_skipped_until_asked_for(tmp_path):
    path = tmp_path / "vocab.gguf"
    tokens = [f"\u2581piece{i}" for i in range(256_000)]
    write_file(path, {"w": (np.zeros((2, 32), np.float32), Q.F32)}, arch="gemma2",
               metadata={"tokenizer.ggml.tokens": tokens, "gemma2.block_count": 26})
    f = GGUFFile(path)
    assert isinstance(f.metadata()["tokenizer.ggml.tokens"], LazyArray)
    assert f.value("gemma2.block_count") == 26 and f.keys == ["w"]
    assert f.value("tokenizer.ggml.tokens") == tokens


def test_original_shape_metadata_is_honoured(tmp_path):
    # city96's converter stores some tensors reshaped to rows of 256 and records the shape they had.
    rng = np.random.default_rng(3)
    weight = torch.randn(4, 8, 32)
    data, values = encode(weight.reshape(4, 256), Q.Q8_0, rng)
    path = tmp_path / "reshaped.gguf"
    write_file(path, {"conv.weight": (data, Q.Q8_0)}, arch="sdxl",
               metadata={"comfy.gguf.orig_shape.conv.weight": [4, 8, 32]})
    f = GGUFFile(path)
    assert f.shape("conv.weight") == (4, 8, 32) and f.stored_shape("conv.weight") == (4, 256)
    assert torch.equal(f.get("conv.weight"), values.reshape(4, 8, 32))
    out = torch.empty(4, 8, 32, dtype=torch.bfloat16)
    assert torch.equal(f.read_into("conv.weight", out), values.reshape(4, 8, 32).to(torch.bfloat16))


def _patch(path, offset, data: bytes):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_bad_files_are_refused_naming_the_file_and_the_problem(tmp_path):
    path = tmp_path / "sample.gguf"
    _sample_file(path)
    good = path.read_bytes()
    reader = gguf.GGUFReader(path)
    last = reader.tensors[-1]

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: last.data_offset + last.n_bytes - 10])
    with pytest.raises(WeightsFileError, match=r"cut\.gguf is truncated: tensor 'g\.q6k' ends at byte"):
        GGUFFile(cut)
    cut.write_bytes(good[:200])
    with pytest.raises(WeightsFileError, match=r"cut\.gguf ends inside its header"):
        GGUFFile(cut)

    unknown = tmp_path / "unknown_type.gguf"
    unknown.write_bytes(good)
    info = reader.tensors[3].field  # d.q8: the type id follows the name and the dimensions
    type_at = info.offset + sum(int(p.nbytes) for p in info.parts[:4])
    assert struct.unpack_from("<I", good, type_at)[0] == Q.Q8_0
    _patch(unknown, type_at, struct.pack("<I", 77))
    with pytest.raises(WeightsFileError, match=r"unknown_type\.gguf: tensor 'd\.q8' has type id 77"):
        GGUFFile(unknown)

    for name, data, message in [("empty.gguf", b"", "empty"), ("text.gguf", b"hello world, not gguf", "not a GGUF"),
                                ("lfs.gguf", b"version https://git-lfs.github.com/spec/v1\n", "Git LFS"),
                                ("v9.gguf", b"GGUF" + struct.pack("<I", 9) + bytes(16), "version 9")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsFileError, match=message):
            GGUFFile(tmp_path / name)


def test_a_file_with_an_unsupported_type_reads_but_check_supported_names_it(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "iq.gguf"
    write_file(path, {"ok": (encode(torch.randn(2, 32), Q.Q8_0, rng)[0], Q.Q8_0),
                      "iq": (random_blocks(Q.IQ4_NL, 2, 32, rng, finite=False), Q.IQ4_NL)})
    f = GGUFFile(path)
    assert f.qtype("iq") == Q.IQ4_NL and f.raw("iq").shape == (2, 18)
    with pytest.raises(WeightsFileError, match=r"iq\.gguf: .*'iq' is stored as GGUF type IQ4_NL.*Q5_K"):
        f.check_supported()
    with pytest.raises(WeightsFileError, match="IQ4_NL"):
        f.get("iq")


# --------------------------------------------------------------------------------------------------------------
# The quantized linear layer


def _quantized_layer(qtype, rows=6, cols=256, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    layer = GGUFLinear(cols, rows, bias=bias)
    data, values = encode(torch.randn(rows, cols) / 16, qtype, rng)
    layer.load_quantized(torch.from_numpy(data), qtype, (rows, cols))
    if bias:
        layer.bias.data = torch.randn(rows)
    return layer.requires_grad_(False), values


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_1, Q.Q3_K, Q.Q6_K], ids=lambda q: q.name)
def test_quantized_linear_equals_linear_on_the_dequantized_weight(qtype):
    layer, values = _quantized_layer(qtype)
    x = torch.randn(3, 5, 256)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, values, layer.bias))
    # bf16 activations: the weight dequantized in fp32, then cast once.
    xb = x.to(torch.bfloat16)
    assert torch.equal(layer(xb), torch.nn.functional.linear(xb, values.to(torch.bfloat16),
                                                             layer.bias.to(torch.bfloat16)))
    assert "gguf=" + qtype.name in repr(layer)


def test_quantized_weights_stay_blocks_through_moves_and_dtype_casts():
    layer, values = _quantized_layer(Q.Q4_K, bias=True)
    raw = layer.weight.detach().clone()
    layer.to(torch.bfloat16)  # casts floating-point parameters only
    assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight, raw)
    assert layer.bias.dtype == torch.bfloat16
    state = layer.state_dict()
    assert state["weight"].dtype == torch.uint8 and tuple(state["weight"].shape) == (6, 144)
    assert quantized_bytes(layer) == 6 * 144 + 6 * 2
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, values.to(torch.bfloat16), layer.bias))


def test_weight_and_bias_functions_patch_the_dequantized_weight():
    # ComfyUI's patch hook (low-VRAM LoRA patches): functions of the dense weight, applied before the matmul.
    layer, values = _quantized_layer(Q.Q5_0, rows=4, cols=64)
    delta = torch.randn(4, 64)
    seen = []
    layer.weight_function = [lambda w: seen.append(w.dtype) or w + delta]
    layer.bias_function = [lambda b: b * 2]
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(x, values + delta, layer.bias * 2)
    assert torch.allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    assert seen == [torch.float32]


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("chunk", [256, 1000, 7 * 512, None])
def test_dequantizing_by_chunks_of_rows_gives_the_whole_tensors_values(qtype, chunk):
    """A layer's weight made a few rows at a time (the CPU's way) holds what dequantizing it whole and casting gives,
    in fp32 and in bf16, whatever the chunk (one row, several, rows left over, all)."""
    rng = np.random.default_rng(1)
    raw = torch.from_numpy(random_blocks(qtype, 23, 512, rng))
    whole = dequantize_gguf(raw, qtype, (23, 512))
    for dtype in (torch.float32, torch.bfloat16):
        out = dequantize_rows_into(torch.empty(23, 512, dtype=dtype), raw, qtype, chunk)
        assert torch.equal(out, whole.to(dtype))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name)
@pytest.mark.parametrize("chunk", [256, 1000, None])
def test_q8_0_chunks_in_a_workspace_buffer_give_the_whole_tensors_values(qtype, chunk):
    """With a workspace (Q8_0: its int8 values scaled in a reused fp32 buffer) the rows are those of dequantizing
    the tensor whole and casting, bit for bit, and the buffer is reused from one call to the next."""
    rng = np.random.default_rng(2)
    raw = torch.from_numpy(random_blocks(qtype, 23, 512, rng))
    whole = dequantize_gguf(raw, qtype, (23, 512))
    ws = Workspace()
    for dtype in (torch.float32, torch.bfloat16):
        out = dequantize_rows_into(torch.empty(23, 512, dtype=dtype), raw, qtype, chunk, ws)
        assert torch.equal(out, whole.to(dtype))
    if qtype == Q.Q8_0 and chunk is not None:
        first = ws.buffer("fp32", 1, torch.float32, "cpu").data_ptr()
        dequantize_rows_into(torch.empty(23, 512), raw, qtype, chunk, ws)
        assert ws.buffer("fp32", 1, torch.float32, "cpu").data_ptr() == first


@pytest.mark.parametrize("chunk", [1000, 7 * 512])
def test_blockwise_layers_compute_what_the_whole_weight_computes(monkeypatch, chunk):
    """With a workspace on the CPU a layer multiplies a block of output features at a time (a few rows of the
    weight dequantized at once, never the whole dense weight): the outputs are those of the whole weight, in fp32
    and bf16, bias or not, whatever the block (rows left over included)."""
    from lumina_core.weights import quantized

    layers = [_quantized_layer(Q.Q8_0, rows=37, cols=512)[0], _quantized_layer(Q.Q6_K, rows=29, cols=256, seed=1)[0],
              _quantized_layer(Q.Q4_0, rows=20, cols=96, bias=False, seed=2)[0]]
    for layer in layers:
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            whole = {dtype: layer(x.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
        ws = share_workspace(torch.nn.Sequential(layer))
        monkeypatch.setattr(quantized, "DEQUANTIZE_CHUNK", chunk)
        with torch.no_grad():
            for dtype, expected in whole.items():
                got = layer(x.to(dtype))
                assert got.shape == expected.shape and got.dtype == dtype
                # Equal up to the summation order of the matrix products: 1e-6 of the largest output in fp32,
                # one rounding (2^-8) of it in bf16.
                bound = (1e-6 if dtype == torch.float32 else 2.0 ** -8) * float(expected.abs().max())
                assert float((got.float() - expected.float()).abs().max()) <= bound
        # Only a block of the weight was ever dense at once.
        block = min(chunk // layer.in_features, layer.out_features)
        assert ws._buffers["weight"].numel() == block * layer.in_features
        assert ws._buffers["product"].numel() == 10 * block  # and the block's products, for the 2 x 5 inputs
        monkeypatch.undo()


@pytest.mark.parametrize("chunk", [1000, 7 * 512])
def test_multiply_into_multiplies_by_the_layers_outputs_in_place(monkeypatch, chunk):
    """multiply_into(x, out) leaves out * layer(x) in out, bit for bit the product with the layer's own outputs:
    blockwise on the CPU (each block of outputs multiplied in as it is made), and with autograd on (no workspace
    use) as a plain product."""
    from lumina_core.weights import quantized

    monkeypatch.setattr(quantized, "DEQUANTIZE_CHUNK", chunk)
    for layer in (_quantized_layer(Q.Q8_0, rows=37, cols=512)[0], _quantized_layer(Q.Q4_K, rows=29, cols=256,
                                                                                     bias=False, seed=1)[0]):
        ws = share_workspace(torch.nn.Sequential(layer))
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, 5, layer.in_features).to(dtype)
            out = torch.randn(2, 5, layer.out_features).to(dtype)
            with torch.no_grad():
                expected = out * layer(x)
                into = out.clone()
                assert layer.multiply_into(x, into) is into
            assert torch.equal(into, expected)
            with torch.enable_grad():
                into = out.clone()
                assert torch.equal(layer.multiply_into(x, into), out * layer(x))
        assert ws._buffers["product"].numel() == 10 * min(chunk // layer.in_features, layer.out_features)


def test_layers_sharing_a_workspace_compute_what_they_compute_alone():
    """A model's GGUF layers given one workspace (as the GGUF loaders do) give the same outputs, bit for bit, in fp32
    and bf16, with and without bias; with autograd on, or a weight patch, they make their own weight."""
    model = torch.nn.Sequential(_quantized_layer(Q.Q8_0, rows=256, cols=256)[0],
                                _quantized_layer(Q.Q4_K, rows=512, cols=256, bias=False, seed=1)[0],
                                _quantized_layer(Q.Q8_0, rows=32, cols=512, seed=2)[0])
    x = torch.randn(5, 256)
    with torch.no_grad():
        alone = {dtype: model(x.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    ws = share_workspace(model)
    assert ws is not None and all(layer.workspace is ws for layer in model)
    with torch.no_grad():
        for dtype, expected in alone.items():
            assert torch.equal(model(x.to(dtype)), expected)
    weight = ws.buffer("weight", 1, torch.bfloat16, "cpu")
    with torch.enable_grad():  # autograd keeps the weight for backward: no shared buffer
        assert torch.equal(model(x), alone[torch.float32])
    assert ws.buffer("weight", 1, torch.bfloat16, "cpu").data_ptr() == weight.data_ptr()
    assert share_workspace(torch.nn.Linear(4, 4)) is None


def test_load_quantized_refuses_blocks_that_do_not_fit():
    layer = GGUFLinear(64, 4)
    with pytest.raises(ValueError, match="uint8 of shape"):
        layer.load_quantized(torch.zeros(4, 60, dtype=torch.uint8), Q.Q8_0, (4, 64))
    with pytest.raises(ValueError, match="does not fit"):
        layer.load_quantized(torch.zeros(4, 68, dtype=torch.uint8), Q.Q8_0, (4, 64 * 2))
    with pytest.raises(ValueError, match="IQ2_XXS"):
        layer.load_quantized(torch.zeros(4, 66, dtype=torch.uint8), Q.IQ2_XXS, (4, 256))
    assert K_QUANTS  # the K types are covered by the parametrized tests above
