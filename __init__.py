"""ComfyUI-Lumina: Lumina-T2I (5B Flag-DiT, LLaMA-2-7B, rectified flow) as native ComfyUI nodes.

The nodes are registered only when ComfyUI is importable, so that pytest and `import lumina_core` work without it.
"""

import os
import sys

# The nodes import the core as the top-level package `lumina_core`. ComfyUI does not put a custom node folder on
# sys.path, and pytest, seeing this file, imports the tests as `<folder>.tests...` with only the parent folder on
# sys.path; so the folder is appended (after everything else: ComfyUI's own modules keep precedence).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
# Frontend extension: the upload button of Lumina Load Conditioning.
WEB_DIRECTORY = "./web"

try:
    import comfy.utils  # noqa: F401  (only to tell whether this runs inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
