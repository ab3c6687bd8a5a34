"""`Lumina2Pipeline`: Lumina-Image-2.0 (Unified Next-DiT, Gemma-2-2B, FLUX AE) from a script, called as diffusers'
`Lumina2Pipeline`.

The arguments of diffusers' pipeline keep diffusers' meaning; the core underneath is the faithful one (the Lumina
Sampler node's sampling, so a `seed=` gives the same latent as in ComfyUI). Where diffusers and the original
(github Alpha-VLLM/Lumina-Image-2.0) mean different things by the same words, the original's meaning is offered as
the pack's own argument, side by side:

- CFG truncation. diffusers' `cfg_trunc_ratio` (default 1.0: never truncated) is a fraction of the steps: step i
  (0-based) of N is guided while (i + 1)/N <= cfg_trunc_ratio. The pack's `cfg_trunc` is the original's: an
  evaluation at time t (0 = noise, 1 = data) is guided while t < cfg_trunc (the demo's 0.25; >= 1 always). After it
  only the prompt's branch is evaluated, in both.
- CFG normalisation. diffusers' `cfg_normalization` (default True) always rescales the guided velocity to the
  conditional velocity's norm, row by row (the norm over the latent's last axis). The pack's `renorm_cfg` is the
  original's: the guided velocity's norm per sample (over all channels and pixels) is clamped to renorm_cfg times
  the conditional one's (the demo's 1.0; 0 off). Given, it replaces cfg_normalization.
- `num_inference_steps`, `sigmas`: the solver's steps, and diffusers' custom sigmas (noise levels from 1 down,
  time-shifted by `shift` as diffusers' FlowMatchEulerDiscreteScheduler shifts them, then 0). diffusers' scheduler
  is Euler with shift 6; the pack's `solver` ("euler"; "midpoint": the original demo's, two evaluations per step;
  "dpm": its flow DPM-Solver++ on its own grid) and `shift` (6.0) choose otherwise. The original demo: solver
  "midpoint", 17 steps, cfg_trunc 0.25, renorm_cfg 1.0, the family's defaults in the Lumina Sampler node.
- `guidance_scale` guides all 16 channels and only above 1, as diffusers.
- `system_prompt`: None gives the original's default ("superior", diffusers' default text too); a preset name of
  `lumina_core.SYSTEM_PROMPTS` or a sentence of one's own; "" or "empty": the prompt alone (diffusers would still
  write " <Prompt Start> " in front). Negative prompts are encoded without it, as diffusers and the original do.
- `output_type="latent"` gives the model-space latents, as diffusers (the FLUX AE's raw latents are these / 0.3611
  + 0.1159, what ComfyUI's LATENT holds).
- `callback_on_step_end(pipe, i, timestep, {"latents", "prompt_embeds"})` runs after each step; its return value is
  not applied.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch

from .family_pipeline import DEFAULT_SIZE, FamilyPipeline
from .pipeline_parts import check_callback_inputs, check_sampling, full_batch, solver_grid, step_callback
from .sampling.schedule import POWER_RHO, POWER_SHIFT

# diffusers' limit on max_sequence_length.
MAX_SEQUENCE_LENGTH = 512


def diffusers_cfg_trunc(cfg_trunc_ratio: float, grid: torch.Tensor) -> float:
    """The original-style cfg_trunc (a time) that guides exactly the steps diffusers' cfg_trunc_ratio guides on this
    grid: steps i with (i + 1)/N <= ratio, i.e. the first m, so everything evaluated before grid[m] (1.0: all)."""
    n = len(grid) - 1
    m = sum(1 for i in range(n) if not (i + 1) / n > cfg_trunc_ratio)
    return 1.0 if m >= n else float(grid[m])


class Lumina2Pipeline(FamilyPipeline):
    """Lumina-Image-2.0 text to image: `pipe(prompt).images[0]`, diffusers' Lumina2Pipeline's call on the faithful
    core.

    transformer: the Unified Next-DiT; text_encoder: a Gemma2TextEncoder; vae: the FLUX AE (diffusers'
    AutoencoderKL).
    """

    family_name = "lumina2"

    @classmethod
    def from_single_file(cls, path, *, torch_dtype: torch.dtype = torch.bfloat16, device="cpu"):
        """Load ComfyUI's all-in-one lumina_2.safetensors: the DiT, Gemma-2-2B with its tokenizer and the FLUX AE
        (read when an image is first decoded), each from its part of the file."""
        return cls.from_files(dit=path, text_encoder=path, vae=path, torch_dtype=torch_dtype, device=device)

    def _encode(self, texts: list, max_tokens: Optional[int] = None, system_prompt: Optional[str] = None):
        return super()._encode(texts, max_tokens, system_prompt=system_prompt)

    def _encode_negatives(self, texts: list, max_tokens: Optional[int] = None, **options):
        return super()._encode(texts, max_tokens, system_prompt="empty")

    def encode_prompt(self, prompt, do_classifier_free_guidance: bool = True, negative_prompt=None,
                      num_images_per_prompt: int = 1, device=None, prompt_embeds=None, negative_prompt_embeds=None,
                      prompt_attention_mask=None, negative_prompt_attention_mask=None,
                      system_prompt: Optional[str] = None, max_sequence_length: int = 256):
        """(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask), as
        diffusers' encode_prompt: float32 features [N, L, 2304] (the system prompt in front of each prompt) and bool
        masks [N, L], N = prompts x num_images_per_prompt, on `device` (default the CPU); the negatives (without
        system prompt) are None without guidance. Pass them to the call to skip the text encoder."""
        _check_length(max_sequence_length)
        out = self._call_text(prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                              negative_prompt_attention_mask, guided=do_classifier_free_guidance,
                              per_prompt=num_images_per_prompt, max_tokens=max_sequence_length,
                              options={"system_prompt": system_prompt})
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
        attention_kwargs: Optional[dict[str, Any]] = None,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        system_prompt: Optional[str] = None,
        cfg_trunc_ratio: float = 1.0,
        cfg_normalization: bool = True,
        max_sequence_length: int = 256,
        *,
        seed: Optional[int] = None,
        solver: str = "euler",
        shift: Optional[float] = None,
        cfg_trunc: Optional[float] = None,
        renorm_cfg: Optional[float] = None,
        grid: str = "lumina",
        grid_shift: float = POWER_SHIFT,
        grid_rho: float = POWER_RHO,
        batch_cfg: bool = True,
    ):
        """Generate images; returns LuminaPipelineOutput(images=...) (a 1-tuple with return_dict=False).

        diffusers' arguments mean what they mean there; the pack's, keyword only: seed (the Lumina Sampler node's
        noise for that seed; image i gets the same noise in any batch), solver, shift (default 6.0), cfg_trunc and
        renorm_cfg (the original's truncation and renormalisation, instead of cfg_trunc_ratio and
        cfg_normalization): see the module docstring. attention_kwargs (diffusers' options of its attention
        processors) must be None or empty: LoRA strength is load_lora_weights(path, strength).

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
        _check_length(max_sequence_length)
        if attention_kwargs:
            raise ValueError(f"attention_kwargs {sorted(attention_kwargs)}: diffusers' attention-processor options "
                             f"have no counterpart here (a LoRA's strength: pipe.load_lora_weights(path, strength))")
        if cfg_trunc is not None and cfg_trunc_ratio != 1.0:
            raise ValueError("give cfg_trunc_ratio (diffusers': a fraction of the steps) or cfg_trunc (the "
                             "original's: a time), not both")
        shift = self.family.defaults.shift if shift is None else shift
        ts = solver_grid(solver, num_inference_steps, shift, sigmas, grid, grid_shift, grid_rho)

        guided = guidance_scale > 1.0
        feats, mask, nf, nm = self._call_text(
            prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
            negative_prompt_attention_mask, guided=guided, per_prompt=num_images_per_prompt,
            max_tokens=max_sequence_length, options={"system_prompt": system_prompt})
        noise = self._noise(prompt, prompt_embeds, num_images_per_prompt, height, width, generator, seed, latents)
        settings = {
            "steps": len(ts) - 1, "cfg": guidance_scale if guided else 1.0, "shift": shift, "solver": solver,
            "cfg_trunc": diffusers_cfg_trunc(cfg_trunc_ratio, ts) if cfg_trunc is None else cfg_trunc,
            "renorm_cfg": 0.0 if renorm_cfg is None else renorm_cfg,
            "cfg_normalization": renorm_cfg is None and bool(cfg_normalization),
        }
        if sigmas is not None or grid != "lumina":
            settings["times"] = ts
        settings["batch_cfg"] = batch_cfg
        out = self._sample(noise, (feats, mask), (nf, nm) if guided else None, n_steps=len(ts) - 1,
                           on_step=step_callback(self, callback_on_step_end, names, ts, feats), **settings)
        return self._output(out, output_type, return_dict)


def _check_length(max_sequence_length) -> None:
    if not isinstance(max_sequence_length, int) or not 8 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be an int from 8 to {MAX_SEQUENCE_LENGTH} (a multiple of 8: "
                         f"prompts are padded to multiples of 8), got {max_sequence_length!r}")
