"""Area and mask conditioning on the Lumina-Next MODEL inside a real ComfyUI process, run by ComfyUI's python (see
test_comfyui_regions.py): `python comfy_region_checks.py regions OUT_DIR` with the ComfyUI checkout as the working
directory. Prints one JSON line of measurements; the pytest side asserts on them.

The conditioning is made by ComfyUI's own nodes (ConditioningSetArea, ConditioningSetMask, ConditioningCombine); the
DiT's evaluations are counted (calls and images per call) under the Lumina Sampler, SamplerCustomAdvanced with the
Lumina CFG Guider and with ComfyUI's CFGGuider, and KSampler, and the results are compared with the core's text by
region (`lumina_core.sample(..., regions=...)`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from comfy_boot import main, rel  # first: ComfyUI on the CPU, the pack imported as ComfyUI does

# isort: split

import comfy.samplers
import torch
from ComfyUI_Lumina.nodes import NODE_CLASS_MAPPINGS as N
from ComfyUI_Lumina.nodes import comfy_env, comfy_model
from ComfyUI_Lumina.nodes.common import make_conditioning
from ComfyUI_Lumina.nodes.regions import GLOBAL_CAPTION_KEY

import nodes as comfy_nodes  # (ComfyUI's nodes.py: the pack is imported under its own name)
from lumina_core.generation import sample
from lumina_core.image.latent import to_vae_space
from lumina_core.models.regions import grid_regions, region_text
from lumina_core.sampling.schedule import make_noise
from lumina_core.tiny import write_tiny_next_dit

assert comfy_env.IN_COMFYUI

CAP = 32
SEED = 5
STEPS = 3
CFG = 4.0
# The latent: 6 x 8 (a 64 x 48 image), batch 2.
LATENT = {"samples": torch.zeros(2, 4, 6, 8)}


class Counter:
    """Counts the DiT's network calls, the images in them and its preparations of a text by region."""

    def __init__(self, dit):
        self.dit, self.forwards, self.rows, self.prepared = dit, 0, 0, 0
        forward, prepare = dit.forward_with_text, dit.prepare_regions

        def counted(x, *a, **k):
            self.forwards += 1
            self.rows += x.shape[0]
            return forward(x, *a, **k)

        def counted_prepare(*a, **k):
            self.prepared += 1
            return prepare(*a, **k)

        dit.forward_with_text, dit.prepare_regions = counted, counted_prepare

    def take(self) -> dict:
        out = {"forwards": self.forwards, "rows": self.rows, "prepared": self.prepared}
        self.forwards = self.rows = self.prepared = 0
        return out


def caption(g, length):
    return torch.randn(1, length, CAP, generator=g), torch.ones(1, length, dtype=torch.bool)


def lumina(text):
    return make_conditioning(*text, family="lumina_next")


def lumina_sampler(model, pos, neg, guidance="all"):
    (out,) = N["LuminaSampler"]().sample(model, pos, neg, LATENT, SEED, STEPS, CFG, "euler", 4.0, 1.0, "time_aware",
                                         guidance, -1.0, -1.0)
    return out["samples"]


def custom_advanced(model, pos, neg, lumina_guider: bool):
    from comfy_extras.nodes_custom_sampler import KSamplerSelect, Noise_RandomNoise, SamplerCustomAdvanced

    if lumina_guider:
        (guider,) = N["LuminaCFGGuider"]().get_guider(model, pos, neg, CFG, "all", "time_aware")
        (sampler,) = N["LuminaODESampler"]().get_sampler("euler", 1e-3, 1e-6)
    else:
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(CFG)
        sampler = KSamplerSelect.execute("euler").result[0]
    (sigmas,) = N["LuminaSigmas"]().get_sigmas(STEPS, 4.0, 1.0)
    return SamplerCustomAdvanced.execute(Noise_RandomNoise(SEED), guider, sampler, sigmas, LATENT).result[0]["samples"]


def ksampler(model, pos, neg):
    return comfy_nodes.common_ksampler(model, SEED, STEPS, CFG, "euler", "simple", pos, neg, LATENT)[0]["samples"]


