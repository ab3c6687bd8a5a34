"""The registry of model families: what Lumina-T2I, Lumina-Next and Lumina-Image-2.0 each are, in one place.

A family says how its DiT is recognised from a checkpoint's keys and loaded, how its text encoder is recognised
from a Hugging Face folder's config.json and loaded, its sampling defaults (those of its original demo), how its
resolution extrapolation turns into DiT keywords, and its latent format. Loaders, the sampler and the nodes ask
this module; none of them tests family names. A new family is a DiT module, a text-encoder module and one entry in
FAMILIES.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from .models.flag_dit import FlagDiT
from .models.flag_dit import family_extrapolation as t2i_extrapolation
from .models.next_dit import NextDiT, next_dit_extrapolation_kwargs
from .models.unified_next_dit import UnifiedNextDiT, unified_next_dit_extrapolation_kwargs
from .sampling.loop import SamplingDefaults
from .text import single_file
from .weights.dit_files import _check_path, load_dit_file, read_dit_config
from .weights.layouts import CheckpointError, describe_foreign, find_layout
from .weights.tensor_io import is_gguf, open_tensor_file

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Family:
    name: str  # the value of `model.family` and of a text encoder's `family`
    title: str  # "Lumina-T2I"
    dit_title: str  # "Flag-DiT"
    text_encoder_title: str  # "LLaMA-2-7B"
    text_encoder_source: str  # where users get the text encoder
    latent_format: str  # "sdxl": 4-channel SDXL-VAE latents scaled by 0.13025; "flux": 16-channel FLUX-AE latents
    defaults: SamplingDefaults
    matches_checkpoint: Callable[[list], bool]  # keys of a checkpoint file -> is this family's DiT
    read_dit_config: Callable  # path -> configuration (no weights read)
    load_dit: Callable  # (path, *, dtype, device, operations) -> DiT module
    dit_class: Callable  # () -> the DiT class (imported on demand)
    matches_text_encoder: Callable[[dict], bool]  # config.json of a folder -> is this family's text encoder
    text_encoder_class: Callable  # () -> the encoder class with from_folder(path, *, dtype, device)
    text_encoder_gguf_architecture: str  # general.architecture of its text encoder's llama.cpp GGUF files
    extrapolation_kwargs: Callable  # (mode, latent_h, latent_w, t, watershed) -> DiT keywords


# --------------------------------------------------------------------------------------------------------------
# What the registry needs of each family, read from the layout table and the modules


def _matches(family: str) -> Callable[[list], bool]:
    def matches(keys: list) -> bool:
        found = find_layout(keys)
        return found is not None and found[0].family == family

    return matches


def _loader(family: str) -> Callable:
    def load(path, *, dtype, device, operations=None):
        return load_dit_file(path, dtype=dtype, device=device, operations=operations, families=(family,))

    return load


def _text_encoder_class(module: str, name: str):
    # Imported on first use: transformers is heavy, and a registry lookup (file lists, detection) needs none of it.
    import importlib

    return getattr(importlib.import_module(f"{__package__}.text.{module}"), name)


def _is_llama_config(config: dict) -> bool:
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    return model_type == "llama" or (not model_type and any(a.startswith("Llama") for a in architectures))


def _is_gemma_config(config: dict) -> bool:
    # Gemma-2B (model_type "gemma"). Gemma 2/3 belong to Lumina-Image-2.0 and are not Lumina-Next's encoder.
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    return model_type == "gemma" or (
        not model_type and any(a in ("GemmaModel", "GemmaForCausalLM") for a in architectures)
    )


def _is_gemma2_config(config: dict) -> bool:
    # Gemma-2-2B (model_type "gemma2"), Lumina-Image-2.0's encoder; a hand-written config may name only the class.
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    return model_type == "gemma2" or (not model_type and any(a.startswith("Gemma2") for a in architectures))


# --------------------------------------------------------------------------------------------------------------
# The registry

LUMINA_T2I = Family(
    name="lumina_t2i",
    title="Lumina-T2I",
    dit_title="Flag-DiT",
    text_encoder_title="LLaMA-2-7B",
    text_encoder_source="the Hugging Face folder of meta-llama/Llama-2-7b-hf",
    latent_format="sdxl",
    defaults=SamplingDefaults(solver="euler", steps=29, cfg=4.0, shift=4.0, extrapolation="t2i"),
    matches_checkpoint=_matches("lumina_t2i"),
    read_dit_config=partial(read_dit_config, families=("lumina_t2i",)),
    load_dit=_loader("lumina_t2i"),
    dit_class=lambda: FlagDiT,
    matches_text_encoder=_is_llama_config,
    text_encoder_class=lambda: _text_encoder_class("llama", "LlamaTextEncoder"),
    text_encoder_gguf_architecture="llama",
    extrapolation_kwargs=t2i_extrapolation,
)

LUMINA_NEXT = Family(
    name="lumina_next",
    title="Lumina-Next",
    dit_title="Next-DiT",
    text_encoder_title="Gemma-2B",
    text_encoder_source="the Hugging Face folder of google/gemma-2b",
    latent_format="sdxl",
    defaults=SamplingDefaults(solver="midpoint", steps=29, cfg=4.0, shift=4.0, extrapolation="time_aware"),
    matches_checkpoint=_matches("lumina_next"),
    read_dit_config=partial(read_dit_config, families=("lumina_next",)),
    load_dit=_loader("lumina_next"),
    dit_class=lambda: NextDiT,
    matches_text_encoder=_is_gemma_config,
    text_encoder_class=lambda: _text_encoder_class("gemma", "GemmaTextEncoder"),
    text_encoder_gguf_architecture="gemma",
    extrapolation_kwargs=next_dit_extrapolation_kwargs,
)

LUMINA_2 = Family(
    name="lumina2",
    title="Lumina-Image-2.0",
    dit_title="Unified Next-DiT",
    text_encoder_title="Gemma-2-2B",
    text_encoder_source=(
        "the Hugging Face folder of google/gemma-2-2b (or ComfyUI's gemma_2_2b_fp16.safetensors, or the "
        "all-in-one lumina_2.safetensors)"
    ),
    latent_format="flux",
    # The original demo: 18 grid points (17 steps) midpoint, shift 6, cfg 4 on all 16 channels, guidance only while
    # t < 0.25, the guided velocity's norm clamped to the conditional one's.
    defaults=SamplingDefaults(
        solver="midpoint", steps=17, cfg=4.0, shift=6.0, extrapolation="off", guidance="all", cfg_trunc=0.25,
        renorm_cfg=1.0,
    ),
    matches_checkpoint=_matches("lumina2"),
    read_dit_config=partial(read_dit_config, families=("lumina2",)),
    load_dit=_loader("lumina2"),
    dit_class=lambda: UnifiedNextDiT,
    matches_text_encoder=_is_gemma2_config,
    text_encoder_class=lambda: _text_encoder_class("gemma2", "Gemma2TextEncoder"),
    text_encoder_gguf_architecture="gemma2",
    extrapolation_kwargs=unified_next_dit_extrapolation_kwargs,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LUMINA_T2I, LUMINA_NEXT, LUMINA_2)}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of(obj, default: Optional[str] = None) -> Family:
    """The family of a DiT, a text encoder or anything else carrying a `family` name.

    Objects without one (plain callables in tests) get `default`, or an error when no default is given.
    """
    name = getattr(obj, "family", None) or default
    if name is None:
        raise ValueError(f"{type(obj).__name__} does not say which Lumina family it belongs to")
    return get_family(name)


# --------------------------------------------------------------------------------------------------------------
# Detection from files


def checkpoint_family(path) -> Family:
    """The family whose DiT the checkpoint at `path` holds (read from its key names only), or a CheckpointError
    naming what the file is instead."""
    path = _check_path(path)
    dits = " or ".join(f"{f.title} {f.dit_title}" for f in FAMILIES.values())
    src = open_tensor_file(path, CheckpointError)
    if is_gguf(path):
        from .weights.gguf_dit import check_dit_gguf  # the gguf package, for these files only

        check_dit_gguf(src, f"a {dits}")
    keys = src.keys
    for family in FAMILIES.values():
        if family.matches_checkpoint(keys):
            return family
    foreign = describe_foreign(keys)
    if foreign and not any(f.title in foreign for f in FAMILIES.values()):
        raise CheckpointError(f"{path} is {foreign}, not a {dits}")
    raise CheckpointError(
        f"{path} is not a {dits} checkpoint (first keys: {', '.join(keys[:5])}); load it with the node made for its "
        f"model"
    )


def load_dit(path, *, dtype: Optional[torch.dtype] = torch.bfloat16, device="cpu", operations=None):
    """Load the DiT at `path` (a Flag-DiT, a Next-DiT or a Unified Next-DiT, in any of their layouts; safetensors,
    .pth or GGUF), its family found from its keys. A GGUF keeps its quantized linear weights as blocks, dequantized
    per forward, and computes in `dtype` (None: fp32)."""
    return checkpoint_family(path).load_dit(path, dtype=dtype, device=device, operations=operations)


class TextEncoderFolderError(ValueError):
    """A folder or file that holds no text encoder of a known family, with what it holds instead."""


def _text_encoder_sources() -> str:
    return " or ".join(f.text_encoder_source for f in FAMILIES.values())


def read_folder_config(folder) -> dict:
    folder = Path(folder)
    path = folder / "config.json"
    if not folder.is_dir():
        raise TextEncoderFolderError(f"text encoder folder {folder} does not exist or is not a folder")
    if not path.is_file():
        raise TextEncoderFolderError(
            f"No config.json in {folder}: a text encoder is loaded from a whole Hugging Face folder (config.json, "
            f"tokenizer files, weights), e.g. {_text_encoder_sources()}"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TextEncoderFolderError(f"{path} could not be read as JSON ({err}); download it again") from None
    if not isinstance(config, dict):
        raise TextEncoderFolderError(f"{path} holds {type(config).__name__}, not a model configuration")
    return config


def _family_of_config(config: dict) -> Optional[Family]:
    return next((f for f in FAMILIES.values() if f.matches_text_encoder(config)), None)


def _file_family(path: Path) -> Family:
    """The family whose text encoder the single file at `path` holds, told from its keys (header only)."""
    st = single_file.open_weights(path, TextEncoderFolderError)
    model_type = single_file.model_type_of_file(st)
    family = _family_of_config({"model_type": model_type}) if model_type else None
    if family is not None and single_file.loadable_layout(st) is not None:
        return family
    if family is None:
        what = f"a {model_type!r} model" if model_type else f"no known text encoder (first keys: {st.keys[:4]})"
        raise TextEncoderFolderError(
            f"{path} holds {what}, which is no Lumina text encoder. A text encoder is {_text_encoder_sources()}."
        )
    if any(layout.model_type == model_type for layout in single_file.LAYOUTS):
        raise TextEncoderFolderError(
            f"{path} holds {family.text_encoder_title} weights but not in a complete single-file layout (no "
            f"tokenizer in it: a weights file of a Hugging Face folder?). Choose {family.text_encoder_source}."
        )
    raise TextEncoderFolderError(
        f"{path} holds {family.text_encoder_title} ({family.title}'s text encoder) as a single file, which this pack "
        f"does not load: choose {family.text_encoder_source} (config.json, tokenizer files and weights kept "
        f"together, in models/text_encoders)."
    )


def _gguf_family(path: Path) -> Family:
    """The family whose text encoder the llama.cpp GGUF at `path` holds, told from its general.architecture."""
    from .weights.gguf_dit import DIT_ARCHITECTURES  # the gguf package, for these files only
    from .weights.gguf_file import GGUFFile

    arch = GGUFFile(path, error=TextEncoderFolderError).architecture
    family = next((f for f in FAMILIES.values() if f.text_encoder_gguf_architecture == arch), None)
    if family is not None:
        return family
    if arch in DIT_ARCHITECTURES:
        raise TextEncoderFolderError(f"{path} is a GGUF DiT (general.architecture {arch!r}), not a text encoder: "
                                     f"load it with Lumina Load DiT (models/diffusion_models)")
    known = ", ".join(f"{f.text_encoder_gguf_architecture!r} ({f.text_encoder_title}, {f.title})"
                      for f in FAMILIES.values())
    raise TextEncoderFolderError(f"{path} is a GGUF of architecture {arch!r}, which is no Lumina text encoder; the "
                                 f"text encoders' architectures are {known}")


def gguf_text_encoder_path(path) -> Optional[Path]:
    """The .gguf a text encoder path stands for: the file itself, or the one .gguf of a folder holding it with the
    tokenizer files and no other weights (a config.json beside them changes nothing); None for anything else."""
    path = Path(path)
    if is_gguf(path):
        return path if path.is_file() else None
    return single_file.gguf_in_folder(path) if path.is_dir() else None


def text_encoder_family(path) -> Family:
    """The family whose text encoder `path` holds: a Hugging Face folder (from its config.json), a llama.cpp GGUF
    (from its architecture; the file or a folder holding it and the tokenizer files), or a single file (ComfyUI's
    gemma_2_2b_fp16.safetensors or all-in-one lumina_2.safetensors, from its keys)."""
    gguf = gguf_text_encoder_path(path)
    if gguf is not None:
        return _gguf_family(gguf)
    if Path(path).is_file():
        return _file_family(Path(path))
    config = read_folder_config(path)
    family = _family_of_config(config)
    if family is not None:
        return family
    model_type = config.get("model_type") or ", ".join(config.get("architectures") or []) or "unknown"
    wanted = "; ".join(f"{f.title}: {f.text_encoder_title}" for f in FAMILIES.values())
    raise TextEncoderFolderError(
        f"{path} holds a {model_type!r} model, which is no Lumina text encoder ({wanted}). Choose the folder of "
        f"the text encoder your DiT was trained with."
    )


def is_text_encoder_folder(path) -> bool:
    """Whether `path` is a folder or single file holding a known family's text encoder that can be loaded as it is
    (for the model lists; reads config.json or a safetensors header only; never raises)."""
    try:
        text_encoder_family(path)
    except (TextEncoderFolderError, OSError):
        return False
    return True


def text_encoder_loader(encoder_class, path) -> Callable:
    """The loader of `encoder_class` for `path`: from_gguf for a llama.cpp GGUF (or a folder holding one and the
    tokenizer files), from_file for ComfyUI's single files, from_folder for Hugging Face folders."""
    if gguf_text_encoder_path(path) is not None:
        return encoder_class.from_gguf
    return encoder_class.from_file if Path(path).is_file() else encoder_class.from_folder


