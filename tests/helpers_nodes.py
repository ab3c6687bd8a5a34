"""Helpers for the node and workflow tests: a tiny models tree under the README's file names, the ComfyUI core node
types the example workflows use (their sockets and widgets, as ComfyUI 0.33's /object_info declares them), and a
UI-workflow -> API-prompt conversion driven by /object_info-style node descriptions.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `nodes` is imported as a top-level package by the tests
    sys.path.insert(0, str(REPO))

WORKFLOWS = REPO / "workflows"

# File names the README tells users to use.
DIT_NAME = "lumina_t2i_5b_bf16.safetensors"
LLAMA_NAME = "Llama-2-7b-hf"
NEXT_DIT_NAME = "lumina_next_sft.safetensors"
GEMMA_NAME = "gemma-2b"
VAE_NAME = "sdxl_vae.safetensors"
# Lumina-Image-2.0: ComfyUI's split files, its all-in-one checkpoint, and the FLUX AE.
LUMINA2_DIT_NAME = "lumina_2_model_bf16.safetensors"
GEMMA2_NAME = "gemma_2_2b_fp16.safetensors"
LUMINA2_ALL_IN_ONE_NAME = "lumina_2.safetensors"
FLUX_VAE_NAME = "ae.safetensors"
# GGUF: the Flag-DiT written by `python -m lumina_core convert ... --dtype q8_0`, and llama.cpp's LLaMA-2-7B file.
GGUF_DIT_NAME = "lumina_t2i_5b_q8_0.gguf"
GGUF_LLAMA_NAME = "llama-2-7b.Q4_K_M.gguf"

TINY_HIDDEN = 32  # tiny LLaMA hidden size = tiny Flag-DiT cap_feat_dim
# The tiny Gemma-2's attention as a single file must have it: heads of the released head_dim (256), which is what a
# file without config.json is read with.
TINY_GEMMA2_HEADS = {"head_dim": 256, "num_attention_heads": 2, "num_key_value_heads": 1, "query_pre_attn_scalar": 256}

# UI-only node types that never reach the server.
FRONTEND_ONLY = {"MarkdownNote": 1, "Note": 1}  # type -> widget count
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

_U64 = 0xFFFFFFFFFFFFFFFF

# ComfyUI core node types used by the example workflows, in /object_info form (facts read from ComfyUI 0.33).
# "widgets_count" is the length of widgets_values the frontend saves (LoadImage saves its upload button too).
CORE_NODES = {
    "VAELoader": {
        "input": {"required": {"vae_name": [[FLUX_VAE_NAME, VAE_NAME]]}},
        "output": ["VAE"],
        "widgets_count": 1,
    },
    "VAEDecode": {
        "input": {"required": {"samples": ["LATENT"], "vae": ["VAE"]}},
        "output": ["IMAGE"],
        "widgets_count": 0,
    },
    "VAEEncode": {
        "input": {"required": {"pixels": ["IMAGE"], "vae": ["VAE"]}},
        "output": ["LATENT"],
        "widgets_count": 0,
    },
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "output": [],
        "widgets_count": 1,
    },
    "LoadImage": {
        "input": {"required": {"image": [["example.png"], {"image_upload": True}]}},
        "output": ["IMAGE", "MASK"],
        "widgets_count": 2,
    },
    "ImageScale": {
        "input": {
            "required": {
                "image": ["IMAGE"],
                "upscale_method": [["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]],
                "width": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
                "height": ["INT", {"default": 512, "min": 0, "max": 16384, "step": 1}],
                "crop": [["disabled", "center"]],
            }
        },
        "output": ["IMAGE"],
        "widgets_count": 4,
    },
    "CFGGuider": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1}],
            }
        },
        "output": ["GUIDER"],
        "widgets_count": 1,
    },
    "BasicGuider": {
        "input": {"required": {"model": ["MODEL"], "conditioning": ["CONDITIONING"]}},
        "output": ["GUIDER"],
        "widgets_count": 0,
    },
    "ConditioningCombine": {
        "input": {"required": {"conditioning_1": ["CONDITIONING"], "conditioning_2": ["CONDITIONING"]}},
        "output": ["CONDITIONING"],
        "widgets_count": 0,
    },
    "ConditioningSetAreaPercentage": {
        "input": {
            "required": {
                "conditioning": ["CONDITIONING"],
                "width": ["FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}],
                "height": ["FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}],
                "x": ["FLOAT", {"default": 0, "min": 0, "max": 1.0, "step": 0.01}],
                "y": ["FLOAT", {"default": 0, "min": 0, "max": 1.0, "step": 0.01}],
                "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}],
            }
        },
        "output": ["CONDITIONING"],
        "widgets_count": 5,
    },
    "KSamplerSelect": {
        "input": {"required": {"sampler_name": [["euler", "euler_ancestral", "heun", "dpmpp_2m", "lms"]]}},
        "output": ["SAMPLER"],
        "widgets_count": 1,
    },
    "RandomNoise": {
        "input": {
            "required": {"noise_seed": ["INT", {"default": 0, "min": 0, "max": _U64, "control_after_generate": True}]}
        },
        "output": ["NOISE"],
        "widgets_count": 2,
    },
    "KSampler": {
        "input": {
            "required": {
                "model": ["MODEL"],
                "seed": ["INT", {"default": 0, "min": 0, "max": _U64, "control_after_generate": True}],
                "steps": ["INT", {"default": 20, "min": 1, "max": 10000}],
                "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
                "sampler_name": [["euler", "euler_ancestral", "heun", "dpmpp_2m", "res_multistep", "lms"]],
                "scheduler": [["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
                               "linear_quadratic", "kl_optimal"]],
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "latent_image": ["LATENT"],
                "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}],
            }
        },
        "output": ["LATENT"],
        "widgets_count": 7,
    },
    "EmptySD3LatentImage": {
        "input": {
            "required": {
                "width": ["INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}],
                "height": ["INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            }
        },
        "output": ["LATENT"],
        "widgets_count": 3,
    },
    "SamplerCustomAdvanced": {
        "input": {
            "required": {
                "noise": ["NOISE"],
                "guider": ["GUIDER"],
                "sampler": ["SAMPLER"],
                "sigmas": ["SIGMAS"],
                "latent_image": ["LATENT"],
            }
        },
        "output": ["LATENT", "LATENT"],
        "widgets_count": 0,
    },
}


def pack_object_info() -> dict:
    """/object_info-style descriptions of this pack's nodes, from their INPUT_TYPES."""
    from nodes import NODE_CLASS_MAPPINGS

    info = {}
    for name, cls in NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        info[name] = {
            "input": inputs,
            "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
        }
    return info


