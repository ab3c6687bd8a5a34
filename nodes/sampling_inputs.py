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


def _float_input(default: float, minimum: float, maximum: float, tooltip: str, **extra):
    """A FLOAT widget in steps of 0.01."""
    return ("FLOAT", {"default": default, "min": minimum, "max": maximum, "step": 0.01, **extra, "tooltip": tooltip})


def shift_input():
    return _float_input(
        4.0, 0.01, 100.0,
        "Time shift s of the schedule, t' = t / (t + s - s*t); 4.0 as the original. Higher spends more steps near "
        "noise.",
    )


def cfg_trunc_input():
    return _float_input(
        FAMILY_DEFAULT, FAMILY_DEFAULT, 100.0,
        "CFG truncation (Lumina-Image-2.0): guide while the evaluation's t = 1 - sigma is below this (t = 0 noise, "
        "1 data), then evaluate the prompt alone at half the cost. 1.0 or more: always guide; 0: never. -1: the "
        "model family's default (Lumina-Image-2.0: 0.25, about the first two thirds of the steps at shift 6; "
        "Lumina-T2I, Lumina-Next and other models: 1.0). ComfyUI's RenormCFG tests sigma instead.",
    )


def renorm_cfg_input():
    return _float_input(
        FAMILY_DEFAULT, FAMILY_DEFAULT, 100.0,
        "CFG renormalisation (Lumina-Image-2.0): while guiding, the guided prediction's norm per image is clamped to "
        "this times the prompt-only prediction's norm. 0: off. -1: the model family's default (Lumina-Image-2.0: "
        "1.0; Lumina-T2I, Lumina-Next and other models: 0, off).",
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
        "grid_shift": _float_input(
            POWER_SHIFT, 0.01, 100.0, "grid power only: its shift s, sigma' = s*sigma / (1 + (s-1)*sigma).",
            advanced=True,
        ),
        "grid_rho": _float_input(
            POWER_RHO, 0.1, 10.0,
            "grid power only: its exponent rho, sigma = (1 - i/steps)^rho before the shift; above 1 puts more steps "
            "near the image, 1 is the Lumina grid at shift grid_shift.",
            advanced=True,
        ),
    }


def denoise_input():
    return _float_input(
        1.0, 0.0, 1.0,
        "1.0 generates from noise. Below 1 (img2img) only the last part of the schedule runs, as in the original: "
        "about denoise * steps steps, from a partly noised input.",
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