def core(dit, cond, uncond, regions, guidance="all"):
    with torch.no_grad():
        out = sample(dit, make_noise(SEED, LATENT["samples"].shape), cond, uncond, steps=STEPS, cfg=CFG, shift=4.0,
                     solver="euler", extrapolation="time_aware", guidance=guidance, regions=regions)
    return to_vae_space(out)


def check_regions(out: Path) -> dict:
    from comfy.patcher_extension import WrappersMP

    model = comfy_model.load_dit_model(str(write_tiny_next_dit(out / "tiny_next.safetensors", 3, cap_feat_dim=CAP)),
                                       "fp32")
    dit = comfy_model.lumina_dit(model)
    g = torch.Generator().manual_seed(1)
    left, right, masked, negative = caption(g, 5), caption(g, 3), caption(g, 4), caption(g, 2)
    area = comfy_nodes.ConditioningSetArea()
    # Two areas of the 64 x 48 image (the latent's left and right halves), the right one at strength 1.5.
    two_areas = comfy_nodes.ConditioningCombine().combine(
        area.append(lumina(left), 32, 48, 0, 0, 1.0)[0], area.append(lumina(right), 32, 48, 32, 0, 1.5)[0])[0]
    two_regions = [(left, (0.0, 0.0, 0.5, 1.0)), (right, (0.5, 0.0, 1.0, 1.0), 1.5)]
    neg = lumina(negative)
    counter = Counter(dit)
    result = {"steps": STEPS, "batch": LATENT["samples"].shape[0]}

    want = core(dit, None, negative, two_regions)
    runs = {
        "lumina_sampler": lambda: lumina_sampler(model, two_areas, neg),
        "lumina_guider": lambda: custom_advanced(model, two_areas, neg, lumina_guider=True),
        "cfg_guider": lambda: custom_advanced(model, two_areas, neg, lumina_guider=False),
        "ksampler": lambda: ksampler(model, two_areas, neg),
    }
    counter.take()
    for name, run in runs.items():
        got = run()
        result[name] = dict(counter.take(), vs_core=rel(got, want), finite=bool(torch.isfinite(got).all()))
    plain = lumina_sampler(model, lumina(left), neg)
    result["plain_vs_core"] = rel(plain, want)
    counter.take()

    # ComfyUI's default without the pack's wrapper: one call per area (each on its crop), as a contrast.
    default = model.clone()
    default.remove_wrappers_with_key(WrappersMP.CALC_COND_BATCH, comfy_model.WRAPPER_KEY)
    ksampler(default, two_areas, neg)
    result["comfy_default"] = counter.take()

    # A mask (the lower half of the image) at mask strength 0.7 with a whole-image prompt, through ConditioningSetMask.
    mask = torch.zeros(1, 48, 64)
    mask[:, 24:] = 1.0
    with_mask = comfy_nodes.ConditioningCombine().combine(
        lumina(left), comfy_nodes.ConditioningSetMask().append(lumina(masked), mask, "default", 0.7)[0])[0]
    got = lumina_sampler(model, with_mask, neg)
    result["mask"] = counter.take()
    result["mask"]["vs_core"] = rel(got, core(dit, None, negative, [(left, None), (masked, mask, 0.7)]))
    counter.take()

    # Lumina Region Grid's conditioning (a 1 x 2 grid with the global caption on both branches) = the core's
    # reproduction of the original demo, faithful guidance.
    global_caption = caption(g, 6)
    cells = [left, right]
    grid = []
    for index, cell in enumerate(cells):
        [[features, extras]] = lumina(cell)
        extras.update(area=("percentage", 1.0, 0.5, 0.0, index / 2), strength=1.0, set_area_to_bounds=False)
        extras[GLOBAL_CAPTION_KEY] = global_caption
        grid.append([features, extras])
    [[features, extras]] = lumina(negative)
    grid_negative = [[features, dict(extras, **{GLOBAL_CAPTION_KEY: global_caption})]]
    got = lumina_sampler(model, grid, grid_negative, guidance="faithful")
    result["grid"] = counter.take()
    uncond = region_text([(negative, None)], (6, 8), pooled=global_caption)
    want = core(dit, global_caption, uncond, grid_regions(cells, 1, 2), guidance="faithful")
    result["grid"]["vs_core"] = rel(got, want)
    return result


if __name__ == "__main__":
    with torch.no_grad():
        sys.exit(main(globals()))
