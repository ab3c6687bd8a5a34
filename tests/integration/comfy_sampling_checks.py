"""Checks of the pack's sampling inside a real ComfyUI process, run by ComfyUI's python (see
test_comfyui_sampling.py): `python comfy_sampling_checks.py CHECK OUT_DIR` with the ComfyUI checkout as the working
directory. Each check prints one JSON line of measurements; the pytest side asserts on them.

`comfy_boot` starts ComfyUI on the CPU and imports the pack the way ComfyUI imports a custom node.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from comfy_boot import main, rel, tiny_sd3_state_dict  # first: ComfyUI on the CPU, the pack imported as ComfyUI does

# isort: split

import torch
from ComfyUI_Lumina.nodes import NODE_CLASS_MAPPINGS as N
from ComfyUI_Lumina.nodes import comfy_env, comfy_model
from ComfyUI_Lumina.nodes.common import make_conditioning

from lumina_core.generation import sample
from lumina_core.image.latent import to_model_space, to_vae_space
from lumina_core.sampling.schedule import make_noise, time_grid
from lumina_core.sampling.solvers import solve
from lumina_core.tiny import write_tiny_flag_dit

assert comfy_env.IN_COMFYUI

CAP = 32
SEED = 5


def tiny_model(out: Path):
    path = write_tiny_flag_dit(out / "tiny_dit.safetensors", 3, cap_feat_dim=CAP)
    model = comfy_model.load_flag_dit_model(str(path), "fp32")
    return model, comfy_model.lumina_dit(model)


def texts():
    g = torch.Generator().manual_seed(1)
    cond = (torch.randn(1, 7, CAP, generator=g), torch.ones(1, 7, dtype=torch.bool))
    uncond = (torch.randn(1, 2, CAP, generator=g), torch.ones(1, 2, dtype=torch.bool))
    return cond, uncond, make_conditioning(*cond), make_conditioning(*uncond)


class Counter:
    """Counts the DiT's text preparations and its network calls (instance attributes over the class methods)."""

    def __init__(self, dit):
        self.dit, self.prepared, self.forwards, self.rows = dit, 0, 0, 0
        prepare, forward = dit.prepare_text, dit.forward_with_text

        def counted_prepare(*a, **k):
            self.prepared += 1
            return prepare(*a, **k)

        def counted_forward(x, *a, **k):
            self.forwards += 1
            self.rows += x.shape[0]  # images evaluated: cfg 1 must not evaluate the negative
            return forward(x, *a, **k)

        dit.prepare_text, dit.forward_with_text = counted_prepare, counted_forward

    def reset(self):
        self.prepared = self.forwards = self.rows = 0

    def remove(self):
        del self.dit.prepare_text, self.dit.forward_with_text


def lumina_sampler(model, pos, neg, latent, *, steps=4, cfg=4.0, solver="euler", denoise=1.0, extrapolation="t2i",
                   guidance="faithful", seed=SEED, cfg_trunc=-1.0, renorm_cfg=-1.0):
    (out,) = N["LuminaSampler"]().sample(model, pos, neg, latent, seed, steps, cfg, solver, 4.0, denoise,
                                         extrapolation, guidance, cfg_trunc, renorm_cfg)
    return out["samples"]


def custom_advanced(model, pos, neg, latent, *, steps=4, cfg=4.0, solver="euler", denoise=1.0, extrapolation="t2i",
                    guidance="faithful", seed=SEED):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    (guider,) = N["LuminaCFGGuider"]().get_guider(model, pos, neg, cfg, guidance, extrapolation)
    (sampler,) = N["LuminaODESampler"]().get_sampler(solver, 1e-3, 1e-6)
    (sigmas,) = N["LuminaSigmas"]().get_sigmas(steps, 4.0, denoise)
    return SamplerCustomAdvanced.execute(Noise_RandomNoise(seed), guider, sampler, sigmas, latent).result[0]["samples"]


def core(dit, cond, uncond, latent, *, steps=4, cfg=4.0, solver="euler", denoise=1.0, extrapolation="t2i",
         guidance="faithful", seed=SEED):
    raw = latent["samples"]
    init = to_model_space(raw) if denoise < 1.0 else None
    with torch.no_grad():
        out = sample(dit, make_noise(seed, raw.shape), cond, uncond if cfg != 1.0 else None, steps=steps, cfg=cfg,
                     shift=4.0, solver=solver, denoise=denoise, init_latent=init, extrapolation=extrapolation,
                     guidance=guidance)
    return to_vae_space(out)


