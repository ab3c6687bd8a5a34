"""Model folders and file lists: where the loaders find DiT files and text-encoder folders, and where saved prompt
encodings are written and found (ComfyUI's folder_paths inside ComfyUI; outside it, folders set with
`set_model_folders`, default `$LUMINA_MODELS_DIR/<kind>`, else `./models/<kind>`)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

from lumina_core import families
from lumina_core.conditioning import is_conditioning_file
from lumina_core.weights.layouts import find_layout
from lumina_core.weights.tensor_io import SafetensorsFile, WeightsFileError, find_index, is_gguf

from .comfy_env import IN_COMFYUI, folder_paths

DIFFUSION_MODELS = "diffusion_models"
CHECKPOINTS = "checkpoints"
TEXT_ENCODERS = "text_encoders"
CHECKPOINT_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".ckpt", ".bin")
# DiTs and text encoders may also be GGUF files (ComfyUI-GGUF's and llama.cpp's); ComfyUI's own lists leave .gguf
# out, so they are found by walking the diffusion_models folders (models/diffusion_models and models/unet, and any
# added to them) and the text_encoders folders (models/text_encoders and models/clip).
GGUF_EXTENSIONS = (".gguf",)
_LLAMA_SEARCH_DEPTH = 3


_plain_folders: dict[str, list[str]] = {}


def set_model_folders(kind: str, paths) -> None:
    """Outside ComfyUI: the folders searched for `kind` ("diffusion_models" or "text_encoders")."""
    _plain_folders[kind] = [os.fspath(p) for p in paths]


def model_folders(kind: str) -> list[str]:
    if IN_COMFYUI:
        return folder_paths.get_folder_paths(kind)
    if kind in _plain_folders:
        return list(_plain_folders[kind])
    return [os.path.join(os.environ.get("LUMINA_MODELS_DIR", "models"), kind)]


def _walk_names(kind: str, extensions: tuple) -> set[str]:
    names = set()
    for root in model_folders(kind):
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if f.lower().endswith(extensions):
                    names.add(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return names


def _model_file_names(kind: str) -> list[str]:
    gguf = GGUF_EXTENSIONS if kind in (DIFFUSION_MODELS, TEXT_ENCODERS) else ()
    if IN_COMFYUI:
        names = set(folder_paths.get_filename_list(kind))
        if gguf:
            names |= _walk_names(kind, gguf)
        return sorted(names)
    return sorted(_walk_names(kind, CHECKPOINT_EXTENSIONS + gguf))


def _find_file(kind: str, name: str):
    for root in model_folders(kind):
        path = os.path.join(root, _safe_relative(name))
        if os.path.isfile(path):
            return path
    return None


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
_all_in_one_cache: dict = {}


def _is_lumina_all_in_one(path: str) -> bool:
    """Whether a checkpoints-folder file holds a Lumina DiT (ComfyUI's all-in-one lumina_2.safetensors), read from
    its key names (cached by size and time)."""
    try:
        stat = os.stat(path)
    except OSError:
        return False
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _all_in_one_cache:
        found = None
        if path.endswith(".safetensors"):
            try:
                found = find_layout(SafetensorsFile(Path(path)).keys)
            except (WeightsFileError, OSError):
                found = None
        _all_in_one_cache[key] = found is not None
    return _all_in_one_cache[key]


def diffusion_model_names() -> list[str]:
    """The DiT files: those in the diffusion_models folders (a sharded checkpoint as its index json) and the
    all-in-one files in the checkpoints folders that hold a Lumina DiT."""
    names = set()
    for name in _model_file_names(DIFFUSION_MODELS):
        if _SHARD.search(name):
            path = _find_file(DIFFUSION_MODELS, name)
            index = find_index(Path(path).parent) if path else None
            if index is not None:
                name = f"{os.path.dirname(name)}/{index.name}".lstrip("/")
        names.add(name)
    for name in _model_file_names(CHECKPOINTS):
        path = _find_file(CHECKPOINTS, name)
        if path and name not in names and _is_lumina_all_in_one(path):
            names.add(name)
    return sorted(names)


def diffusion_model_path(name: str) -> str:
    for kind in (DIFFUSION_MODELS, CHECKPOINTS):
        path = _find_file(kind, name)
        if path:
            return path
    raise FileNotFoundError(
        f"DiT checkpoint {name!r} not found in {model_folders(DIFFUSION_MODELS)} (nor, for all-in-one files, in "
        f"{model_folders(CHECKPOINTS)})"
    )


def _safe_relative(name: str) -> str:
    """A relative path that cannot climb out of its model folder."""
    return os.path.relpath(os.path.join(os.sep, name), os.sep)


def _is_llama_folder(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    model_type = str(config.get("model_type", "")).lower()
    architectures = [str(a) for a in config.get("architectures") or []]
    return model_type == "llama" or (not model_type and any(a.startswith("Llama") for a in architectures))


def llama_folder_names() -> list[str]:
    """Folders (relative to a text_encoders model folder, "/"-separated) holding a LLaMA config.json."""
    return _text_encoder_folders(_is_llama_folder)


def text_encoder_folder_names() -> list[str]:
    """What Lumina Load Text Encoder offers: the folders under the text_encoders model folders holding the
    config.json of any Lumina family's text encoder, or one llama.cpp .gguf with the model's tokenizer files; the
    single files there holding one (ComfyUI's gemma_2_2b_fp16.safetensors, llama.cpp .gguf files of LLaMA-2, Gemma
    and Gemma-2 that are not listed as their folder; inside ComfyUI this list takes in models/clip); and the
    all-in-one files in the checkpoints folders holding one (lumina_2.safetensors, listed under the name Lumina Load
    DiT gives it)."""
    names = set(_text_encoder_folders(families.is_text_encoder_folder))
    for kind in (TEXT_ENCODERS, CHECKPOINTS):
        for name in _model_file_names(kind):
            path = _find_file(kind, name)
            if path is None or name in names or _listed_as_folder(path):
                continue
            if _holds_text_encoder(path):
                names.add(name)
    return sorted(names)


def _listed_as_folder(path: str) -> bool:
    """Whether a .gguf is the one of a GGUF text encoder folder, which the list names instead."""
    return is_gguf(path) and families.gguf_text_encoder_path(os.path.dirname(path)) == Path(path)


def text_encoder_folder_path(name: str) -> str:
    """The folder or file an entry of text_encoder_folder_names() names (text_encoders first, then checkpoints)."""
    roots = model_folders(TEXT_ENCODERS)
    for root in roots:
        path = os.path.join(root, _safe_relative(name))
        if os.path.isdir(path) or os.path.isfile(path):
            return path
    path = _find_file(CHECKPOINTS, name)
    if path:
        return path
    wanted = " or ".join(f.text_encoder_source for f in families.FAMILIES.values())
    raise FileNotFoundError(
        f"Text encoder {name!r} not found in {roots} (nor, for all-in-one files, in {model_folders(CHECKPOINTS)}): "
        f"put {wanted} there."
    )


_text_encoder_file_cache: dict = {}


def _holds_text_encoder(path: str) -> bool:
    """Whether a single file holds a text encoder that loads as it is (families.is_text_encoder_folder: the
    safetensors header only), remembered while the file keeps its size and time."""
    try:
        stat = os.stat(path)
    except OSError:
        return False
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _text_encoder_file_cache:
        _text_encoder_file_cache[key] = families.is_text_encoder_folder(path)
    return _text_encoder_file_cache[key]


def _text_encoder_folders(accept: Callable[[str], bool]) -> list[str]:
    names = set()
    for root in model_folders(TEXT_ENCODERS):
        if not os.path.isdir(root):
            continue
        for dirpath, dirs, _files in os.walk(root, followlinks=True):
            depth = os.path.relpath(dirpath, root).count(os.sep) + 1
            if depth >= _LLAMA_SEARCH_DEPTH:
                dirs[:] = []
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            if dirpath != root and accept(dirpath):
                names.add(os.path.relpath(dirpath, root).replace(os.sep, "/"))
    return sorted(names)


def llama_folder_path(name: str) -> str:
    roots = model_folders(TEXT_ENCODERS)
    for root in roots:
        path = os.path.join(root, _safe_relative(name))
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(
        f"LLaMA folder {name!r} not found in {roots}: put the whole Hugging Face folder of LLaMA-2-7B "
        f"(meta-llama/Llama-2-7b-hf) there."
    )


# --------------------------------------------------------------------------------------------------------------
# Saved conditioning files (Lumina Save / Load Conditioning)

CONDITIONING_SUFFIX = ".safetensors"
_OUTPUT_TAG = " [output]"


def output_directory() -> str:
    if IN_COMFYUI:
        return folder_paths.get_output_directory()
    return os.environ.get("LUMINA_OUTPUT_DIR", "output")


def input_directory() -> str:
    if IN_COMFYUI:
        return folder_paths.get_input_directory()
    return os.environ.get("LUMINA_INPUT_DIR", "input")


def conditioning_save_path(prefix: str) -> tuple[str, str]:
    """(full path, name relative to the output folder) of the next `<prefix>_NNNNN_.safetensors`."""
    out = output_directory()
    if IN_COMFYUI:
        folder, base, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, out)
    else:
        subfolder, base = os.path.split(_safe_relative(prefix))
        folder = os.path.join(out, subfolder)
        os.makedirs(folder, exist_ok=True)
        taken = [int(m.group(1)) for f in os.listdir(folder)
                 if (m := re.fullmatch(re.escape(base) + r"_(\d+)_\.safetensors", f))]
        counter = max(taken, default=0) + 1
    os.makedirs(folder, exist_ok=True)
    name = f"{base}_{counter:05}_{CONDITIONING_SUFFIX}"
    return os.path.join(folder, name), "/".join(p for p in (subfolder, name) if p)


def conditioning_file_names() -> list[str]:
    """Loadable encodings: every .safetensors at the top of the input folder (uploads), and the saved Lumina
    conditionings anywhere under the output folder, tagged " [output]" as ComfyUI's annotated names are."""
    names = []
    inp = input_directory()
    if os.path.isdir(inp):
        names += sorted(f for f in os.listdir(inp)
                        if f.endswith(CONDITIONING_SUFFIX) and os.path.isfile(os.path.join(inp, f)))
    out = output_directory()
    found = []
    for dirpath, _dirs, files in os.walk(out):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith(CONDITIONING_SUFFIX) and is_conditioning_file(path):
                found.append(os.path.relpath(path, out).replace(os.sep, "/") + _OUTPUT_TAG)
    return names + sorted(found)


def conditioning_file_path(name: str) -> str:
    if IN_COMFYUI:
        return folder_paths.get_annotated_filepath(name)
    if name.endswith(_OUTPUT_TAG):
        return os.path.join(output_directory(), _safe_relative(name[: -len(_OUTPUT_TAG)]))
    return os.path.join(input_directory(), _safe_relative(name))

