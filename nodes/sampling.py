"""Lumina Sampler (the original's rectified-flow sampler), Lumina Sigmas (its schedule), and its solver and
guidance as ComfyUI parts: Lumina ODE Sampler (a SAMPLER) and Lumina CFG Guider (a GUIDER) for SamplerCustomAdvanced.

Inside ComfyUI the Lumina Sampler is those parts run through ComfyUI's own sampling, so every patch on the MODEL
applies; on plain Python (tests, scripts) it calls `lumina_core.sample`, which computes the same latents.
"""

from __future__ import annotations

from lumina_core import make_noise, sample
from lumina_core.image.latent import to_model_space, to_vae_space
from lumina_core.sampling.guidance import GUIDANCE_MODES
from lumina_core.sampling.loop import EXTRAPOLATIONS
from lumina_core.sampling.schedule import sigmas_from_time_grid, time_grid
from lumina_core.sampling.solvers import SOLVERS

from . import comfy_env, comfy_model, comfy_sampling
from .common import check_latent, text_from_conditioning

MAX_STEPS = 10000


def _steps_input(default):
    return ("INT", {"default": default, "min": 1, "max": MAX_STEPS, "step": 1, "tooltip": "Solver steps."})


def _shift_input():
    return (
        "FLOAT",
        {
            "default": 4.0,
            "min": 0.01,
            "max": 100.0,
            "step": 0.01,
            "tooltip": "Time shift s of the schedule, t' = t / (t + s - s*t); 4.0 as the original. Higher spends more "
            "steps near noise.",
        },
    )


def _denoise_input():
    return (
        "FLOAT",
        {
            "default": 1.0,
            "min": 0.0,
            "max": 1.0,
            "step": 0.01,
            "tooltip": "1.0 generates from noise. Below 1 (img2img) only the last part of the schedule runs, as in "
            "the original: about denoise * steps steps, from a partly noised input.",
        },
    )


class LuminaSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "From Lumina Load DiT (or Lumina Load Flag-DiT)."}),
                "positive": ("CONDITIONING", {"tooltip": "From Lumina Text Encode: the prompt."}),
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
                "steps": _steps_input(30),
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
                "solver": (list(SOLVERS), {"default": "euler", "tooltip": "ODE solver (dopri5 is adaptive)."}),
                "shift": _shift_input(),
                "denoise": _denoise_input(),
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
                        "tooltip": "faithful: guide latent channels 0-2 and keep channel 3 conditional, as the "
                        "released demo. all: guide all 4 channels (what ComfyUI's CFG does).",
                    },
                ),
            }
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
        self, model, positive, negative, latent_image, seed, steps, cfg, solver, shift, denoise, extrapolation, guidance
    ):
        dit = comfy_model.lumina_dit(model)
        raw = check_latent(latent_image)
        cap = dit.config.cap_feat_dim
        cond = text_from_conditioning(positive, cap, "positive", family=dit.family)
        uncond = text_from_conditioning(negative, cap, "negative", family=dit.family) if cfg != 1.0 else None
        out = {k: v for k, v in latent_image.items() if k != "downscale_ratio_spacial"}
        if comfy_env.IN_COMFYUI:
            out["samples"] = self._sample_in_comfyui(
                model, positive, negative if uncond is not None else positive, raw, latent_image.get("batch_index"),
                seed, steps, cfg, solver, shift, denoise, extrapolation, guidance,
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
            init_latent=to_model_space(raw.float()).to(device) if denoise < 1.0 else None,
            extrapolation=extrapolation,
            guidance=guidance,
        )
        out["samples"] = to_vae_space(samples.float()).to(comfy_env.intermediate_device())
        return (out,)

    @staticmethod
    def _sample_in_comfyui(model, positive, negative, raw, batch_index, seed, steps, cfg, solver, shift, denoise,
                           extrapolation, guidance):
        """Lumina Sigmas + Lumina CFG Guider + Lumina ODE Sampler through ComfyUI's sampling (the negative is the
        positive at cfg 1, where it is not evaluated)."""
        sigmas = sigmas_from_time_grid(time_grid(steps, shift, denoise))
        comfy_env.check_interrupted()
        if len(sigmas) < 2:  # denoise 0: nothing to do
            return raw.clone().to(comfy_env.intermediate_device())
        latent = {"samples": raw} if batch_index is None else {"samples": raw, "batch_index": batch_index}
        return comfy_sampling.sample_with_guider(
            model, positive, negative, latent, seed=seed, sigmas=sigmas, cfg=cfg, solver=solver, guidance=guidance,
            extrapolation=extrapolation,
        )


class LuminaSigmas:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": _steps_input(30), "shift": _shift_input(), "denoise": _denoise_input()}}

    RETURN_TYPES = ("SIGMAS",)
    OUTPUT_TOOLTIPS = ("sigma = 1 - t of the Lumina time grid (float32, 1 = noise to 0 = data).",)
    FUNCTION = "get_sigmas"
    CATEGORY = "Lumina/sampling"
    DESCRIPTION = (
        "The exact Lumina-T2I schedule as SIGMAS, for SamplerCustomAdvanced and ComfyUI's samplers (euler there "
        "equals the Lumina Sampler's euler with guidance 'all')."
    )

    def get_sigmas(self, steps, shift, denoise):
        return (sigmas_from_time_grid(time_grid(steps, shift, denoise)),)


def _tolerance_input(default: float, minimum: float, what: str):
    return (
        "FLOAT",
        {
            "default": default,
            "min": minimum,
            "max": 1.0,
            "step": minimum,
            "round": False,
            "tooltip": f"dopri5 only: {what} of the adaptive step control (the other solvers ignore it).",
        },
    )


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
                        "order at 1 per step), dopri5 (adaptive: the SIGMAS set only start and end).",
                    },
                ),
                "rtol": _tolerance_input(1e-3, 1e-8, "relative tolerance"),
                "atol": _tolerance_input(1e-6, 1e-10, "absolute tolerance"),
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
                        "tooltip": "faithful: guide latent channels 0-2 and keep the others conditional, as the "
                        "Lumina-T2I demo (meant for its 4-channel SDXL latents). all: every channel, as CFGGuider.",
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
            }
        }

    RETURN_TYPES = ("GUIDER",)
    OUTPUT_TOOLTIPS = ("A GUIDER for SamplerCustomAdvanced.",)
    FUNCTION = "get_guider"
    CATEGORY = "Lumina/sampling"
    DESCRIPTION = (
        "Classifier-free guidance with Lumina's three-channel (faithful) mode, through ComfyUI's cfg steps so a "
        "MODEL's cfg function and post-CFG patches still apply. With Lumina Sigmas and Lumina ODE Sampler in "
        "SamplerCustomAdvanced it gives exactly what the Lumina Sampler gives."
    )

    def get_guider(self, model, positive, negative, cfg, guidance, extrapolation):
        return (comfy_sampling.cfg_guider(model, positive, negative, cfg, guidance, extrapolation),)