# --------------------------------------------------------------------------------------------------------------


def check_parity(out: Path) -> dict:
    """Lumina Sampler (ComfyUI path) against the core and against SamplerCustomAdvanced, and text work counted."""
    model, dit = tiny_model(out)
    cond, uncond, pos, neg = texts()
    counter = Counter(dit)
    g = torch.Generator().manual_seed(2)
    txt = {"samples": torch.zeros(2, 4, 6, 8)}
    img = {"samples": torch.randn(2, 4, 6, 8, generator=g) * 4}
    rows = []
    solvers = os.environ.get("LUMINA_CHECK_SOLVERS", "euler,midpoint,rk4,ab2,dopri5").split(",")
    for solver in solvers:
        for guidance in ("faithful", "all"):
            for cfg in (1.0, 4.0):
                for name, latent, denoise in (("txt2img", txt, 1.0), ("img2img", img, 0.6)):
                    kw = dict(steps=4, cfg=cfg, solver=solver, denoise=denoise, guidance=guidance)
                    counter.reset()
                    ours = lumina_sampler(model, pos, neg, latent, **kw)
                    prepared, forwards, evaluated = counter.prepared, counter.forwards, counter.rows
                    custom = custom_advanced(model, pos, neg, latent, **kw)
                    counter.reset()
                    ref = core(dit, cond, uncond, latent, **kw)
                    rows.append({"solver": solver, "guidance": guidance, "cfg": cfg, "mode": name,
                                 "vs_core": rel(ours, ref), "vs_custom": rel(ours, custom),
                                 "prepared": prepared, "forwards": forwards, "core_forwards": counter.forwards,
                                 "rows": evaluated, "core_rows": counter.rows})
    # Beyond 1024x1024 (1040x1040): the extrapolation reaches the DiT on both paths.
    big = {"samples": torch.zeros(1, 4, 130, 130)}
    for extrapolation in ("t2i", "time_aware") if "LUMINA_CHECK_SOLVERS" not in os.environ else ():
        kw = dict(steps=2, cfg=4.0, solver="euler", extrapolation=extrapolation)
        ours = lumina_sampler(model, pos, neg, big, **kw)
        ref = core(dit, cond, uncond, big, **kw)
        custom = custom_advanced(model, pos, neg, big, **kw)
        plain = core(dit, cond, uncond, big, **dict(kw, extrapolation="off"))
        rows.append({"solver": "euler", "guidance": "faithful", "cfg": 4.0, "mode": f"1040x1040 {extrapolation}",
                     "vs_core": rel(ours, ref), "vs_custom": rel(ours, custom), "vs_off": rel(ours, plain)})
    counter.remove()
    return {"rows": rows}


def check_patches(out: Path) -> dict:
    """A MODEL's sampler_cfg_function (RenormCFG, a recording one) and TorchCompileModel under KSampler and under the
    Lumina Sampler."""
    model, _dit = tiny_model(out)
    _cond, _uncond, pos, neg = texts()
    # Batch 1: ComfyUI's RenormCFG compares per-image norms with `if`, which fails for batches above 1.
    return _patches(model, pos, neg, {"samples": torch.zeros(1, 4, 6, 8)})


def check_patches_lumina2(out: Path) -> dict:
    """check_patches on the Lumina-Image-2.0 MODEL: the tiny Unified Next-DiT the pytest side wrote to
    OUT/tiny_lumina2.safetensors, Lumina-Image-2.0 conditioning, an empty 16-channel FLUX latent. The Lumina Sampler
    keeps the family's CFG truncation and renormalisation on, except for the recording cfg function, which is
    compared with plain guidance at every evaluation (after the truncation ComfyUI would call it at scale 1)."""
    model = comfy_model.load_dit_model(str(out / "tiny_lumina2.safetensors"), "fp32")
    dit = comfy_model.lumina_dit(model)
    cap = dit.config.cap_feat_dim
    g = torch.Generator().manual_seed(1)
    pos = make_conditioning(torch.randn(1, 7, cap, generator=g), torch.ones(1, 7, dtype=torch.bool), family="lumina2")
    neg = make_conditioning(torch.randn(1, 2, cap, generator=g), torch.ones(1, 2, dtype=torch.bool), family="lumina2")
    result = _patches(model, pos, neg, {"samples": torch.zeros(1, 16, 6, 8)}, plain={"cfg_trunc": 1.0,
                                                                                    "renorm_cfg": 0.0})
    result["in_channels"] = int(model.model.diffusion_model.in_channels)
    return result


