"""The one place that imports ComfyUI (comfy.*, folder_paths, latent_preview), and what every glue module asks of it
first: whether it runs inside ComfyUI, and ComfyUI's devices and dtypes.

The other glue modules take `comfy`, `folder_paths` and `latent_preview` from here; outside ComfyUI (tests,
scripts) they are None and the glue has a plain fallback.
"""

from __future__ import annotations

import torch

from lumina_core.dtypes import dtype_from_name

try:
    import comfy.cli_args
    import comfy.conds
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models_base
    import comfy.utils
    import folder_paths
    import latent_preview
except ImportError:
    IN_COMFYUI = False
    comfy = folder_paths = latent_preview = None
else:
    IN_COMFYUI = True


def intermediate_device() -> torch.device:
    return comfy.model_management.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def intermediate_dtype() -> torch.dtype:
    return comfy.model_management.intermediate_dtype() if IN_COMFYUI else torch.float32


def plain_dtype(choice: str) -> torch.dtype:
    # Outside ComfyUI "auto" is bf16, the dtype Lumina-T2I was trained and released for use in.
    return torch.bfloat16 if choice == "auto" else dtype_from_name(choice)


def check_interrupted() -> None:
    if IN_COMFYUI:
        comfy.model_management.throw_exception_if_processing_interrupted()


