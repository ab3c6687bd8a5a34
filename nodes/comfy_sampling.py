"""Sampling through ComfyUI's own machinery: the Lumina guider (a CFGGuider with Lumina's guidance, CFG truncation
and renormalisation, and extrapolation), the Lumina ODE sampler as a KSAMPLER, and the Lumina Sampler's path through
them."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import flow_model
from .comfy_env import IN_COMFYUI, comfy, intermediate_device, latent_preview
from .flow_sampler import guided_at_sigma, keep_conditional_channels, lumina_ode, renorm_denoised

if IN_COMFYUI:

    class LuminaGuider(comfy.samplers.CFGGuider):
        """CFGGuider with Lumina-T2I's faithful guidance (channel 3 from the conditional prediction),
        Lumina-Image-2.0's CFG truncation and renormalisation, and the resolution extrapolation passed to Lumina DiTs
        through the model options.

        Guidance stays in ComfyUI's steps: calc_cond_batch, the pre-CFG functions, `cfg_function` (a MODEL's
        sampler_cfg_function such as RenormCFG, and the post-CFG functions); only then are the channels past the
        third taken from the conditional prediction, and the norm clamped (renorm_cfg > 0, while guiding). At
        cfg 1, and from t = 1 - sigma >= cfg_trunc on (cfg_trunc < 1), the negative is not evaluated: as in
        CFGGuider at cfg 1, calc_cond_batch gets the positive alone and cfg_function runs at scale 1, which gives
        the conditional prediction.
        """

        def __init__(self, model_patcher, guidance: str = "faithful", extrapolation: Optional[str] = None,
                     cfg_trunc: float = 1.0, renorm_cfg: float = 0.0):
            super().__init__(model_patcher)
            if guidance not in ("faithful", "all"):
                raise ValueError(f"unknown guidance {guidance!r}; use 'faithful' or 'all'")
            if not (cfg_trunc >= 0 and renorm_cfg >= 0):
                raise ValueError(f"cfg_trunc and renorm_cfg must be >= 0, got {cfg_trunc!r} and {renorm_cfg!r}")
            self.guidance = guidance
            self.cfg_trunc, self.renorm_cfg = float(cfg_trunc), float(renorm_cfg)
            # Our own copy: CFGGuider shares the patcher's dict, which the option must not leak into.
            self.model_options = comfy.model_patcher.create_model_options_clone(self.model_options)
            if extrapolation is not None:
                options = self.model_options.setdefault("transformer_options", {})
                options[flow_model.EXTRAPOLATION_OPTION] = extrapolation

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            cond, uncond = self.conds.get("positive"), self.conds.get("negative")
            guiding = guided_at_sigma(timestep, self.cfg_trunc)
            cfg = self.cfg if guiding else 1.0
            if not guiding or (math.isclose(cfg, 1.0)
                               and not model_options.get("disable_cfg1_optimization", False)):
                uncond = None
            conds = [cond, uncond]
            model = self.inner_model
            if "sampler_calc_cond_batch_function" in model_options:
                args = {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options}
                out = model_options["sampler_calc_cond_batch_function"](args)
            else:
                out = comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)
            for fn in model_options.get("sampler_pre_cfg_function", []):
                args = {"conds": conds, "conds_out": out, "cond_scale": cfg, "timestep": timestep, "input": x,
                        "sigma": timestep, "model": model, "model_options": model_options}
                out = fn(args)
            guided = comfy.samplers.cfg_function(model, out[0], out[1], cfg, x, timestep,
                                                 model_options=model_options, cond=cond, uncond=uncond)
            if self.guidance == "faithful":
                guided = keep_conditional_channels(guided, out[0])
            if guiding:
                guided = renorm_denoised(x, guided, out[0], self.renorm_cfg)
            return guided


def ode_sampler(solver: str, rtol: float = 1e-3, atol: float = 1e-6):
    """A ComfyUI SAMPLER running a Lumina solver on any flow model (see nodes/flow_sampler.py)."""
    if not IN_COMFYUI:
        raise RuntimeError("a SAMPLER is a ComfyUI object: the Lumina ODE Sampler runs only inside ComfyUI")
    return comfy.samplers.KSAMPLER(lumina_ode, extra_options={"solver": solver, "rtol": rtol, "atol": atol})


def sample_with_guider(model, positive, negative, latent_image: dict, *, seed: int, sigmas: torch.Tensor,
                       cfg: float, solver: str, guidance: str, extrapolation: str, cfg_trunc: float = 1.0,
                       renorm_cfg: float = 0.0, start_from_noise: bool = False) -> torch.Tensor:
    """The Lumina Sampler inside ComfyUI: Lumina guider + Lumina ODE sampler + sigmas through ComfyUI's own sampling
    (every MODEL patch and wrapper, ComfyUI's noise, progress bar, preview and interrupt). Returns raw VAE latents
    on the intermediate device.

    start_from_noise: the path starts at the noise itself, as the core does from a whole grid, also where the first
    sigma is below 1 (dpm's grid starts at 0.99983, and the original starts there from plain noise); ComfyUI would
    start at sigma0*noise + (1 - sigma0)*latent, so the noise handed to it is solved for that.
    """
    guider = cfg_guider(model, positive, negative, cfg, guidance, extrapolation, cfg_trunc, renorm_cfg)
    samples = latent_image["samples"]
    noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))
    sigma0 = float(sigmas[0])
    if start_from_noise and 0.0 < sigma0 < 1.0:
        # ComfyUI shifts the latent into model space unless it is empty (CFGGuider.inner_sample).
        latent = model.model.process_latent_in(samples) if torch.count_nonzero(samples) > 0 else samples
        noise = (noise - (1.0 - sigma0) * latent.to(noise)) / sigma0
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    out = guider.sample(noise, samples, ode_sampler(solver), sigmas, callback=callback,
                        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return out.to(intermediate_device())


def cfg_guider(model, positive, negative, cfg: float, guidance: str, extrapolation: Optional[str],
               cfg_trunc: float = 1.0, renorm_cfg: float = 0.0):
    """The GUIDER of the Lumina CFG Guider node."""
    if not IN_COMFYUI:
        raise RuntimeError("a GUIDER is a ComfyUI object: the Lumina CFG Guider runs only inside ComfyUI")
    guider = LuminaGuider(model, guidance, extrapolation, cfg_trunc, renorm_cfg)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


