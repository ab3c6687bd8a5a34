"""The input specifications of the Lumina sampling nodes (`nodes.sampling`): widgets, defaults and tooltips."""

from __future__ import annotations

from lumina_core.sampling.schedule import GRIDS, POWER_RHO, POWER_SHIFT

MAX_STEPS = 10000
# cfg_trunc / renorm_cfg value meaning "the model family's default" (any negative value does).
FAMILY_DEFAULT = -1.0
SOLVER_TOOLTIP = (
    "euler (1 evaluation per step), midpoint (2), rk4 (4, the 3/8 rule), ab2 (second order at 1 per step), dopri5 "
    "(adaptive), dpm (Lumina-Image-2.0's flow DPM-Solver++ 2M, 1 per step on its own schedule, steps >= 2). Few "
    "steps, 1 evaluation per step each: ab3 (Adams-Bashforth 3), dpmpp_2m / dpmpp_3m (DPM-Solver++ 2M / 3M), "
    "unipc_2 / unipc_3 (UniPC bh2, predictor of order 2 / 3, its corrector reusing the next evaluation); with grid "
    "power."
)


def steps_input(default):
    return ("INT", {"default": default, "min": 1, "max": MAX_STEPS, "step": 1, "tooltip": "Solver steps."})


def shift_input():
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


def cfg_trunc_input():
    return (
        "FLOAT",
        {
            "default": FAMILY_DEFAULT,
            "min": FAMILY_DEFAULT,
            "max": 100.0,
            "step": 0.01,
            "tooltip": "CFG truncation (Lumina-Image-2.0): guide while the evaluation's t = 1 - sigma is below this "
            "(t = 0 noise, 1 data), then evaluate the prompt alone at half the cost. 1.0 or more: always guide; 0: "
            "never. -1: the model family's default (Lumina-Image-2.0: 0.25, about the first two thirds of the steps "
            "at shift 6; Lumina-T2I, Lumina-Next and other models: 1.0). ComfyUI's RenormCFG tests sigma instead.",
        },
    )


def renorm_cfg_input():
    return (
        "FLOAT",
        {
            "default": FAMILY_DEFAULT,
            "min": FAMILY_DEFAULT,
            "max": 100.0,
            "step": 0.01,
            "tooltip": "CFG renormalisation (Lumina-Image-2.0): while guiding, the guided prediction's norm per image "
            "is clamped to this times the prompt-only prediction's norm. 0: off. -1: the model family's default "
            "(Lumina-Image-2.0: 1.0; Lumina-T2I, Lumina-Next and other models: 0, off).",
        },
    )


def grid_inputs() -> dict:
    """The solver-grid inputs (advanced; their defaults keep the Lumina grid of the shift input)."""
    return {
        "grid": (
            list(GRIDS),
            {
                "default": "lumina",
                "advanced": True,
                "tooltip": "Solver grid. lumina: the shifted grid of the shift input (the solver's own for dpm), as "
                "the originals. power: sigma_i = shift_s((1 - i/steps)^rho) with grid_shift and grid_rho (the shift "
                "input unused): with ab3 or ab2 and 8 steps, the accuracy of the Lumina-T2I demo's 29 Euler steps on "
                "exact flows; see the README's Few-step sampling.",
            },
        ),
        "grid_shift": (
            "FLOAT",
            {
                "default": POWER_SHIFT,
                "min": 0.01,
                "max": 100.0,
                "step": 0.01,
                "advanced": True,
                "tooltip": "grid power only: its shift s, sigma' = s*sigma / (1 + (s-1)*sigma).",
            },
        ),
        "grid_rho": (
            "FLOAT",
            {
                "default": POWER_RHO,
                "min": 0.1,
                "max": 10.0,
                "step": 0.01,
                "advanced": True,
                "tooltip": "grid power only: its exponent rho, sigma = (1 - i/steps)^rho before the shift; above 1 "
                "puts more steps near the image, 1 is the Lumina grid at shift grid_shift.",
            },
        ),
    }


def denoise_input():
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


def tolerance_input(default: float, minimum: float, what: str):
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
