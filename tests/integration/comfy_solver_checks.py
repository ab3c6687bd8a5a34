"""Checks of the few-step solvers inside a real ComfyUI process, run by ComfyUI's python (see
test_comfyui_solvers.py): `python comfy_solver_checks.py CHECK OUT_DIR` with the ComfyUI checkout as the working
directory. Each check prints one JSON line of measurements; the pytest side asserts on them.

`comfy_boot` starts ComfyUI on the CPU and imports the pack the way ComfyUI imports a custom node.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from comfy_boot import main, rel, tiny_sd3_state_dict  # first: ComfyUI on the CPU, the pack imported as ComfyUI does

# isort: split

import torch
from ComfyUI_Lumina.nodes import NODE_CLASS_MAPPINGS as N
from ComfyUI_Lumina.nodes import comfy_env, comfy_model
from ComfyUI_Lumina.nodes.common import make_conditioning

from lumina_core.generation import sample
from lumina_core.image.latent import to_vae_space
from lumina_core.sampling.schedule import make_noise
from lumina_core.tiny import write_tiny_flag_dit

assert comfy_env.IN_COMFYUI

NEW_SOLVERS = ("ab3", "dpmpp_2m", "dpmpp_3m", "unipc_2", "unipc_3")
CAP = 32
SEED = 5
POWER = ("power", 2.0, 1.2)  # grid, grid_shift, grid_rho


def custom_advanced(model, guider, solver, sigmas, latent, seed=SEED):
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    (sampler,) = N["LuminaODESampler"]().get_sampler(solver, 1e-3, 1e-6)
    return SamplerCustomAdvanced.execute(Noise_RandomNoise(seed), guider, sampler, sigmas, latent).result[0]["samples"]


def check_lumina_t2i(out: Path) -> dict:
    """The pack's Lumina-T2I MODEL (a tiny Flag-DiT): each new solver on the power grid through SamplerCustomAdvanced
    (Lumina CFG Guider, Lumina ODE Sampler, Lumina Sigmas) and through the Lumina Sampler, against the core."""
    path = write_tiny_flag_dit(out / "tiny_dit.safetensors", 3, cap_feat_dim=CAP)
    model = comfy_model.load_flag_dit_model(str(path), "fp32")
    dit = comfy_model.lumina_dit(model)
    g = torch.Generator().manual_seed(1)
    cond = (torch.randn(1, 7, CAP, generator=g), torch.ones(1, 7, dtype=torch.bool))
    uncond = (torch.randn(1, 2, CAP, generator=g), torch.ones(1, 2, dtype=torch.bool))
    pos, neg = make_conditioning(*cond), make_conditioning(*uncond)
    latent = {"samples": torch.zeros(2, 4, 6, 8)}
    rows = []
    for solver in NEW_SOLVERS:
        steps = 6
        (guider,) = N["LuminaCFGGuider"]().get_guider(model, pos, neg, 4.0, "faithful", "t2i")
        (sigmas,) = N["LuminaSigmas"]().get_sigmas(steps, 4.0, 1.0, solver, *POWER)
        custom = custom_advanced(model, guider, solver, sigmas, latent)
        (node,) = N["LuminaSampler"]().sample(model, pos, neg, latent, SEED, steps, 4.0, solver, 4.0, 1.0, "t2i",
                                              "faithful", grid=POWER[0], grid_shift=POWER[1], grid_rho=POWER[2])
        with torch.no_grad():
            core = to_vae_space(sample(dit, make_noise(SEED, (2, 4, 6, 8)), cond, uncond, steps=steps, cfg=4.0,
                                       shift=4.0, solver=solver, extrapolation="t2i", guidance="faithful",
                                       grid=POWER[0], grid_shift=POWER[1], grid_rho=POWER[2]))
            lumina_grid = to_vae_space(sample(dit, make_noise(SEED, (2, 4, 6, 8)), cond, uncond, steps=steps,
                                              cfg=4.0, shift=4.0, solver=solver, extrapolation="t2i"))
        rows.append({"solver": solver, "custom_vs_core": rel(custom, core), "node_vs_core": rel(node["samples"], core),
                     "power_vs_lumina_grid": rel(core, lumina_grid),
                     "finite": bool(torch.isfinite(custom).all() and torch.isfinite(node["samples"]).all())})
    return {"rows": rows}


def tiny_sd3():
    """SD3's MMDiT (ComfyUI's own class, detected from the released key layout) with small random weights; the
    weights on the fast frequencies of the timestep embedding (a phase of more than 2 over sigma's range of 1000)
    are zero, so that the velocity is smooth in sigma as a trained model's is (random weights there make it
    oscillate between steps, and no solver converges at a few steps)."""
    import comfy.sd

    sd = tiny_sd3_state_dict()
    half = sd["t_embedder.mlp.0.weight"].shape[1] // 2  # [cos | sin] of t * 10000^(-i/half), t = 1000 sigma
    fast = torch.exp(-math.log(10000.0) * torch.arange(half) / half) * 1000 > 2.0
    sd["t_embedder.mlp.0.weight"][:, torch.cat([fast, fast])] = 0.0
    parameters = sum(v.numel() for v in sd.values())
    return comfy.sd.load_diffusion_model_state_dict(sd), parameters  # the loader empties sd


def check_sd3(out: Path) -> dict:
    """A tiny SD3 MODEL: every new solver through SamplerCustomAdvanced with the Lumina CFG Guider and the Lumina ODE
    Sampler on the power grid, at 6 and 12 steps, against RK4 with 100 steps (shift-3 Lumina grid) from the same
    noise; Euler and midpoint on the same grids beside them."""
    model, parameters = tiny_sd3()
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 10, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]
    neg = [[torch.randn(1, 10, 64, generator=g), {"pooled_output": torch.randn(1, 64, generator=g)}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}

    def run(solver, sigmas):
        (guider,) = N["LuminaCFGGuider"]().get_guider(model, pos, neg, 3.0, "all", "t2i")
        return custom_advanced(model, guider, solver, sigmas, latent)

    (fine,) = N["LuminaSigmas"]().get_sigmas(100, 3.0, 1.0, "euler")
    reference = run("rk4", fine)
    errors = {}
    for solver in NEW_SOLVERS + ("euler", "midpoint"):
        errors[solver] = {}
        for steps in (6, 12):
            per = 2 if solver == "midpoint" else 1
            (sigmas,) = N["LuminaSigmas"]().get_sigmas(steps // per, 3.0, 1.0, solver, *POWER)
            result = run(solver, sigmas)
            errors[solver][str(steps)] = rel(result, reference) if torch.isfinite(result).all() else float("inf")
    return {"model": type(model.model).__name__, "parameters": parameters, "errors": errors}


if __name__ == "__main__":
    sys.exit(main(globals()))
