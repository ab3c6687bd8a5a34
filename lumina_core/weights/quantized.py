"""Quantized storage: linear layers whose weight stays in GGUF blocks and is dequantized when the layer runs.

A quantized weight is the tensor's raw bytes, a uint8 parameter of shape [out_features, row_bytes] (blocks never
cross rows, SPEC.md §10), with its GGUF type and shape on the layer. Being an ordinary parameter it moves with the
module (`.to(device)`, ComfyUI's load and offload) as its bytes, is left alone by dtype casts (`.to(torch.bfloat16)`
casts floating-point parameters only) and counts its true size in a state dict. In forward the bytes go to the
input's device, are dequantized there in fp32 (`dequantize_gguf`), patched, and cast to the input's dtype: one
layer's dense weight exists at a time, as with fp8 storage (`lumina_core.weights.fp8`). On the CPU, without
patches, the fp32 values exist only a chunk of rows at a time (`dequantize_rows_into`), each cast into the dense
weight as it is made: a whole Flag-DiT feed-forward matrix in fp32 with its temporaries is 0.1-0.2 GB, and such
blocks, freed layer after layer between smaller allocations, fragment the C heap (measured over one sampling step of
the 5B Flag-DiT at 512x512 with cfg on 2 cores: +0.9 to +1.1 GB resident over the loaded model with whole
matrices, +0.4 to +0.7 GB in chunks of 4M weights, which also ran 10-20% faster). GPUs take whole matrices: their
caching allocator reuses the blocks, and each chunk would be more kernel launches. The values are the same either
way: each is rounded to the compute dtype once, from the same fp32 value. A `GGUFLinear` of a model loaded from a
GGUF file goes further on the CPU (`share_workspace`): it never makes its whole dense weight, but multiplies a block
of output features at a time, dequantized into a buffer the model's layers share (the outputs equal the whole
weight's up to the summation order of the matrix products).

`QuantizedWeight` is the part any linear class can mix in (the core's `GGUFLinear`; the nodes mix it into ComfyUI's
`comfy.ops` Linear so that low-VRAM partial loading and offload apply). Its hook for weight patches (LoRA): the
layer's `weight_function` / `bias_function` lists, ComfyUI's own names for them (its `cast_bias_weight` applies them
the same way), are applied in order to the dequantized fp32 weight before the cast, so a patch sees and changes the
real weight, never the blocks. A layer whose weight is a plain float tensor (an unquantized tensor of a GGUF file)
casts it to the input's dtype and applies the same functions.

`GGUFEmbedding` keeps an embedding table the same way and dequantizes only the rows it looks up.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from gguf import GGMLQuantizationType
from torch import nn

from .gguf_quants import QTypeLike, check_supported, dequantize_gguf, qtype_of, raw_shape

DEQUANTIZE_CHUNK = 1 << 22  # on the CPU, weights dequantized at once on their way to the compute dtype (16 MiB fp32)


def dequantize_rows_into(out: torch.Tensor, raw: torch.Tensor, qtype: QTypeLike,
                         chunk: Optional[int] = DEQUANTIZE_CHUNK, workspace: Optional[Workspace] = None
                         ) -> torch.Tensor:
    """Fill `out` ([rows, columns], any float dtype, on raw's device) with the GGUF rows `raw` (uint8 [rows,
    row_bytes]) dequantized, about `chunk` weights at a time (None: all at once): the fp32 values of one chunk exist
    at once, each rounded to out's dtype as `.to(dtype)` would round it. With a `workspace`, Q8_0 chunks are made in
    its reused fp32 buffer (no allocation per chunk)."""
    rows, columns = out.shape
    step = rows if chunk is None else max(1, chunk // columns)
    if workspace is not None and qtype_of(qtype) == GGMLQuantizationType.Q8_0:
        return _q8_0_rows_into(out, raw, workspace.buffer("fp32", step * columns, torch.float32, raw.device))
    for start in range(0, rows, step):
        part = raw[start:start + step]
        out[start:start + step].copy_(dequantize_gguf(part, qtype, (part.shape[0], columns)))
    return out


def _q8_0_rows_into(out: torch.Tensor, raw: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """`dequantize_rows_into` for Q8_0 in the fp32 buffer `buf` (a whole number of rows): each chunk's int8 values
    are converted into it and scaled there by their blocks' fp16 scales (the fp32 product `dequantize_gguf`
    computes), then rounded into `out`."""
    rows, columns = out.shape
    per_row = columns // 32
    step = buf.numel() // columns
    for start in range(0, rows, step):
        blocks = raw[start:start + step].reshape(-1, 34)  # 2 bytes fp16 scale, 32 int8 values
        n = blocks.shape[0] // per_row
        values = buf[:n * columns].view(-1, 32)
        values.copy_(blocks[:, 2:].view(torch.int8))
        values.mul_(blocks[:, :2].view(torch.float16).float())
        out[start:start + n].copy_(values.view(n, columns))
    return out


class Workspace:
    """Buffers the GGUF layers of one model share on the CPU (`share_workspace`): the block of dense weight the
    layer running multiplies, the fp32 values it is made from, and the block's product. Made anew for every layer, whole dense weights
    (10-100 MB) landed between the small tensors that outlive a layer (a generation's cached text keys and values,
    activations) and the C heap kept the holes: measured on the 5B Flag-DiT as Q8_0 at 512x512 with cfg, resident
    memory grew by the size of one layer's text-key weight (25 MB) in most of its 32 layers during a step. Reused,
    the buffers are allocated once (a few MB each) and freed with the model. One forward at a time per model."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """A flat tensor of `numel` values (the start of the buffer `name`, made or grown as needed)."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            self._buffers.pop(name, None)  # free the old one before making the new
            buf = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


