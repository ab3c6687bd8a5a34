"""`LuminaPipeline`: Lumina-Next (Next-DiT, Gemma-2B, SDXL VAE) from a script, called as diffusers' `LuminaPipeline`.

The arguments of diffusers' pipeline keep diffusers' meaning; the core underneath is the faithful one (the Lumina
Sampler node's sampling, so a `seed=` gives the same latent as in ComfyUI). Side by side:

- `num_inference_steps`, `sigmas`: the solver's steps, and diffusers' custom sigmas (noise levels from 1 down,
  time-shifted by `shift` as diffusers' FlowMatchEulerDiscreteScheduler shifts them, then 0). diffusers' scheduler
  is Euler; `solver` (the pack's) picks another ("midpoint": the original demo's, two evaluations per step) and
  `shift` (the pack's; default the original's 4) is its time shift. diffusers' released Lumina-Next-SFT-diffusers
  scheduler has shift 1 and, without `sigmas`, runs linspace(1, 0.001) shifted twice: pass
  `sigmas=np.linspace(1, 1/N, N)` to diffusers to get this pipeline's grid.
- `scaling_watershed`, `proportional_attn` (diffusers' defaults 1.0 and True): RoPE scaled by
  s = sqrt(width*height)/1024 (also below 1 for images smaller than 1024x1024), linearly while t < scaling_watershed
  and by NTK from there; proportional attention with base 4096 image tokens. The pack's `extrapolation` replaces them
  by the original demo's rule (its "time_aware": watershed 0.3, only beyond 1024x1024), as the Lumina Sampler node.
- `guidance_scale` guides channels 0..2 (diffusers' and the original's; the pack's `guidance="all"`: all 4) and only
  above 1, as diffusers.
- `clean_caption`: diffusers' caption cleaning (beautifulsoup4 + ftfy) is not done; without those packages diffusers
  uses the raw prompt, lower-cased and stripped. Here the prompt is always encoded as written, as the original and
  the nodes encode it.
- the negative prompt is encoded whole, as the original; diffusers cuts it to the prompt's padded token length.
- `output_type="latent"` gives the model-space latents, as diffusers (raw SDXL-VAE latents are these / 0.13025).
- `callback_on_step_end(pipe, i, timestep, {"latents", "prompt_embeds"})` runs after each step; its return value is
  not applied.
- `regions=` (the pack's): a caption per region, Lumina-Next's compositional generation (`lumina_core.sample`).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence, Union

import torch

from .family_pipeline import DEFAULT_SIZE, FamilyPipeline
from .models.config import TRAINED_SIDE, TRAINED_SIZE
from .pipeline_parts import check_callback_inputs, check_sampling, full_batch, solver_grid, step_callback
from .sampling.guidance import GUIDANCE_MODES
from .sampling.loop import EXTRAPOLATIONS
from .sampling.schedule import POWER_RHO, POWER_SHIFT

logger = logging.getLogger(__name__)


def diffusers_rope_rule(width: int, height: int, scaling_watershed: float, proportional_attn: bool) -> Callable:
    """The Next-DiT keywords diffusers' LuminaPipeline uses at every step, as an extrapolation rule of
    `lumina_core.sample`: scale s = sqrt(width*height)/1024 (applied whenever s != 1), linear while t <
    scaling_watershed and NTK from it on; proportional attention with base (1024/16)^2 image tokens."""
    scale = math.sqrt(width * height) / TRAINED_SIZE

    def rule(mode, latent_h, latent_w, t, watershed):
        kwargs = {}
        if proportional_attn:
            kwargs.update(proportional_attn=True, base_seqlen=TRAINED_SIDE * TRAINED_SIDE)
        if scale != 1.0:
            kwargs.update(scale_factor=scale, scale_watershed=float(scaling_watershed))
        return kwargs

    return rule


class LuminaPipeline(FamilyPipeline):
    """Lumina-Next text to image: `pipe(prompt).images[0]`, diffusers' LuminaPipeline's call on the faithful core.

    transformer: the Next-DiT; text_encoder: a GemmaTextEncoder; vae: the SDXL VAE (diffusers' AutoencoderKL).
    """

    family_name = "lumina_next"

    def encode_prompt(self, prompt, do_classifier_free_guidance: bool = True, negative_prompt=None,
                      num_images_per_prompt: int = 1, device=None, prompt_embeds=None, negative_prompt_embeds=None,
                      prompt_attention_mask=None, negative_prompt_attention_mask=None, clean_caption: bool = False,
                      max_sequence_length: int = 256):
        """(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask), as
        diffusers' encode_prompt: float32 features [N, L, 2048] and bool masks [N, L], N = prompts x
        num_images_per_prompt, on `device` (default the CPU); the negatives are None without guidance. Pass them to
        the call to skip the text encoder."""
        _clean_caption_note(clean_caption)
        out = self._call_text(prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                              negative_prompt_attention_mask, guided=do_classifier_free_guidance,
                              per_prompt=num_images_per_prompt, max_tokens=max_sequence_length)
        return full_batch(out, device)

    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        negative_prompt: Union[str, Sequence[str], None] = None,
        sigmas: Optional[Sequence[float]] = None,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        clean_caption: bool = False,
        max_sequence_length: int = 256,
        scaling_watershed: float = 1.0,
        proportional_attn: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        seed: Optional[int] = None,
        solver: str = "euler",
        shift: Optional[float] = None,
        extrapolation: Optional[str] = None,
        guidance: str = "faithful",
        regions: Optional[Sequence] = None,
        grid: str = "lumina",
        grid_shift: float = POWER_SHIFT,
        grid_rho: float = POWER_RHO,
        batch_cfg: bool = True,
    ):
        """Generate images; returns LuminaPipelineOutput(images=...) (a 1-tuple with return_dict=False).

        diffusers' arguments mean what they mean there (see the module docstring for where the original differs).
        The pack's, keyword only: seed (the Lumina Sampler node's noise for that seed; image i gets the same noise
        in any batch), solver ("euler", diffusers' scheduler; "midpoint" the original demo's, ...), shift (the time
        shift, default the original's 4.0), extrapolation (the original demo's rule instead of scaling_watershed
        and proportional_attn: "time_aware", "t2i" or "off"), guidance ("faithful": channels 0..2 as the original
        and diffusers; "all"), regions (a caption per region: [(caption, box_or_mask[, strength]), ...], caption
        a string or features/(features, mask), box (left, top, right, bottom) in fractions of the image; the
        prompt, if given, is the global caption).

        grid, grid_shift, grid_rho: the solver grid, as the Lumina Sampler's: "lumina" (the solver's own at `shift`)
        or "power" (sigma_i = shift_s((1 - i/N)^rho), s = grid_shift, rho = grid_rho; the README's "Few-step
        sampling"); not with `sigmas`.
        batch_cfg: False runs the negative prompt as its own evaluation (`lumina_core.sample`): less memory, more
        time.

        Noise: `latents` if given, else one draw per image from a list of generators, one draw from a single
        generator, the nodes' noise for `seed`, or torch's global generator (float32, on the generators' device).
        """
        width = DEFAULT_SIZE if width is None else width
        height = DEFAULT_SIZE if height is None else height
        self._check_call(width, height, output_type, num_images_per_prompt, seed, generator, guidance_scale)
        names = check_callback_inputs(callback_on_step_end_tensor_inputs)
        check_sampling(solver, num_inference_steps, sigmas, grid)
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance {guidance!r}; choose one of {', '.join(GUIDANCE_MODES)}")
        if extrapolation is not None and extrapolation not in EXTRAPOLATIONS:
            raise ValueError(f"unknown extrapolation {extrapolation!r}; choose one of {', '.join(EXTRAPOLATIONS)}")
        _clean_caption_note(clean_caption)
        shift = self.family.defaults.shift if shift is None else shift
        ts = solver_grid(solver, num_inference_steps, shift, sigmas, grid, grid_shift, grid_rho)

        guided = guidance_scale > 1.0
        if regions is not None and prompt is None and prompt_embeds is None:
            feats = mask = nf = nm = None  # the global caption: all the region captions pooled
            if guided:
                nf, nm = self._negative_text(negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask,
                                             1, max_sequence_length)
            noise_prompt = ""
        else:
            feats, mask, nf, nm = self._call_text(
                prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                negative_prompt_attention_mask, guided=guided, per_prompt=num_images_per_prompt,
                max_tokens=max_sequence_length)
            noise_prompt = prompt
        noise = self._noise(noise_prompt, prompt_embeds, num_images_per_prompt, height, width, generator, seed,
                            latents)
        settings = {"steps": len(ts) - 1, "cfg": guidance_scale if guided else 1.0, "shift": shift,
                    "solver": solver, "guidance": guidance}
        if extrapolation is None:
            settings["extrapolation_rule"] = diffusers_rope_rule(width, height, scaling_watershed, proportional_attn)
        else:
            settings["extrapolation"] = extrapolation
        if sigmas is not None or grid != "lumina":
            settings["times"] = ts
        settings["batch_cfg"] = batch_cfg
        out = self._sample(
            noise, None if feats is None else (feats, mask), (nf, nm) if guided else None, n_steps=len(ts) - 1,
            on_step=step_callback(self, callback_on_step_end, names, ts, feats),
            regions=None if regions is None else self._region_captions(regions, max_sequence_length), **settings,
        )
        return self._output(out, output_type, return_dict)

    def _region_captions(self, regions: Sequence, max_tokens: int) -> list:
        """The regions with each caption given as text encoded (features and mask)."""
        out = []
        for region in regions:
            if not isinstance(region, (list, tuple)) or len(region) not in (2, 3):
                raise ValueError(f"a region is (caption, box_or_mask) or (caption, box_or_mask, strength), got "
                                 f"{region!r}")
            caption = region[0]
            if isinstance(caption, str):
                caption = self._encode([caption], max_tokens)
            out.append((caption, *region[1:]))
        return out


def _clean_caption_note(clean_caption: bool) -> None:
    if clean_caption:
        logger.warning("clean_caption=True: diffusers' caption cleaning (beautifulsoup4, ftfy) is not done here; "
                       "the prompt is encoded as written")