def _spec(info: dict, name: str):
    for section in ("required", "optional"):
        spec = info.get("input", {}).get(section, {}).get(name)
        if spec is not None:
            return spec
    return None


def input_names(info: dict) -> list[str]:
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    return list(order.get("required", [])) + list(order.get("optional", []))


def widget_inputs(info: dict) -> list[tuple[str, list, dict, bool]]:
    """(name, type, options, has_control_value) of each widget input, in widgets_values order."""
    out = []
    for name in input_names(info):
        spec = _spec(info, name)
        if not spec:
            continue
        typ = spec[0]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if opts.get("forceInput") or not (isinstance(typ, list) or typ in WIDGET_TYPES):
            continue
        control = bool(opts.get("control_after_generate"))
        out.append((name, typ, opts, control))
    return out


def socket_inputs(info: dict) -> list[tuple[str, str]]:
    """(name, type) of the inputs that take a link."""
    widgets = {w[0] for w in widget_inputs(info)}
    return [(n, _spec(info, n)[0]) for n in input_names(info) if n not in widgets and _spec(info, n)]


def widget_values(node: dict, info: dict) -> dict:
    """The widget values of a UI node by input name (control_after_generate values skipped)."""
    values, wv, i = {}, node.get("widgets_values") or [], 0
    for name, _typ, _opts, control in widget_inputs(info):
        if i >= len(wv):
            break
        values[name] = wv[i]
        i += 1
        if control and i < len(wv) and wv[i] in CONTROL_VALUES:
            i += 1
    return values


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """An API prompt ({id: {class_type, inputs}}) from a UI workflow without subgraphs, reroutes or bypassed nodes."""
    links = {l[0]: l for l in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node {node['id']} has type {node['type']!r}, which ComfyUI does not know (a typo, or a "
                           f"node of another pack)")
        inputs = widget_values(node, info)
        for inp in node.get("inputs") or []:
            if inp.get("link") is not None:
                _id, origin, slot, *_ = links[inp["link"]]
                inputs[inp["name"]] = [str(origin), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load_workflows() -> dict[str, dict]:
    import json

    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(WORKFLOWS.glob("*.json"))}


# --------------------------------------------------------------------------------------------------------------
# Tiny models under the README names


def make_tiny_models(root, *, hidden_size: int = TINY_HIDDEN, seed: int = 0, lumina_next: bool = False,
                     lumina2: bool = False, flux_vae=None, gguf: bool = False) -> dict:
    """models/diffusion_models/<DIT_NAME> (a tiny Flag-DiT in the released key layout) and
    models/text_encoders/<LLAMA_NAME>/ (a tiny LLaMA folder) under `root`; returns their paths.

    lumina_next: also <NEXT_DIT_NAME> (a tiny Next-DiT, original layout) and <GEMMA_NAME>/ (a tiny Gemma folder).
    lumina2: also Lumina-Image-2.0 as ComfyUI distributes it: <LUMINA2_DIT_NAME> (a tiny Unified Next-DiT in bf16,
    cap_feat_dim = hidden_size), text_encoders/<GEMMA2_NAME> (a tiny Gemma-2 as ComfyUI's single file, fp16, its
    tokenizer inside) and checkpoints/<LUMINA2_ALL_IN_ONE_NAME> (the same DiT and Gemma-2 in the all-in-one layout,
    with the VAE file `flux_vae` under `vae.`, or two stand-in tensors when none is given).
    gguf: also Lumina-T2I as GGUF files: <GGUF_DIT_NAME> (the tiny Flag-DiT converted to Q8_0) and
    text_encoders/<GGUF_LLAMA_NAME> (a tiny LLaMA written as llama.cpp writes it, Q8_0 as the tiny rows are no whole
    K-quant blocks, its SentencePiece vocabulary in the metadata and no tokenizer files).
    """
    from lumina_core.tiny import make_tiny_llama_folder, write_tiny_flag_dit

    root = Path(root)
    dit_dir, te_dir = root / "diffusion_models", root / "text_encoders"
    dit_dir.mkdir(parents=True, exist_ok=True)
    te_dir.mkdir(parents=True, exist_ok=True)
    dit_path = write_tiny_flag_dit(dit_dir / DIT_NAME, seed, cap_feat_dim=hidden_size)
    llama = make_tiny_llama_folder(te_dir / LLAMA_NAME, hidden_size=hidden_size, seed=seed)
    paths = {"root": root, "dit": dit_path, "llama": Path(llama)}
    if lumina_next:
        from lumina_core.tiny import make_tiny_gemma_folder, write_tiny_next_dit

        paths["next"] = write_tiny_next_dit(dit_dir / NEXT_DIT_NAME, seed, cap_feat_dim=hidden_size)
        paths["gemma"] = Path(make_tiny_gemma_folder(te_dir / GEMMA_NAME, hidden_size, seed))
    if lumina2:
        paths.update(_write_tiny_lumina2(root, hidden_size, seed, flux_vae))
    if gguf:
        paths.update(_write_tiny_gguf(root, dit_path, hidden_size, seed))
    return paths


def _write_tiny_gguf(root: Path, dit_path: Path, hidden_size: int, seed: int) -> dict:
    import tempfile

    from lumina_core.weights.convert import convert_to_gguf
    from tests.helpers_gguf_text import llama_cpp_gguf, make_llama_folder

    dit = root / "diffusion_models" / GGUF_DIT_NAME
    convert_to_gguf(dit_path, dit, qtype="q8_0")
    llama = root / "text_encoders" / GGUF_LLAMA_NAME
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_llama_folder(Path(tmp) / "hf", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                   seed=seed)
        llama_cpp_gguf(folder, llama, "Q8_0")
    return {"gguf_dit": dit, "gguf_llama": llama}


def _write_tiny_lumina2(root: Path, hidden_size: int, seed: int, flux_vae) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from tests.helpers_gemma2 import (
        make_tiny_gemma2_state_dict,
        tiny_gemma2_config_json,
        tiny_gemma2_spiece_model,
        write_comfy_gemma2_single_file,
    )
    from tests.reference_lumina2 import TINY, random_state_dict

    dit = {k: v.to(torch.bfloat16).contiguous()
           for k, v in random_state_dict(dict(TINY, cap_feat_dim=hidden_size), seed).items()}
    dit_path = root / "diffusion_models" / LUMINA2_DIT_NAME
    save_file(dit, str(dit_path))
    gemma2 = make_tiny_gemma2_state_dict(tiny_gemma2_config_json(hidden_size, **TINY_GEMMA2_HEADS), seed)
    spiece = tiny_gemma2_spiece_model()
    te_path = write_comfy_gemma2_single_file(root / "text_encoders" / GEMMA2_NAME, gemma2, spiece)
    if flux_vae is not None:
        vae = load_file(str(flux_vae))
    else:  # not a VAE ComfyUI can build, only its place in the file
        g = torch.Generator().manual_seed(seed)
        vae = {"decoder.conv_in.weight": torch.randn(8, 16, 3, 3, generator=g),
               "encoder.conv_in.weight": torch.randn(8, 3, 3, 3, generator=g)}
    all_in_one = write_comfy_gemma2_single_file(root / "checkpoints" / LUMINA2_ALL_IN_ONE_NAME, gemma2, spiece,
                                                all_in_one=True, dit_state=dit, vae_state=vae)
    return {"lumina2": dit_path, "gemma2": te_path, "lumina2_all_in_one": all_in_one}


# Run by ComfyUI's own python: a random SDXL-shaped VAE built with ComfyUI's AutoencoderKL (the class its VAE
# loader builds for this key layout), every parameter seeded, saved under the README name.
VAE_SCRIPT = r"""
import math, sys, torch
from safetensors.torch import save_file
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before comfy.model_management looks for a GPU
from comfy.ldm.models.autoencoder import AutoencoderKL
ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in vae.named_parameters():
        if p.ndim > 1:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, sys.argv[1])
"""


# Run by ComfyUI's own python: a random FLUX-shaped AE (16 latent channels, no quant convs) built with the classes
# ComfyUI's VAE loader builds for that key layout (AutoencodingEngine with the ldm Encoder/Decoder), every parameter
# seeded, saved under the README name.
FLUX_VAE_SCRIPT = r"""
import math, sys, torch
from safetensors.torch import save_file
import comfy.cli_args
comfy.cli_args.args.cpu = True
from comfy.ldm.models.autoencoder import AutoencodingEngine
ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
ae = AutoencodingEngine(
    regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
    encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
    decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
gen = torch.Generator().manual_seed(0)
with torch.no_grad():
    for name, p in ae.named_parameters():
        if p.ndim > 1:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
save_file({k: v.to(torch.float16).contiguous() for k, v in ae.state_dict().items()}, sys.argv[1])
"""
