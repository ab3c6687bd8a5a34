"""The file format of prompt encodings saved to disk, so the text encoder need not be loaded once the prompts are
encoded (`lumina_core.conditioning` adds what the model families say about them).

A file is a plain safetensors file: `features` [B, L, width] in the dtype they were computed in (float32 from the
encoders here), `mask` [B, L] bool, and string metadata naming the text-encoder family and width, so that features of
one family are never fed to the DiT of another (a Lumina-Next Gemma encoding is 2048 wide, Lumina-T2I's LLaMA
encoding 4096). Reading and writing go through `tensor_io` (no pickles, no memory map): the round trip is bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from .tensor_io import SafetensorsFile, WeightsFileError, write_safetensors

FORMAT = "lumina-conditioning"
FORMAT_VERSION = "1"
T2I_FAMILY = "lumina_t2i"  # the family of files that name none (the first format had no family field)


class ConditioningFileError(WeightsFileError):
    """A saved encoding that cannot be used, naming the file and what to do."""


class SavedConditioning(NamedTuple):
    features: torch.Tensor  # [B, L, width]
    mask: torch.Tensor  # [B, L] bool, True on real tokens
    meta: dict  # family, width, text_encoder, prompt, ... (strings and numbers as saved)


def save(path, features: torch.Tensor, mask: torch.Tensor, **meta) -> Path:
    """Write features and mask with `meta` (family defaults to "lumina_t2i"; width is taken from the features).

    Meta values are stored as JSON, so strings, numbers and lists come back as they went in.
    """
    path = Path(path)
    if features.ndim != 3:
        raise ValueError(f"features must be [batch, tokens, width], got shape {tuple(features.shape)}")
    if tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match features {tuple(features.shape)}")
    meta.setdefault("family", T2I_FAMILY)
    width = int(features.shape[-1])
    if "width" in meta and int(meta["width"]) != width:
        raise ValueError(f"meta width {meta['width']} differs from the features' width {width}")
    meta["width"] = width
    features = features.detach().cpu()
    mask = mask.detach().cpu().bool()
    header = {"format": FORMAT, "format_version": FORMAT_VERSION}
    header.update({f"meta.{k}": json.dumps(v) for k, v in meta.items()})
    write_safetensors(
        path,
        iter((("features", features), ("mask", mask))),
        shapes={"features": (tuple(features.shape), features.dtype), "mask": (tuple(mask.shape), torch.bool)},
        metadata=header,
    )
    return path


def load(path) -> SavedConditioning:
    """Read a file written by `save`: (features, mask, meta), exactly as saved."""
    path = Path(path)
    if not path.is_file():
        raise ConditioningFileError(f"saved conditioning {path} does not exist: check the file name and folder")
    st = SafetensorsFile(path, ConditioningFileError)
    header = st.metadata()
    if header.get("format") != FORMAT or not {"features", "mask"} <= set(st.keys):
        raise ConditioningFileError(
            f"{path} is not a saved Lumina conditioning (tensors {', '.join(st.keys[:4]) or 'none'}, format "
            f"{header.get('format')!r}): make one with Lumina Save Conditioning or `python -m lumina_core demo "
            f"--save-cond`"
        )
    try:
        meta = {k[len("meta."):]: json.loads(v) for k, v in header.items() if k.startswith("meta.")}
    except json.JSONDecodeError as err:
        raise ConditioningFileError(f"{path}: unreadable metadata ({err}); save the conditioning again") from None
    features, mask = st.get("features"), st.get("mask")
    if features.ndim != 3 or tuple(mask.shape) != tuple(features.shape[:2]):
        raise ConditioningFileError(
            f"{path}: features {tuple(features.shape)} and mask {tuple(mask.shape)} do not belong together; "
            f"save the conditioning again"
        )
    return SavedConditioning(features, mask.bool(), meta)


def is_conditioning_file(path) -> bool:
    """Whether `path` is a file written by `save` (reads its header only; False for anything unreadable)."""
    try:
        return SafetensorsFile(Path(path), ConditioningFileError).metadata().get("format") == FORMAT
    except (OSError, ValueError):
        return False
