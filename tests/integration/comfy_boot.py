"""The start of every comfy_*_checks.py script, which ComfyUI's python runs with the ComfyUI checkout as the working
directory (`comfy_server.run_check_script`): ComfyUI on the CPU, and the pack imported the way ComfyUI imports a
custom node (as the package `ComfyUI_Lumina` from its folder), so that its `nodes` package does not shadow ComfyUI's
`nodes` module. A script imports this before anything of ComfyUI or of the pack, and ends with `main(globals())`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, os.getcwd())  # the ComfyUI checkout

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before comfy.model_management looks for a GPU

import torch  # noqa: E402

_spec = importlib.util.spec_from_file_location("ComfyUI_Lumina", REPO / "__init__.py",
                                               submodule_search_locations=[str(REPO)])
pack = importlib.util.module_from_spec(_spec)
sys.modules["ComfyUI_Lumina"] = pack
_spec.loader.exec_module(pack)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def tiny_sd3_state_dict() -> dict:
    """The state dict of a tiny SD3 MMDiT (ComfyUI's own class; < 2M parameters) in the released key layout, with
    small seeded random weights."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    net = MMDiT(input_size=None, patch_size=2, in_channels=16, out_channels=16, depth=2, adm_in_channels=64,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 64, "out_features": 128}},
                pos_embed_max_size=16, num_patches=256, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                device="cpu")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, tensor in net.state_dict().items():
        value = torch.randn(tensor.shape, generator=g)
        sd[name] = value / math.sqrt(tensor.shape[1]) if tensor.ndim >= 2 else 0.1 * value
    return sd


def main(checks: dict) -> int:
    """`script CHECK OUT_DIR`: run the script's `check_CHECK(out_dir)` and print its measurements as one
    `RESULT {json}` line."""
    check, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    result = checks[f"check_{check}"](out)
    print("RESULT " + json.dumps(result))
    return 0
