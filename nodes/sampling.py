"""Lumina Sampler (the original's rectified-flow sampler) and Lumina Sigmas (its schedule for ComfyUI's samplers)."""

from __future__ import annotations

from lumina_core import sampling
from lumina_core.latent import to_model_space, to_vae_space

from . import comfy_glue
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
                "solver": (list(sampling.SOLVERS), {"default": "euler", "tooltip": "ODE solver (dopri5 is adaptive)."}),
                "shift": _shift_input(),
                "denoise": _denoise_input(),
                "extrapolation": (
                    list(sampling.EXTRAPOLATIONS),
                    {
                        "default": "t2i",
                        "tooltip": "Resolution extrapolation. t2i: NTK-aware RoPE and proportional attention, as the "
                        "original demo. time_aware: Lumina-Next's time-aware scaling. off: the plain model.",
                    },
                ),
                "guidance": (
                    list(sampling.GUIDANCE_MODES),
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
        "Lumina's guidance and resolution extrapolation."
    )

    def sample(
        self, model, positive, negative, latent_image, seed, steps, cfg, solver, shift, denoise, extrapolation, guidance
    ):
        dit = comfy_glue.lumina_dit(model)
        raw = check_latent(latent_image)
        cap = dit.config.cap_feat_dim
        cond = text_from_conditioning(positive, cap, "positive", family=dit.family)
        uncond = text_from_conditioning(negative, cap, "negative", family=dit.family) if cfg != 1.0 else None
        noise = sampling.make_noise(seed, raw.shape, latent_image.get("batch_index"))
        n_steps = len(sampling.time_grid(steps, shift, denoise)) - 1
        comfy_glue.check_interrupted()
        device = comfy_glue.prepare_sampling(model, raw.shape, guided=uncond is not None)
        samples = sampling.sample(
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
            callback=comfy_glue.step_callback(model, n_steps),
        )
        out = {k: v for k, v in latent_image.items() if k != "downscale_ratio_spacial"}
        out["samples"] = to_vae_space(samples.float()).to(comfy_glue.intermediate_device())
        return (out,)


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
        return (sampling.sigmas_from_time_grid(sampling.time_grid(steps, shift, denoise)),)
