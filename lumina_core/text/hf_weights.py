"""Reading the weights of a Hugging Face model folder: the shard index, safetensors (positioned reads) or
`pytorch_model*.bin` (`torch.load(weights_only=True)`, memory-mapped), every tensor checked against the model
before any is read and then copied once, cast to its storage dtype as it is read.

The errors name the folder or file, what is wrong with it (empty, a Git LFS pointer, truncated, a pickle that
would run code, stale or missing shards) and the repository to get it from again.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from ..weights.tensor_io import SafetensorsFile

LLAMA2_7B = "meta-llama/Llama-2-7b-hf"

# Keys that a published checkpoint may hold but the bare decoder must not load.
_LM_HEAD = "lm_head.weight"  # the *ForCausalLM output projection: not part of the text encoder
# Old LLaMA conversions saved the rotary inverse frequencies with the weights; they are recomputed from config.json.
_ROTARY_SUFFIX = "rotary_emb.inv_freq"


class TextEncoderError(ValueError):
    """A text encoder folder that cannot be used, with a message naming the folder or file and the fix."""


def find_weight_files(folder: str, source: str = LLAMA2_7B) -> list[str]:
    """The weight files to read: safetensors (preferred; as listed by the index if there is one), else .bin.

    source: the Hugging Face repository the folder should be a copy of, named in the errors.
    """
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    names = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise TextEncoderError(
                    f"Could not read the shard index {index_path}: {err!r}. Re-download it from {source}."
                ) from err
            missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
            if missing:
                raise TextEncoderError(
                    f"{index_path} lists {len(names)} weight files but {len(missing)} are missing from {folder}: "
                    f"{', '.join(missing[:4])}. Download every shard."
                )
            return [os.path.join(folder, n) for n in names]
        files = sorted(glob.glob(os.path.join(glob.escape(folder), pattern)))
        if files:
            return files
    raise TextEncoderError(
        f"No weights in {folder}: expected *.safetensors (or pytorch_model*.bin) files next to config.json. "
        f"Download the weights of {source} into this folder."
    )


def refuse_file(
    path: str, err: BaseException | None = None, reason: str | None = None, source: str = LLAMA2_7B
) -> TextEncoderError:
    """The error for a weights file that cannot be read: says why, as precisely as can be told, and the fix."""
    if reason is None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
        if size == 0:
            reason = "it is empty (0 bytes): the download did not finish"
        elif head.startswith(b"version https://git-lfs"):
            reason = "it is a Git LFS pointer, not the weights: run `git lfs pull` in the folder"
        else:
            reason = f"it is corrupted or truncated ({str(err).splitlines()[0] if err else 'unreadable'})"
    return TextEncoderError(f"Could not read the weights file {path}: {reason}. Re-download it from {source}.")


def load_bin(path: str, source: str = LLAMA2_7B) -> dict:
    """A pytorch_model*.bin state dict, memory-mapped, refusing anything that is not plain tensors.

    weights_only=True makes torch.load refuse pickles that would call arbitrary code; there is deliberately no
    fallback to weights_only=False. mmap=True leaves the data on disk until a tensor is copied out.
    """
    if os.path.getsize(path) == 0 or not zipfile.is_zipfile(path):
        # mmap needs torch's zip format; anything else is empty, truncated, or the pre-1.6 legacy format.
        reason = None
        if os.path.getsize(path) > 0:
            reason = (
                "it is not a zip-format torch checkpoint: it is truncated or corrupted, or saved in the legacy "
                "(pre-1.6) format that cannot be memory-mapped (convert it to safetensors)"
            )
        raise refuse_file(path, reason=reason, source=source)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise refuse_file(
            path,
            reason=(
                "it was refused because unpickling it needs arbitrary code (it could run anything on this machine), "
                "or it is corrupted; nothing in it was executed. Use the model's .safetensors weights instead"
            ),
            source=source,
        ) from err
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise refuse_file(path, err, source=source) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise refuse_file(path, reason="it does not hold a plain state dict of tensors", source=source)
    return state


def index_weights(
    folder: str,
    files: list[str],
    expected: dict[str, tuple],
    source: str = LLAMA2_7B,
    model_name: str = "LlamaModel",
) -> dict[str, tuple[str, str]]:
    """Map each key of the bare decoder (model_name, e.g. LlamaModel) to (file, key in file); raise on any mismatch.

    Reads headers only. A *ForCausalLM checkpoint's "model." prefix is dropped and its lm_head is never read.

    Everything is checked before a single tensor is read, so a wrong folder fails in seconds, not after 13 GB.
    """
    sources: dict[str, tuple[str, str]] = {}
    unexpected: list[str] = []
    wrong_shape: list[str] = []
    for path in files:
        for key, shape in tensor_shapes(path, source):
            if key == _LM_HEAD or key.endswith(_ROTARY_SUFFIX):
                continue
            # LlamaForCausalLM keeps the decoder under "model."; LlamaModel has no submodule of that name.
            name = key.removeprefix("model.")
            if name not in expected:
                unexpected.append(f"{key} ({os.path.basename(path)})")
            elif name in sources:
                raise TextEncoderError(
                    f"{key} is stored twice, in {sources[name][0]} and {path}: remove the stale weight files "
                    f"from {folder} (keep one complete set)."
                )
            else:
                sources[name] = (path, key)
                if shape != expected[name]:
                    wrong_shape.append(f"{key}: {list(shape)} in {os.path.basename(path)}, {list(expected[name])}")
    missing = [name for name in expected if name not in sources]
    if missing or unexpected:
        raise TextEncoderError(
            f"The weights in {folder} do not match {model_name} as described by its config.json: "
            f"{len(missing)} missing keys {missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}. "
            f"config.json and the weight files must come from the same checkpoint ({source})."
        )
    if wrong_shape:
        raise TextEncoderError(
            f"The weights in {folder} have other shapes than its config.json describes (found, expected): "
            f"{'; '.join(wrong_shape[:4])}. config.json and the weight files must come from the same checkpoint."
        )
    return sources


def tensor_shapes(path: str, source: str = LLAMA2_7B) -> list[tuple[str, tuple]]:
    if path.endswith(".bin"):
        return [(k, tuple(v.shape)) for k, v in load_bin(path, source).items()]
    st = SafetensorsFile(Path(path), error=TextEncoderError)
    return [(k, st.shape(k)) for k in st.keys]


def read_weights(
    sources: dict[str, tuple[str, str]], dtypes, device: torch.device, source: str = LLAMA2_7B
) -> dict:
    """Read every tensor once, cast it to its dtype on device as it is read, one tensor in flight at a time.

    dtypes: one torch.dtype for every tensor, or a dict name -> dtype (fp8 storage keeps norms in the compute dtype).
    """
    if isinstance(dtypes, torch.dtype):
        dtypes = dict.fromkeys(sources, dtypes)
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (path, key) in sources.items():
        by_file.setdefault(path, []).append((name, key))
    state_dict = {}
    for path, entries in by_file.items():
        if path.endswith(".bin"):
            read_bin_file(path, entries, dtypes, device, state_dict, source)
        else:
            read_safetensors_file(path, entries, dtypes, device, state_dict)
    return state_dict


def read_bin_file(
    path: str, entries, dtypes: dict, device: torch.device, state_dict: dict, source: str = LLAMA2_7B
) -> None:
    # One mapping per file: its pages stay mapped until the file's last tensor is copied, but they are clean file
    # pages the kernel can drop under pressure, not a second copy in memory.
    stored = load_bin(path, source)
    for name, key in entries:
        state_dict[name] = _copy_as(stored.pop(key), dtypes[name], device)


def read_safetensors_file(path: str, entries, dtypes: dict, device: torch.device, state_dict: dict) -> None:
    # Positioned reads in file order, one tensor at a time (tensor_io explains why not a memory map).
    st = SafetensorsFile(Path(path), error=TextEncoderError)
    for name, key in sorted(entries, key=lambda entry: st.offset(entry[1])):
        state_dict[name] = _copy_as(st.get(key), dtypes[name], device, True)  # owned: a fresh read buffer


def _copy_as(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device, owned: bool = False) -> torch.Tensor:
    """The tensor in dtype on device, never a view into the file (which would keep it mapped).

    owned: the tensor is already a private buffer (read, not mapped), so no copy is needed when it has the target
    dtype and device.
    """
    if owned:
        return tensor.to(device=device, dtype=dtype)
    return torch.empty(tensor.shape, dtype=dtype, device=device).copy_(tensor)


