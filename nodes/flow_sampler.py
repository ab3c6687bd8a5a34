"""The Lumina ODE solvers as a ComfyUI sampler function, for any flow model; and Lumina's guidance on ComfyUI's
denoised predictions (Lumina-T2I's faithful channels, Lumina-Image-2.0's CFG truncation and renormalisation).

ComfyUI's samplers call model(x, sigma) and get the *denoised* prediction. For a flow model
(x = sigma*noise + (1-sigma)*data) the Lumina velocity at t = 1 - sigma is v = (denoised - x) / sigma
(`flow_model.velocity_from_denoised`), and `lumina_ode` integrates dx/dt = v with the core's own solvers
(`lumina_core.sampling.solve`) over t = 1 - sigmas: the solvers are written once.

At sigma = 0 denoised equals x and v is lost, which matters where a solver evaluates at t = 1 (rk4's last stage,
dopri5's stages at the end of its last step). There the model is evaluated at SIGMA_FLOOR (1e-6) instead, with
x in float64: ComfyUI computes denoised = x - sigma*output in x's dtype, and in fp32 the rounding of x would cost
about 1e-7 * |x| / sigma of the velocity (1e-3 relative at a 1e-3 floor), in float64 nothing (the network still
computes in its own dtype). The transformer option NETWORK_SIGMA_OPTION = 0 goes along: a Lumina DiT then computes
at exactly sigma = 0 while ComfyUI scales its output by the floor, so its velocity is the core's. Any other flow
model is evaluated at the floor itself, t = 1 - 1e-6.

"dpm" (Lumina-Image-2.0's flow DPM-Solver++ 2M) runs here on whatever SIGMAS it is given, from sigma 1 or not; it
evaluates only at the start of each step, so never at sigma = 0. The original's own grid for it (u from 1 to 0.001,
shifted) is what the Lumina Sampler and Lumina Sigmas give with solver dpm.

Nothing here imports ComfyUI (tested without it); `comfy_sampling` wraps `lumina_ode` in ComfyUI's KSAMPLER.
"""

from __future__ import annotations

from typing import Optional

import torch

from lumina_core.sampling.guidance import faithful_guided_channels, guided_at, renorm_factor
from lumina_core.sampling.solvers import SOLVERS, solve

from .flow_model import NETWORK_SIGMA_OPTION, velocity_from_denoised

# Where sigma = 0 is evaluated. With x in float64 the velocity comes back exactly at any floor, so it is small (a
# model that cannot compute at sigma 0 is evaluated 1e-6 from t = 1). Where float64 is missing (MPS), fp32 rounding
# of x - sigma*output costs about 1e-7 * |x| / sigma of the velocity, and 1e-3 balances that against the shift of t.
SIGMA_FLOOR = 1e-6
SIGMA_FLOOR_FP32 = 1e-3
def _with_network_sigma(model_options: dict, sigma: float) -> dict:
    options = dict(model_options)
    options["transformer_options"] = dict(model_options.get("transformer_options", {}), **{NETWORK_SIGMA_OPTION: sigma})
    return options


def lumina_ode(model, x, sigmas, extra_args=None, callback=None, disable=None, solver="euler", rtol=1e-3,
               atol=1e-6, max_evals=2000):
    """A ComfyUI sampler function (the signature of comfy.k_diffusion's samplers): integrate the flow ODE from
    sigmas[0] to sigmas[-1] with a Lumina solver; `x` is the noised start, the result the end of the path.

    model(x, sigma [B], **extra_args) -> denoised. callback receives ComfyUI's dict (i, x, sigma, sigma_hat,
    denoised) after every step (accepted step for dopri5).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    end_args = dict(extra_args, model_options=_with_network_sigma(extra_args.get("model_options", {}), 0.0))
    # t = 1 - sigma in float64: 1 - t gives back the float32 sigmas exactly at the grid points.
    grid = 1.0 - sigmas.detach().to("cpu", torch.float64)
    # x goes to the model in float64, so that ComfyUI's denoised = x - sigma*output and v = (denoised - x)/sigma
    # give back the network's output exactly (the network itself computes in its own dtype); MPS has no float64.
    wide, floor = (torch.float32, SIGMA_FLOOR_FP32) if x.device.type == "mps" else (torch.float64, SIGMA_FLOOR)

    def velocity(xt: torch.Tensor, t: float) -> torch.Tensor:
        sigma = 1.0 - t
        args = extra_args
        if sigma <= 0.0:
            sigma, args = floor, end_args
        x_wide = xt.to(wide)
        sigma_in = torch.tensor(sigma, dtype=wide, device=xt.device)
        denoised = model(x_wide, sigma_in * s_in.to(wide), **args)
        return velocity_from_denoised(x_wide, denoised.to(wide), sigma_in).to(xt.dtype)

    def step_callback(info: dict) -> None:
        if callback is not None:
            sigma = 1.0 - info["t"]
            callback({"x": info["x"], "i": info["step"], "sigma": sigma, "sigma_hat": sigma,
                      "denoised": info["denoised"]})

    return solve(velocity, x, grid, solver, callback=step_callback, atol=atol, rtol=rtol, max_evals=max_evals)


def keep_conditional_channels(guided: torch.Tensor, cond: torch.Tensor, guided_channels: Optional[int] = None
                              ) -> torch.Tensor:
    """"faithful" guidance on any prediction: the guided result on the first `guided_channels` channels (default:
    as the family's original, 3 of 4 SDXL channels, all of 16 FLUX channels), the conditional prediction on the
    others (linear, so the same on denoised as on velocities)."""
    n = faithful_guided_channels(guided.shape[1]) if guided_channels is None else guided_channels
    if n >= guided.shape[1]:
        return guided
    return torch.cat([guided[:, :n], cond[:, n:]], dim=1)


def guided_at_sigma(sigma: torch.Tensor, cfg_trunc: float) -> bool:
    """Whether an evaluation at ComfyUI's sigma [B] (one value for the whole batch) is guided under CFG truncation:
    the core's rule on its t = 1 - sigma (see `lumina_core.sampling.guidance.guided_at`)."""
    return guided_at(1.0 - float(sigma.reshape(-1)[0]), cfg_trunc)


def renorm_denoised(x: torch.Tensor, guided: torch.Tensor, cond: torch.Tensor, renorm_cfg: float) -> torch.Tensor:
    """Lumina-Image-2.0's CFG renormalisation on ComfyUI's denoised predictions: denoised - x = sigma * v, so clamping
    the velocities' norms is clamping those of guided - x against cond - x, per sample. Unclamped samples are
    returned as they are."""
    if not renorm_cfg > 0:
        return guided
    factor = renorm_factor(guided - x, cond - x, renorm_cfg)
    return torch.where(factor < 1, x + (guided - x) * factor, guided)
