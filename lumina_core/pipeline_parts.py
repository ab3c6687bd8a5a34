"""The small parts of the script pipelines: the output type, the input checks, the wrapper that lets a compiled
transformer run with the text prepared once per generation, and the sampling arguments and step callbacks of a
call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .models.flag_dit import FlagDiT
from .models.next_dit import decide_rope_factors
from .sampling.schedule import GRIDS, POWER_RHO, POWER_SHIFT, sampling_grid
from .sampling.solvers import SOLVERS

OUTPUT_TYPES = ("pil", "pt", "latent")
PIXEL_MULTIPLE = 16  # VAE factor 8 x patch size 2
MIN_SIZE = 32
VAE_FACTOR = 8


@dataclass
class LuminaT2IPipelineOutput:
    """images: PIL images ("pil"), a float tensor [B, 3, H, W] in [0, 1] ("pt"), or raw SDXL-VAE latents
    [B, 4, H/8, W/8] ("latent", what VAE decode and ComfyUI's LATENT take)."""

    images: Union[list, torch.Tensor]


class _TextPreparedCall:
    """What `sample()` drives each step: the text work once through the bare model, and each step through the
    transformer's own call with the prepared text. A `torch.compile`d module forwards attribute look-ups such as
    `forward_with_text` to the eager model, so calling those directly would skip the compiled code; its `__call__`
    is the compiled one. Lumina-Next's time-aware RoPE switch is decided here, outside the module, so that a
    compiled forward never reads t."""

    def __init__(self, transformer, dit_class=FlagDiT, what: str = "a Lumina-T2I FlagDiT"):
        self.call = transformer
        self.model = unwrap(transformer, dit_class, what)
        self.family = self.model.family  # the sampler takes the family's defaults from it
        if hasattr(self.model, "prepare_regions"):
            self.prepare_regions = self.model.prepare_regions

    def prepare_text(self, cap_feats, cap_mask):
        return self.model.prepare_text(cap_feats, cap_mask)

    def forward_with_text(self, x, t, text, **kwargs):
        if "scale_factor" in kwargs:  # the same decision the forward makes, from the first sample's t
            kwargs = decide_rope_factors(kwargs, float(t.reshape(-1)[0]))
        return self.call(x, t, text=text, **kwargs)


def unwrap(transformer, dit_class=FlagDiT, what: str = "a Lumina-T2I FlagDiT"):
    """The DiT under a torch.compile wrapper (OptimizedModule keeps it as `_orig_mod`), or the model itself; it must
    be a `dit_class` (`what` names it in the error)."""
    model = getattr(transformer, "_orig_mod", transformer)
    if not isinstance(model, dit_class):
        raise TypeError(f"pipe.transformer is a {type(model).__name__}, expected {what} (or torch.compile of one)")
    return model


def size_error(width, height, title: str = "Lumina-T2I") -> Optional[str]:
    """None for a valid image size, else a message with the nearest valid sizes (`title`: the model family's)."""
    problems = []
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} {value!r} is not an int")
        elif value < MIN_SIZE:
            problems.append(f"{name} {value} is below the minimum {MIN_SIZE}")
        elif value % PIXEL_MULTIPLE:
            low = max(PIXEL_MULTIPLE, value // PIXEL_MULTIPLE * PIXEL_MULTIPLE)
            problems.append(f"{name} {value} is not a multiple of {PIXEL_MULTIPLE} (use {low} or {low + PIXEL_MULTIPLE})")
    if not problems:
        return None
    return f"{title} image sizes must be multiples of 16 pixels, at least 32: " + "; ".join(problems)


def _as_list(value, name: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def _check_embeds(embeds, mask, which: str, cap_feat_dim: int, expects: str = "this Flag-DiT expects",
                  features: str = "LLaMA"):
    mask_name = which.replace("embeds", "attention_mask")
    if mask is None:
        raise ValueError(
            f"{which} given without {mask_name}: pass the mask that came with the embeddings (pipe.encode_prompt "
            f"returns both); padding tokens must not be read as text"
        )
    if not torch.is_tensor(embeds) or embeds.ndim != 3:
        shape = tuple(embeds.shape) if torch.is_tensor(embeds) else type(embeds).__name__
        raise ValueError(f"{which} must be a tensor [batch, tokens, {cap_feat_dim}], got {shape}")
    if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(embeds.shape[:2]):
        shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
        raise ValueError(f"{mask_name} has shape {shape} but {which} has shape {tuple(embeds.shape)}: they must "
                         f"match in batch and tokens ({tuple(embeds.shape[:2])})")
    if embeds.shape[-1] != cap_feat_dim:
        raise ValueError(f"{which} are {embeds.shape[-1]}-wide; {expects} {cap_feat_dim}-wide {features} "
                         f"features (its cap_feat_dim)")
    if not bool(mask.bool().any(dim=1).all()):
        raise ValueError(f"{mask_name} has a row without any real token (BOS and EOS count)")
    return embeds.float(), mask.bool()


def text_inputs(pipe, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                negative_prompt_attention_mask, guided: bool, per_prompt: int, cap: int):
    """(features, mask, negative features, negative mask) of a pipeline call, from prompts or embeddings."""
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("give either prompt or prompt_embeds, not both")
    if prompt is None and prompt_embeds is None:
        raise ValueError("give a prompt (or a list of prompts), or prompt_embeds with prompt_attention_mask")
    if prompt is not None:
        prompts = _as_list(prompt, "prompt")
        if negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds need prompt_embeds: pass both, or text prompts only")
        feats, mask, nf, nm = pipe.encode_prompt(prompts, negative_prompt, do_classifier_free_guidance=guided,
                                                 num_images_per_prompt=per_prompt)
        return feats, mask, nf, nm
    feats, mask = _check_embeds(prompt_embeds, prompt_attention_mask, "prompt_embeds", cap)
    feats, mask = feats.repeat_interleave(per_prompt, 0), mask.repeat_interleave(per_prompt, 0)
    if not guided:
        return feats, mask, None, None
    if negative_prompt_embeds is None:
        if negative_prompt_attention_mask is not None:
            raise ValueError("negative_prompt_attention_mask given without negative_prompt_embeds")
        negatives = _as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
        if len(negatives) not in (1, prompt_embeds.shape[0]):
            raise ValueError(f"{len(negatives)} negative prompts for {prompt_embeds.shape[0]} prompt embeddings: "
                             f"give one negative prompt, or one per embedding")
        nf, nm = pipe._encode(negatives)
        if nf.shape[0] != 1:
            nf, nm = nf.repeat_interleave(per_prompt, 0), nm.repeat_interleave(per_prompt, 0)
        return feats, mask, nf, nm
    nf, nm = _check_embeds(negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt_embeds", cap)
    if nf.shape[0] not in (1, prompt_embeds.shape[0]):
        raise ValueError(f"negative_prompt_embeds have batch {nf.shape[0]} for {prompt_embeds.shape[0]} prompt "
                         f"embeddings: give 1 or {prompt_embeds.shape[0]}")
    if nf.shape[0] != 1:
        nf, nm = nf.repeat_interleave(per_prompt, 0), nm.repeat_interleave(per_prompt, 0)
    return feats, mask, nf, nm


# --------------------------------------------------------------------------------------------------------------
# The sampling arguments and callbacks of the Lumina-Next and Lumina-Image-2.0 pipelines' calls


def sigmas_time_grid(sigmas: Sequence[float], shift: float) -> torch.Tensor:
    """The t grid (float32, increasing, ending at 1) of diffusers' custom `sigmas` (noise levels, decreasing from
    at most 1): each time-shifted as diffusers' FlowMatchEulerDiscreteScheduler does, s*sigma / (1 + (s-1)*sigma),
    then the final sigma 0 appended; t = 1 - sigma."""
    values = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if values.numel() < 1 or not bool(torch.isfinite(values).all()):
        raise ValueError(f"sigmas must be a non-empty sequence of finite numbers, got {sigmas!r}")
    if not (bool((values > 0).all()) and bool((values <= 1).all()) and bool((values[1:] < values[:-1]).all())):
        raise ValueError(f"sigmas must decrease from at most 1 and stay above 0 (the final 0 is appended), got "
                         f"{[round(float(v), 4) for v in values]}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    shifted = shift * values / (1 + (shift - 1) * values)
    return torch.cat([1.0 - shifted, torch.ones(1, dtype=torch.float64)]).to(torch.float32)


def check_callback_inputs(names, allowed=("latents", "prompt_embeds")) -> tuple:
    """The tensor names a diffusers-style callback_on_step_end asks for, checked against what the pipeline has."""
    names = tuple(names or ())
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not among {list(allowed)}")
    return names


def step_callback(pipe, callback, names, grid, prompt_embeds) -> Optional[Callable]:
    """`lumina_core.sample`'s per-step callback calling diffusers' callback_on_step_end(pipe, i, timestep, kwargs):
    timestep the step's start as diffusers' scheduler numbers it ((1 - t) * 1000, a float32 tensor), kwargs the
    named tensors (latents: the model-space latent after the step). Its return value is not applied: the core's
    solvers keep their own state."""
    if callback is None:
        return None
    ts = [float(t) for t in grid]

    def on_step(info):
        i = info["step"]
        timestep = torch.tensor((1.0 - ts[min(i, len(ts) - 1)]) * 1000.0, dtype=torch.float32)
        tensors = {"latents": info["x"], "prompt_embeds": prompt_embeds}
        callback(pipe, i, timestep, {n: tensors[n] for n in names})

    return on_step


def solver_grid(solver: str, steps: int, shift: float, sigmas: Optional[Sequence[float]], grid: str = "lumina",
                grid_shift: float = POWER_SHIFT, grid_rho: float = POWER_RHO) -> torch.Tensor:
    """The t grid of a call: diffusers' custom sigmas, or the solver grid `grid` ("lumina": the solver's own at
    `shift`; "power": `schedule.power_time_grid` with grid_shift and grid_rho)."""
    if sigmas is not None:
        return sigmas_time_grid(sigmas, shift)
    return sampling_grid(solver, steps, shift, 1.0, grid, grid_shift, grid_rho)


def check_sampling(solver: str, num_inference_steps, sigmas, grid: str = "lumina") -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if grid not in GRIDS:
        raise ValueError(f"unknown solver grid {grid!r}; choose one of {', '.join(GRIDS)}")
    if sigmas is not None and grid != "lumina":
        raise ValueError(f"give sigmas or grid={grid!r}, not both: custom sigmas are the whole grid")
    if sigmas is None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")


def full_batch(text, device=None):
    """encode_prompt's result as diffusers returns it: the negatives as many rows as the prompts, on `device`."""
    feats, mask, nf, nm = text
    if nf is not None and nf.shape[0] != feats.shape[0]:
        nf, nm = nf.expand(feats.shape[0], -1, -1).clone(), nm.expand(feats.shape[0], -1).clone()
    if device is not None:
        feats, mask = feats.to(device), mask.to(device)
        nf, nm = (None, None) if nf is None else (nf.to(device), nm.to(device))
    return feats, mask, nf, nm
