"""Lumina Sampler (the original's rectified-flow sampler), Lumina Sigmas (its schedule), and its solver and
guidance as ComfyUI parts: Lumina ODE Sampler (a SAMPLER) and Lumina CFG Guider (a GUIDER) for SamplerCustomAdvanced.

cfg_trunc and renorm_cfg (Lumina-Image-2.0's CFG truncation and renormalisation) default to FAMILY_DEFAULT, which
means the MODEL family's setting from the registry (`lumina_core.families`), neutral for a MODEL of another kind.

Inside ComfyUI the Lumina Sampler is those parts run through ComfyUI's own sampling, so every patch on the MODEL
applies; on plain Python (tests, scripts) it calls `lumina_core.sample`, which computes the same latents.
"""

from __future__ import annotations

import dataclasses

from lumina_core import families, make_noise, sample
from lumina_core.image.latent import to_model_space, to_vae_space
from lumina_core.sampling.guidance import GUIDANCE_MODES
from lumina_core.sampling.loop import EXTRAPOLATIONS, SamplingDefaults
from lumina_core.sampling.schedule import POWER_RHO, POWER_SHIFT, sampling_grid, sigmas_from_time_grid
from lumina_core.sampling.solvers import SOLVERS

from . import comfy_env, comfy_model, comfy_sampling
from .common import check_latent
from .latent import latent_for_family
from .regions import conditioning_text
from .sampling_inputs import (
    FAMILY_DEFAULT,
    SOLVER_TOOLTIP,
    cfg_trunc_input,
    denoise_input,
    grid_inputs,
    renorm_cfg_input,
    shift_input,
    steps_input,
    tolerance_input,
)

# The class name of ComfyUI's model config for Lumina-Image-2.0 (comfy.supported_models.Lumina2); its subclasses
# (Z-Image) are other models and keep the neutral settings.
COMFY_LUMINA2_CONFIG = "Lumina2"
# What a MODEL without a Lumina family gets for FAMILY_DEFAULT: always guide, no clamp.
_NEUTRAL = {f.name: f.default for f in dataclasses.fields(SamplingDefaults) if f.name in ("cfg_trunc", "renorm_cfg")}


def family_setting(model, name: str, value: float) -> float:
    """A node's cfg_trunc or renorm_cfg: the value itself, or for a negative value (FAMILY_DEFAULT) the MODEL
    family's default from the registry (the pack's DiTs, and ComfyUI's own Lumina 2 MODEL: Lumina-Image-2.0's);
    neutral (1.0, 0.0) for a MODEL that is not a Lumina one."""
    if value >= 0:
        return float(value)
    base = getattr(model, "model", None)
    dit = getattr(base, "diffusion_model", None)
    dit = getattr(dit, "_orig_mod", dit)  # a torch.compile'd module wraps the DiT
    family = getattr(dit, "family", None)
    if family is None and type(getattr(base, "model_config", None)).__name__ == COMFY_LUMINA2_CONFIG:
        family = families.LUMINA_2.name  # ComfyUI's own Lumina-Image-2.0 MODEL (not its subclasses: Z-Image)
    if family in families.FAMILIES:
        return float(getattr(families.get_family(family).defaults, name))
    return float(_NEUTRAL[name])


class LuminaSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "From Lumina Load DiT (or Lumina Load Flag-DiT)."}),
                "positive": ("CONDITIONING", {"tooltip": "From Lumina Text Encode: the prompt. Area or mask "
                             "conditioning (ConditioningSetArea, ConditioningSetMask, ConditioningCombine) or Lumina "
                             "Region Grid: a caption per region, in one forward per step (Lumina-T2I, Lumina-Next)."}),
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "From Lumina Text Encode: the negative prompt (empty text as the original)."},
                ),
                "latent_image": (
                    "LATENT",
                    {"tooltip": "Lumina Empty Latent, or VAE Encode (SDXL VAE) of an image for img2img."},
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "step": 1,
                        "control_after_generate": True,
                        "tooltip": "Noise seed; the same noise as KSampler for the same seed and latent size.",
                    },
                ),
                "steps": steps_input(30),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 4.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free guidance scale; 1.0 turns guidance off (the negative is not "
                        "evaluated).",
                    },
                ),
                "solver": (list(SOLVERS), {"default": "euler", "tooltip": SOLVER_TOOLTIP}),
                "shift": shift_input(),
                "denoise": denoise_input(),
                "extrapolation": (
                    list(EXTRAPOLATIONS),
                    {
                        "default": "t2i",
                        "tooltip": "Resolution extrapolation. t2i: NTK-aware RoPE and proportional attention, as the "
                        "original demo. time_aware: Lumina-Next's time-aware scaling. off: the plain model.",
                    },
                ),
                "guidance": (
                    list(GUIDANCE_MODES),
                    {
                        "default": "faithful",
                        "tooltip": "faithful: guide as the family's original demo: channels 0-2 of the 4 SDXL-latent "
                        "channels, channel 3 conditional (Lumina-T2I, Lumina-Next); all 16 channels for "
                        "Lumina-Image-2.0. all: guide every channel (what ComfyUI's CFG does).",
                    },
                ),
            },
            # Optional (after the required widgets, so saved workflows keep their widget order): API prompts written
            # before these inputs existed still run, with the family's defaults.
            "optional": {"cfg_trunc": cfg_trunc_input(), "renorm_cfg": renorm_cfg_input(), **grid_inputs()},
        }

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The generated SDXL-VAE latents (raw VAE scale), for VAE Decode.",)
    FUNCTION = "sample"
    CATEGORY = "Lumina/sampling"
    DESCRIPTION = (
        "Samples Lumina-T2I as the original does: rectified flow from t=0 (noise) to 1, shifted time grid, "
        "Lumina's guidance and resolution extrapolation. Runs through ComfyUI's sampling, so the MODEL's patches "
        "(TorchCompileModel, RenormCFG, ...) apply."
    )

    def sample(
        self, model, positive, negative, latent_image, seed, steps, cfg, solver, shift, denoise, extrapolation, guidance,
        cfg_trunc=FAMILY_DEFAULT, renorm_cfg=FAMILY_DEFAULT, grid="lumina", grid_shift=POWER_SHIFT,
        grid_rho=POWER_RHO,
    ):
        dit = comfy_model.lumina_dit(model)
        family = families.get_family(dit.family)
        raw = latent_for_family(check_latent(latent_image), family)
        fmt = family.latent_format
        cap = dit.config.cap_feat_dim
        # One entry: its text; area, mask or combined conditioning: a caption per region (nodes/regions.py).
        size = raw.shape[-2:]
        cond = conditioning_text(positive, cap, "positive", dit.family, size)
        uncond = conditioning_text(negative, cap, "negative", dit.family, size) if cfg != 1.0 else None
        out = {k: v for k, v in latent_image.items() if k != "downscale_ratio_spacial"}
        if comfy_env.IN_COMFYUI:
            out["samples"] = self._sample_in_comfyui(
                model, positive, negative if uncond is not None else positive, raw, latent_image.get("batch_index"),
                seed, steps, cfg, solver, shift, denoise, extrapolation, guidance,
                family_setting(model, "cfg_trunc", cfg_trunc), family_setting(model, "renorm_cfg", renorm_cfg),
                (grid, grid_shift, grid_rho),
            )
            return (out,)
        # Plain Python: nothing can patch the MODEL, so the core computes the same latents directly.
        noise = make_noise(seed, raw.shape, latent_image.get("batch_index"))
        device = model.load_device
        samples = sample(
            dit,
            noise.to(device),
            cond,
            uncond,
            steps=steps,
            cfg=cfg,
            shift=shift,
            solver=solver,
            denoise=denoise,
            init_latent=to_model_space(raw.float(), fmt).to(device) if denoise < 1.0 else None,
            extrapolation=extrapolation,
            guidance=guidance,
            cfg_trunc=family_setting(model, "cfg_trunc", cfg_trunc),
            renorm_cfg=family_setting(model, "renorm_cfg", renorm_cfg),
            grid=grid,
            grid_shift=grid_shift,
            grid_rho=grid_rho,
        )
        out["samples"] = to_vae_space(samples.float(), fmt).to(comfy_env.intermediate_device())
        return (out,)

    @staticmethod
    def _sample_in_comfyui(model, positive, negative, raw, batch_index, seed, steps, cfg, solver, shift, denoise,
                           extrapolation, guidance, cfg_trunc, renorm_cfg, solver_grid=("lumina",)):
        """Lumina Sigmas + Lumina CFG Guider + Lumina ODE Sampler through ComfyUI's sampling (the negative is the
        positive at cfg 1, where it is not evaluated); solver_grid: (grid, grid_shift, grid_rho)."""
        sigmas = sigmas_from_time_grid(sampling_grid(solver, steps, shift, denoise, *solver_grid))
        comfy_env.check_interrupted()
        if len(sigmas) < 2:  # denoise 0: nothing to do
            return raw.clone().to(comfy_env.intermediate_device())
        latent = {"samples": raw} if batch_index is None else {"samples": raw, "batch_index": batch_index}
        return comfy_sampling.sample_with_guider(
            model, positive, negative, latent, seed=seed, sigmas=sigmas, cfg=cfg, solver=solver, guidance=guidance,
            extrapolation=extrapolation, cfg_trunc=cfg_trunc, renorm_cfg=renorm_cfg, start_from_noise=denoise >= 1.0,
        )


class LuminaSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": steps_input(30),
                "shift": shift_input(),
                "denoise": denoise_input(),
                "solver": (
                    list(SOLVERS),
                    {
                        "default": "euler",
                        "tooltip": "The solver the sigmas are for. dpm: Lumina-Image-2.0's own DPM-Solver schedule "
                        "(from 1 - 0.001 shifted to exactly 0, steps >= 2), as the Lumina Sampler uses with dpm; "
                        "ComfyUI starts it from noise scaled by the first sigma (0.99983 at shift 6), about 1e-4 "
                        "from the original's plain noise, which the Lumina Sampler keeps. Every other solver: the "
                        "shifted uniform schedule.",
                    },
                ),
            },
            "optional": grid_inputs(),
        }

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("sigma = 1 - t of the Lumina time grid (float32, 1 = noise to 0 = data).",)
    FUNCTION = "get_sigmas"
    CATEGORY = "Lumina/sampling"
    DESCRIPTION = (
        "The exact Lumina schedule as SIGMAS, for SamplerCustomAdvanced and ComfyUI's samplers (euler there "
        "equals the Lumina Sampler's euler with guidance 'all'); with solver dpm, the schedule of Lumina-Image-2.0's "
        "dpm for the Lumina ODE Sampler's dpm."
    )

    def get_sigmas(self, steps, shift, denoise, solver="euler", grid="lumina", grid_shift=POWER_SHIFT,
                   grid_rho=POWER_RHO):
        return (sigmas_from_time_grid(sampling_grid(solver, steps, shift, denoise, grid, grid_shift, grid_rho)),)


class LuminaODESampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "solver": (
                    list(SOLVERS),
                    {
                        "default": "euler",
                        "tooltip": "euler (1 evaluation per step), midpoint (2), rk4 (4, the 3/8 rule), ab2 (second "
                        "order at 1 per step), dopri5 (adaptive: the SIGMAS set only start and end), dpm "
                        "(Lumina-Image-2.0's flow DPM-Solver++ 2M, 1 per step, on any SIGMAS; its original "
                        "schedule: Lumina Sigmas with solver dpm); few-step solvers at 1 evaluation per step: ab3, "
                        "dpmpp_2m, dpmpp_3m, unipc_2, unipc_3 (Lumina Sigmas with grid power gives their grid).",
                    },
                ),
                "rtol": tolerance_input(1e-3, 1e-8, "relative tolerance"),
                "atol": tolerance_input(1e-6, 1e-10, "absolute tolerance"),
            }
        }

    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("A SAMPLER for SamplerCustomAdvanced that integrates the flow ODE with the chosen solver.",)
    FUNCTION = "get_sampler"
    CATEGORY = "Lumina/sampling"
    DESCRIPTION = (
        "Lumina's exact ODE solvers for any flow MODEL (Lumina-T2I, Lumina-Image-2.0, SD3, Flux, AuraFlow) in "
        "SamplerCustomAdvanced: it turns ComfyUI's denoised prediction into the velocity and integrates dx/dt = v "
        "over the given SIGMAS, as the Lumina Sampler does."
    )

    def get_sampler(self, solver, rtol, atol):
        return (comfy_sampling.ode_sampler(solver, rtol, atol),)


class LuminaCFGGuider:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Any flow MODEL; its patches (RenormCFG, TorchCompileModel, ...) apply."}),
                "positive": ("CONDITIONING", {"tooltip": "The prompt."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt (not evaluated at cfg 1.0)."}),
                "cfg": (
                    "FLOAT",
                    {
                        "default": 4.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Classifier-free guidance scale; 1.0 skips the negative.",
                    },
                ),
                "guidance": (
                    list(GUIDANCE_MODES),
                    {
                        "default": "faithful",
                        "tooltip": "faithful: guide as the family's original demo: channels 0-2 of a 4-channel latent, "
                        "channel 3 conditional (Lumina-T2I, Lumina-Next); every channel of other latents "
                        "(Lumina-Image-2.0's 16). all: every channel, as CFGGuider.",
                    },
                ),
                "extrapolation": (
                    list(EXTRAPOLATIONS),
                    {
                        "default": "t2i",
                        "tooltip": "Resolution extrapolation of Lumina DiTs (other models ignore it): t2i, "
                        "time_aware or off, as in the Lumina Sampler.",
                    },
                ),
            },
            "optional": {"cfg_trunc": cfg_trunc_input(), "renorm_cfg": renorm_cfg_input()},
        }

    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A GUIDER for SamplerCustomAdvanced.",)
    FUNCTION = "get_guider"
    CATEGORY = "Lumina/sampling"
    DESCRIPTION = (
        "Classifier-free guidance with Lumina's three-channel (faithful) mode and Lumina-Image-2.0's CFG truncation "
        "and renormalisation, through ComfyUI's cfg steps so a MODEL's cfg function and post-CFG patches still "
        "apply. With Lumina Sigmas and Lumina ODE Sampler in SamplerCustomAdvanced it gives what the Lumina Sampler "
        "gives (exactly; with dpm up to ComfyUI's scaling of the starting noise, see Lumina Sigmas)."
    )

    def get_guider(self, model, positive, negative, cfg, guidance, extrapolation, cfg_trunc=FAMILY_DEFAULT,
                   renorm_cfg=FAMILY_DEFAULT):
        return (comfy_sampling.cfg_guider(model, positive, negative, cfg, guidance, extrapolation,
                                          family_setting(model, "cfg_trunc", cfg_trunc),
                                          family_setting(model, "renorm_cfg", renorm_cfg)),)
