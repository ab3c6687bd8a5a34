"""ComfyUI's own Lumina 2 MODEL with the Lumina LoRA Loader, inside a real ComfyUI process (run by ComfyUI's python
from test_comfyui_lora.py): `python comfy_lora_checks.py DIT LORA MERGED LORA_NAME` with the ComfyUI checkout as the
working directory. Prints one JSON line of measurements; the pytest side asserts on them.

DIT is a tiny Unified Next-DiT in the original names, MERGED the same with the LoRA merged into its weights at
strength STRENGTH (written by the test), LORA the LoRA file in models/loras under LORA_NAME. ComfyUI cannot detect a
tiny Lumina 2 from its keys (it knows the released sizes only), so the model is built from ComfyUI's own Lumina 2
configuration with the tiny sizes, as its loader would.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, os.getcwd())  # the ComfyUI checkout

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

_spec = importlib.util.spec_from_file_location("ComfyUI_Lumina", REPO / "__init__.py",
                                               submodule_search_locations=[str(REPO)])
pack = importlib.util.module_from_spec(_spec)
sys.modules["ComfyUI_Lumina"] = pack
_spec.loader.exec_module(pack)

from ComfyUI_Lumina.nodes import NODE_CLASS_MAPPINGS as N  # noqa: E402

STRENGTH = 0.8
TINY_LUMINA2 = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": 32,
                "n_layers": 2, "n_refiner_layers": 1, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16,
                "ffn_dim_multiplier": 4.0, "qk_norm": True, "axes_dims": [4, 6, 6], "axes_lens": [300, 512, 512],
                "rope_theta": 10000.0}


class Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def comfy_lumina2(state: dict):
    config = comfy.supported_models.Lumina2(dict(TINY_LUMINA2))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    model.load_model_weights({k: v.float() for k, v in state.items()}, "")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def weights(patcher) -> dict:
    comfy.model_management.load_models_gpu([patcher])  # ComfyUI patches the weights as it loads the model
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def forward(patcher) -> torch.Tensor:
    comfy.model_management.load_models_gpu([patcher])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 6, generator=g)
    context = torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, torch.tensor([0.4]), context, 5)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(dit, lora, merged, lora_name) -> dict:
    messages = Messages()
    logging.getLogger().addHandler(messages)
    logging.getLogger().setLevel(logging.INFO)
    folder_paths.add_model_folder_path("loras", str(Path(lora).parent))
    base_state = load_file(dit)
    base = comfy_lumina2(base_state)
    truth = comfy_lumina2(load_file(merged))
    original = weights(base)
    (patched,) = N["LuminaLoraLoader"]().load_lora(base, lora_name, STRENGTH)
    (half,) = N["LuminaLoraLoader"]().load_lora(base, lora_name, STRENGTH / 2)
    with_lora, expected = weights(patched), weights(truth)
    halfway = weights(half)
    restored = weights(base)
    changed = [k for k in original if not torch.equal(with_lora[k], original[k])]
    return {
        "type": type(patched.model).__name__,
        "same_object": patched is base,
        "weight_err": max(float((with_lora[k] - expected[k]).abs().max()) for k in expected),
        "changed": sorted(changed),
        # strength is linear: half the strength is halfway between the base and the merged weights
        "half_err": max(float((halfway[k] - (original[k] + expected[k]) / 2).abs().max()) for k in expected),
        "base_restored": all(torch.equal(restored[k], original[k]) for k in original),
        "forward_rel": rel(forward(patched), forward(truth)),
        "lora_effect": rel(forward(base), forward(truth)),
        "not_loaded": [m for m in messages.lines if "lora key not loaded" in m or "NOT LOADED" in m],
        "lumina_messages": [m for m in messages.lines if m.startswith("LoRA ")],
    }


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:5])))