def _patches(model, pos, neg, latent: dict, plain: dict | None = None) -> dict:
    """The patches check on `model`; `plain`: Lumina Sampler settings giving plain guidance at every evaluation (the
    recording cfg function is compared under them)."""
    from comfy_extras.nodes_lumina2 import RenormCFG
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from torch._dynamo.utils import counters

    import nodes as comfy_nodes  # ComfyUI's nodes.py (the pack was imported under its own package name)

    plain = plain or {}

    def ksampler(m):
        return comfy_nodes.common_ksampler(m, SEED, 3, 4.0, "euler", "simple", pos, neg, latent)[0]["samples"]

    def lumina(m, **kw):
        return lumina_sampler(m, pos, neg, latent, **dict(dict(steps=3, cfg=4.0, solver="midpoint"), **kw))

    result = {}
    base = {"ksampler": ksampler(model), "faithful": lumina(model), "all": lumina(model, guidance="all")}
    result["channels"] = int(base["ksampler"].shape[1])
    # RenormCFG without renormalisation is plain CFG on the in_channels (all) channels; with it, it changes them.
    plain_renorm = RenormCFG.execute(model, 100.0, 0.0).result[0]
    renorm = RenormCFG.execute(model, 100.0, 1.0).result[0]
    result["renorm0_vs_base"] = {"ksampler": rel(ksampler(plain_renorm), base["ksampler"]),
                                 "faithful": rel(lumina(plain_renorm), base["faithful"]),
                                 "all": rel(lumina(plain_renorm, guidance="all"), base["all"])}
    result["renorm1_vs_base"] = {"ksampler": rel(ksampler(renorm), base["ksampler"]),
                                 "faithful": rel(lumina(renorm), base["faithful"])}
    # A recording cfg function that guides at half the scale: the Lumina Sampler at cfg 4 must equal cfg 2.
    calls = []

    def half_cfg(args):
        calls.append(float(args["sigma"][0]))
        return args["uncond"] + (args["cond"] - args["uncond"]) * (args["cond_scale"] / 2)

    recording = model.clone()
    recording.set_model_sampler_cfg_function(half_cfg)
    recorded = lumina(recording, **plain)
    result["recording_vs_cfg2"] = rel(recorded, lumina(model, cfg=2.0, **plain))
    result["recording_vs_cfg4"] = rel(recorded, lumina(model, **plain) if plain else base["faithful"])
    result["recording_sigmas"] = calls
    result["expected_sigmas"] = [float(1 - t) for t in _midpoint_times(time_grid(3, 4.0))]
    # TorchCompileModel (inductor): the same latents, graphs compiled, no graph break.
    torch._dynamo.reset()
    counters.clear()
    compiled = TorchCompileModel.execute(model, "inductor").result[0]
    result["compiled_vs_eager"] = {"ksampler": rel(ksampler(compiled), base["ksampler"]),
                                   "faithful": rel(lumina(compiled), base["faithful"])}
    result["unique_graphs"] = int(counters["stats"]["unique_graphs"])
    result["graph_breaks"] = {str(k): int(v) for k, v in counters["graph_break"].items()}
    result["frames_ok"] = int(counters["frames"]["ok"])
    return result


def _midpoint_times(grid):
    ts = [float(t) for t in grid]
    out = []
    for t0, t1 in zip(ts, ts[1:]):
        out += [t0, t0 + (t1 - t0) / 2]
    return out


MU, S = -0.4, 1.5  # the Gaussian-data flow of tests/test_sampling.py


def gaussian_velocity(x, t):
    return MU + (t * S * S - (1 - t)) / (t * t * S * S + (1 - t) ** 2) * (x - t * MU)