def load_text_encoder(path, *, dtype: torch.dtype = torch.bfloat16, device="cpu", **kwargs):
    """Load the text encoder at `path` (a folder, a single file or a llama.cpp GGUF) with the class of its family
    (LLaMA-2, Gemma or Gemma-2), chosen by config.json, the file's keys or the GGUF's architecture. A GGUF keeps its
    quantized weights as blocks and computes in `dtype`. kwargs (compute_dtype, linear_cls) go to the loader."""
    family = text_encoder_family(path)
    logger.info("%s holds the %s text encoder of %s", path, family.text_encoder_title, family.title)
    load = text_encoder_loader(family.text_encoder_class(), path)
    return load(os.fspath(path), dtype=dtype, device=device, **kwargs)


def check_same_family(dit_family: Family, text_family: Family, what: str = "text conditioning") -> None:
    """Refuse text of one family for a DiT of another, naming the text encoder the DiT needs."""
    if dit_family.name != text_family.name:
        raise ValueError(
            f"The {what} comes from {text_family.text_encoder_title} ({text_family.title}), but the model is a "
            f"{dit_family.title} {dit_family.dit_title}, which needs {dit_family.text_encoder_title} features: load "
            f"{dit_family.text_encoder_source} with Lumina Load Text Encoder and encode the prompts with it."
        )
