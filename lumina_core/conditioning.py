"""Prompt encodings saved to disk (`lumina_core.weights.saved_conditioning`), with what the registry knows of them:
which text encoder made the features of each family, and whether a DiT can take them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .families import FAMILIES
from .weights.saved_conditioning import (  # noqa: F401  (the names of this module's users)
    FORMAT,
    T2I_FAMILY,
    ConditioningFileError,
    SavedConditioning,
    is_conditioning_file,
    load,
)
from .weights.saved_conditioning import save as save_file


def save(path, features: torch.Tensor, mask: torch.Tensor, **meta) -> Path:
    """Write features and mask with `meta` (family defaults to "lumina_t2i"; width is taken from the features; the
    family's text encoder is recorded unless given)."""
    family = meta.setdefault("family", T2I_FAMILY)
    if family in FAMILIES:
        meta.setdefault("text_encoder", FAMILIES[family].text_encoder_title)
    return save_file(path, features, mask, **meta)


def check_family(meta: dict, *, family: str, width: int, source: str = "the conditioning") -> None:
    """Raise ValueError unless an encoding's family and width are the ones a DiT of `family` with caption width
    `width` takes."""
    found = meta.get("family")
    found_width = meta.get("width")
    if found != family:
        made_by = FAMILIES[found].text_encoder_title if found in FAMILIES else f"an unknown text encoder ({found!r})"
        wanted = FAMILIES[family].text_encoder_title if family in FAMILIES else family
        raise ValueError(
            f"{source} was encoded for {found} by {made_by} ({found_width}-wide features), but this DiT is {family} "
            f"and needs {wanted} features: encode the prompt again with the text encoder of this DiT."
        )
    if found_width is not None and int(found_width) != width:
        raise ValueError(
            f"{source} has {found_width}-wide features but this DiT expects {width} (its cap_feat_dim): encode the "
            f"prompt again with the text encoder the DiT was trained with."
        )