def check_gaussian(out: Path) -> dict:
    """A synthetic flow MODEL with a known exact solution (data ~ N(MU, S^2)) sampled through ComfyUI's machinery
    (ModelPatcher, CFGGuider, KSAMPLER) with the Lumina ODE Sampler, against the core's solve on the same noise."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_patcher
    import comfy.samplers
    import comfy.supported_models_base

    class GaussianFlow(torch.nn.Module):
        dtype = torch.float32

        def forward(self, x, timesteps, context=None, **kwargs):
            t = 1.0 - timesteps.double().view(-1, 1, 1, 1)
            return (-gaussian_velocity(x.double(), t)).float()  # ComfyUI's flow output: noise - data

    class Config(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {}
        sampling_settings = {"shift": 1.0, "multiplier": 1.0}
        latent_format = comfy.latent_formats.LatentFormat
        supported_inference_dtypes = [torch.float32]

    config = Config({})
    config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(config, comfy.model_base.ModelType.FLOW,
                                      unet_model=lambda **kwargs: GaussianFlow())
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    conditioning = [[torch.zeros(1, 1, 8), {}]]
    z = torch.randn(1, 4, 16, 32, generator=torch.Generator().manual_seed(0))
    target = (MU + S * z.double())
    rows = {}
    steps_of = {"euler": (20, 40, 80), "midpoint": (20, 40, 80), "ab2": (20, 40, 80), "rk4": (5, 10, 20),
                "dopri5": (30,)}
    for solver, step_list in steps_of.items():
        rows[solver] = []
        for steps in step_list:
            grid = time_grid(steps, 4.0)
            guider = comfy.samplers.CFGGuider(patcher)
            guider.set_conds(conditioning, conditioning)
            guider.set_cfg(1.0)
            (sampler,) = N["LuminaODESampler"]().get_sampler(solver, 1e-5, 1e-6)
            comfy_out = guider.sample(z.clone(), torch.zeros_like(z), sampler, 1.0 - grid, seed=0)
            core_out = solve(gaussian_velocity, z.clone(), grid, solver, rtol=1e-5, atol=1e-6)
            rows[solver].append({"steps": steps,
                                 "comfy_error": float((comfy_out.double() - target).abs().max()),
                                 "core_error": float((core_out.double() - target).abs().max())})
    return rows


def check_sd3(out: Path) -> dict:
    """SD3's MMDiT (ComfyUI's own class and detection) from a tiny random state dict in the released key layout,
    sampled by SamplerCustomAdvanced with the Lumina CFG Guider and the Lumina ODE Sampler; saves a PNG."""
    import comfy.sd
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, Noise_RandomNoise, SamplerCustomAdvanced
    from PIL import Image

    sd = tiny_sd3_state_dict()
    parameters = sum(v.numel() for v in sd.values())
    model = comfy.sd.load_diffusion_model_state_dict(sd)  # detected from the keys, as a file would be
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 10, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]
    neg = [[torch.randn(1, 10, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    (sigmas,) = N["LuminaSigmas"]().get_sigmas(8, 3.0, 1.0)

    def run(sampler, guidance="all"):
        (guider,) = N["LuminaCFGGuider"]().get_guider(model, pos, neg, 3.0, guidance, "t2i")
        return SamplerCustomAdvanced.execute(Noise_RandomNoise(7), guider, sampler, sigmas, latent).result[0]["samples"]

    lumina_euler = run(N["LuminaODESampler"]().get_sampler("euler", 1e-3, 1e-6)[0])
    comfy_euler = run(KSamplerSelect.execute("euler").result[0])
    rk4 = run(N["LuminaODESampler"]().get_sampler("rk4", 1e-3, 1e-6)[0])
    latent_format = model.model.latent_format
    factors = torch.tensor(latent_format.latent_rgb_factors)  # [16, 3]
    bias = torch.tensor(latent_format.latent_rgb_factors_bias or [0.0, 0.0, 0.0])
    rgb = torch.einsum("chw,cr->hwr", rk4[0].float(), factors) + bias
    image = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    path = out / "sd3_lumina_rk4.png"
    Image.fromarray(image).save(path)
    return {"model": type(model.model).__name__, "parameters": parameters, "image": str(path),
            "image_size": list(image.shape), "euler_vs_comfy_euler": rel(lumina_euler, comfy_euler),
            "rk4_vs_euler": rel(rk4, lumina_euler), "finite": bool(torch.isfinite(rk4).all())}


if __name__ == "__main__":
    sys.exit(main(globals()))