class QuantizedWeight:
    """Mixin for a linear layer (an nn.Linear subclass): the weight may be GGUF blocks, see the module docstring.

    qtype: None while the weight is a float tensor; else the GGUF type, with `weight_shape` the weight's dense shape.
    """

    qtype = None
    weight_shape: Optional[torch.Size] = None
    workspace: Optional[Workspace] = None  # set by `share_workspace`

    def load_quantized(self, raw: torch.Tensor, qtype: QTypeLike, shape) -> None:
        """Make `raw` (uint8 [out_features, row_bytes], on any device) the weight, kept quantized as `qtype`."""
        qtype = check_supported(qtype, "a quantized linear weight")
        shape = torch.Size(int(d) for d in shape)
        if tuple(shape) != (self.out_features, self.in_features):
            raise ValueError(f"a weight of shape {tuple(shape)} does not fit a linear layer {self.in_features} -> "
                             f"{self.out_features}")
        if raw.dtype != torch.uint8 or tuple(raw.shape) != raw_shape(qtype, shape):
            raise ValueError(f"the blocks of a {qtype.name} weight of shape {tuple(shape)} are uint8 of shape "
                             f"{raw_shape(qtype, shape)}, got {raw.dtype} of shape {tuple(raw.shape)}")
        self.weight = nn.Parameter(raw, requires_grad=False)
        self.qtype = qtype
        self.weight_shape = shape

    @property
    def is_quantized(self) -> bool:
        return self.qtype is not None

    def dequantized_weight(self, device=None) -> torch.Tensor:
        """The dense weight on `device` (default: where the blocks are): fp32 when quantized, else the stored tensor."""
        weight = self.weight if device is None else self.weight.to(device, non_blocking=True)
        if self.qtype is None:
            return weight
        return dequantize_gguf(weight, self.qtype, self.weight_shape)

    def cast_weight_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(weight, bias) for a forward on `x`: dense, patched by `weight_function`/`bias_function`, in x's dtype and
        on x's device."""
        patches = getattr(self, "weight_function", ())
        if self.qtype is not None and not patches:
            weight = torch.empty(self.weight_shape, dtype=x.dtype, device=x.device)
            chunk = DEQUANTIZE_CHUNK if x.device.type == "cpu" else None
            dequantize_rows_into(weight, self.weight.to(x.device, non_blocking=True), self.qtype, chunk)
        else:
            weight = self.dequantized_weight(x.device)
            if self.qtype is None:
                weight = weight.to(x.dtype)
            for patch in patches:
                weight = patch(weight)
            weight = weight.to(x.dtype)
        return weight, self.cast_bias(x)

    def cast_bias(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The bias for a forward on `x` (None without one), patched by `bias_function`."""
        if self.bias is None:
            return None
        bias = self.bias.to(device=x.device, dtype=x.dtype)
        for patch in getattr(self, "bias_function", ()):
            bias = patch(bias)
        return bias

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return f"{text}, gguf={self.qtype.name}" if self.qtype is not None else text


class GGUFLinear(QuantizedWeight, nn.Linear):
    """nn.Linear whose weight is GGUF blocks (after `load_quantized`) or any float tensor, cast to the input's dtype
    and device in forward. Same constructor and state-dict keys as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_blockwise(x):
            return self._blockwise(x, self.workspace)
        weight, bias = self.cast_weight_bias(x)
        return nn.functional.linear(x, weight, bias)

    def multiply_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out *= self(x), in place (out: x's shape with out_features last); blockwise on the CPU, each block of
        outputs multiplied into out as it is made, so the layer's whole output never exists. Returns out."""
        if not self._runs_blockwise(x):
            return out.mul_(self(x))
        self._blockwise(x, self.workspace, into=out.view(-1, out.shape[-1]))
        return out

    def _runs_blockwise(self, x: torch.Tensor) -> bool:
        return (self.workspace is not None and self.qtype is not None and x.device.type == "cpu"
                and not torch.is_grad_enabled() and not getattr(self, "weight_function", ()))

    def _blockwise(self, x: torch.Tensor, ws: Workspace, into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The layer on the CPU without a whole dense weight: about DEQUANTIZE_CHUNK weights (a block of output
        features) at a time are dequantized into the workspace and multiplied, each block's outputs written into
        the result (or, with `into` [tokens, out_features], multiplied into it)."""
        rows, columns = self.weight_shape
        step = max(1, DEQUANTIZE_CHUNK // columns)
        bias = self.cast_bias(x)
        flat = x.reshape(-1, columns)
        out = flat.new_empty(flat.shape[0], rows) if into is None else into
        tokens = flat.shape[0]
        buf = ws.buffer("weight", min(step, rows) * columns, x.dtype, x.device)
        product = ws.buffer("product", tokens * min(step, rows), x.dtype, x.device)
        for start in range(0, rows, step):
            n = min(step, rows - start)
            # The block's fp32 values a quarter at a time (a 4 MB buffer instead of 16 MB for Q8_0).
            weight = dequantize_rows_into(buf[:n * columns].view(n, columns), self.weight[start:start + n],
                                          self.qtype, DEQUANTIZE_CHUNK // 4, ws)
            block = product[:tokens * n].view(tokens, n)  # the block's outputs, in a reused buffer too
            if bias is None:
                torch.mm(flat, weight.t(), out=block)
            else:
                torch.addmm(bias[start:start + n], flat, weight.t(), out=block)
            if into is None:
                out[:, start:start + n] = block
            else:
                out[:, start:start + n].mul_(block)
        return out.view(*x.shape[:-1], rows)


class GGUFEmbedding(nn.Module):
    """An embedding table kept as GGUF blocks: the rows of the ids looked up are gathered from the blocks (a row is
    whole blocks) and dequantized in fp32, never the whole table; the result is cast to `compute_dtype` and, for a
    scaled embedding (Gemma's sqrt(hidden)), multiplied by `embed_scale` cast to that dtype first, as transformers'
    scaled embedding multiplies its table's rows.

    weight: uint8 [num_embeddings, row_bytes], a parameter, so it moves with the model as its bytes.
    """

    def __init__(self, raw: torch.Tensor, qtype: QTypeLike, shape, compute_dtype: torch.dtype,
                 embed_scale: Optional[float] = None):
        super().__init__()
        self.qtype = check_supported(qtype, "a quantized embedding")
        self.num_embeddings, self.embedding_dim = (int(d) for d in shape)
        if raw.dtype != torch.uint8 or tuple(raw.shape) != raw_shape(self.qtype, shape):
            raise ValueError(f"the blocks of a {self.qtype.name} embedding of shape {tuple(shape)} are uint8 of shape "
                             f"{raw_shape(self.qtype, shape)}, got {raw.dtype} of shape {tuple(raw.shape)}")
        self.weight = nn.Parameter(raw, requires_grad=False)
        self.compute_dtype = compute_dtype
        scale = None if embed_scale is None else torch.tensor(float(embed_scale), device=raw.device)
        self.register_buffer("embed_scale", scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids.reshape(-1).to(self.weight.device)]
        out = dequantize_gguf(rows, self.qtype, (rows.shape[0], self.embedding_dim)).to(self.compute_dtype)
        out = out.reshape(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(self.compute_dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf={self.qtype.name}"


# The `operations` namespace the DiTs are built with to keep a GGUF file's linear weights quantized.
GGUF_OPERATIONS = types.SimpleNamespace(Linear=GGUFLinear)


def share_workspace(model: nn.Module) -> Optional[Workspace]:
    """Give the quantized layers of `model` one `Workspace` (None when it has none); the loaders of GGUF files call
    it once the weights are in."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedWeight) and m.qtype is not None]
    if not layers:
        return None
    ws = Workspace()
    for layer in layers:
        layer.workspace = ws
    return ws


def quantized_bytes(model: nn.Module) -> int:
    """The bytes of a model's parameters and buffers as held (quantized weights as their blocks)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
