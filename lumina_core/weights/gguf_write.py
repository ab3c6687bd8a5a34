"""Writing GGUF files (SPEC.md §10): `write_gguf` streams tensors into a file through the `gguf` package's writer:
the header is computed from the tensor infos first, then each tensor is produced, written and dropped."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from .gguf_quants import tensor_bytes
from .tensor_io import WeightsFileError


def write_gguf(
    path,
    infos: dict,
    produce: Callable[[str], np.ndarray],
    *,
    arch: Optional[str],
    metadata: Iterable[tuple[str, Any]] = (),
    progress: Optional[Callable[[int, int], None]] = None,
) -> None:
    """Stream tensors into a GGUF file.

    infos: name -> (torch-order shape, GGMLQuantizationType), in file order. produce(name) returns the tensor's data
    for that type: float32/float16 numpy for F32/F16, the uint8 bytes (`gguf.quants.quantize`) for the others. arch:
    `general.architecture` (None: none written). metadata: (key, value) pairs added with the writer's typed adders
    (ints as uint32, strings, lists of ints as int32 arrays). Written beside `path` and renamed at the end, so an
    interrupted write never leaves a half file under the final name.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    writer = GGUFWriter(None, arch or "")  # an empty arch adds no general.architecture key
    for key, value in metadata:
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, (list, tuple)):
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            writer.add_uint32(key, int(value))
    for name, (shape, qtype) in infos.items():
        writer.add_tensor_info(name, tuple(shape), np.dtype(np.float32), tensor_bytes(qtype, shape), raw_dtype=qtype)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        total = len(infos)
        for i, (name, (shape, qtype)) in enumerate(infos.items()):
            data = np.ascontiguousarray(produce(name))
            if data.nbytes != tensor_bytes(qtype, shape):
                raise WeightsFileError(f"{name}: {data.nbytes} bytes produced for a {qtype.name} tensor of shape "
                                       f"{tuple(shape)} ({tensor_bytes(qtype, shape)} expected)")
            writer.write_tensor_data(data)
            del data
            if progress is not None:
                progress(i + 1, total)
        writer.close()
        os.replace(tmp, path)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
