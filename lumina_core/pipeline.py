"""`LuminaT2IPipeline`: Lumina-T2I text to image from a Python script, called the way diffusers pipelines are.

diffusers never merged a Lumina-T2I pipeline; this one puts the core's parts together (the LLaMA text encoder, the
Flag-DiT, the sampler of `lumina_core.sampling`, and the SDXL VAE through diffusers' AutoencoderKL, see `vae.py`)
with the call signature of the diffusers text-to-image pipelines: prompts or precomputed embeddings in, PIL images
out. Sampling is exactly the Lumina Sampler node's, so a seed gives the same latent as in ComfyUI.

Files are only read from local paths; nothing is downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .family_pipeline import FamilyPipeline
from .generation import sample
from .image.latent import LATENT_CHANNELS, to_vae_space
from .image.vae import decode, to_pil
from .models.flag_dit import EXTRAPOLATIONS
from .pipeline_parts import (  # noqa: F401  (size_error: the generate command's check)
    MIN_SIZE,
    OUTPUT_TYPES,
    PIXEL_MULTIPLE,
    VAE_FACTOR,
    LuminaT2IPipelineOutput,
    _as_list,
    _TextPreparedCall,
    size_error,
    text_inputs,
    unwrap,
)
from .sampling.guidance import GUIDANCE_MODES
from .sampling.schedule import GRIDS, POWER_RHO, POWER_SHIFT, make_noise, time_grid
from .sampling.solvers import SOLVERS
from .text.hf_folder import check_cap_feat_dim
from .text.llama import LlamaTextEncoder
from .weights.dit_files import load_flag_dit

logger = logging.getLogger(__name__)

# Names of the model files in a from_pretrained folder.
PRETRAINED_LAYOUT = "transformer/<one .safetensors or .pth>, text_encoder/<LLaMA-2-7B folder>, vae/<one .safetensors>"


class LuminaT2IPipeline(FamilyPipeline):
    """Lumina-T2I text to image: `pipe(prompt).images[0]`.

    transformer: the Flag-DiT (replace it by `torch.compile(pipe.transformer)` to compile it); text_encoder: a
    LlamaTextEncoder (None if only precomputed embeddings are used); vae: diffusers' AutoencoderKL, or loaded on
    first decode from `vae_path` (None: only output_type="latent"). Devices, offload, attention slicing and LoRA are
    the family-generic pipeline's.
    """

    family_name = "lumina_t2i"

    # ----------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_files(cls, dit, text_encoder=None, vae=None, *, torch_dtype: torch.dtype = torch.bfloat16,
                   device="cpu") -> "LuminaT2IPipeline":
        """Load from local files: dit, a Flag-DiT checkpoint (e.g. lumina_t2i_5b_bf16.safetensors); text_encoder,
        the LLaMA-2-7B Hugging Face folder; vae, sdxl_vae.safetensors (read when an image is first decoded).

        The VAE is kept in float32 when torch_dtype is float16 (the SDXL VAE overflows in fp16).
        """
        encoder = None
        if text_encoder is not None:
            encoder = LlamaTextEncoder.from_folder(text_encoder, dtype=torch_dtype, device=device)
        dit_model = load_flag_dit(dit, dtype=torch_dtype, device=device)
        if encoder is not None:
            check_cap_feat_dim(encoder.hidden_size, dit_model.config.cap_feat_dim, encoder_name=str(text_encoder),
                               dit_name=str(dit))
        if vae is not None and not Path(vae).is_file():
            raise FileNotFoundError(f"VAE file {vae} does not exist: give the path of sdxl_vae.safetensors")
        vae_dtype = torch.float32 if torch_dtype == torch.float16 else torch_dtype
        pipe = cls(dit_model, encoder, vae_path=vae, vae_dtype=vae_dtype)
        pipe._device = torch.device(device)
        return pipe

    @classmethod
    def from_pretrained(cls, folder, *, torch_dtype: torch.dtype = torch.bfloat16, device="cpu"):
        """Load from one local folder laid out as transformer/ (the Flag-DiT file), text_encoder/ (the LLaMA-2-7B
        folder) and vae/ (sdxl_vae.safetensors; optional)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; expected {PRETRAINED_LAYOUT}")

        def one_file(sub: str, suffixes, required: bool):
            found = sorted(p for p in (folder / sub).glob("*") if p.suffix in suffixes) if (folder / sub).is_dir() else []
            if len(found) == 1:
                return found[0]
            if not found and not required:
                return None
            what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
            raise FileNotFoundError(f"{folder / sub} holds {what} {'/'.join(suffixes)} files; expected exactly one. "
                                    f"Layout: {PRETRAINED_LAYOUT}")

        dit = one_file("transformer", (".safetensors", ".pth", ".pt", ".ckpt"), True)
        vae = one_file("vae", (".safetensors",), False)
        te = folder / "text_encoder"
        if not te.is_dir():
            raise FileNotFoundError(f"{te} is missing; expected {PRETRAINED_LAYOUT}")
        return cls.from_files(dit=dit, text_encoder=te, vae=vae, torch_dtype=torch_dtype, device=device)

    # ----------------------------------------------------------------------------------------------------------
    # Text

    def encode_prompt(self, prompt, negative_prompt=None, *, do_classifier_free_guidance: bool = True,
                      num_images_per_prompt: int = 1, max_tokens: Optional[int] = None):
        """(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask), float32
        features [N, L, D] and bool masks [N, L] on the CPU, N = prompts x num_images_per_prompt; the negatives are
        None without guidance. Save them and pass them to the call to skip the text encoder."""
        prompts = _as_list(prompt, "prompt")
        negatives = None
        if do_classifier_free_guidance:
            negatives = _as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            elif len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one negative "
                                 f"prompt, or one per prompt")
        feats, mask = self._encode(prompts, max_tokens)
        neg = None if negatives is None else self._encode(negatives, max_tokens)
        k = int(num_images_per_prompt)
        feats, mask = feats.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        if neg is None:
            return feats, mask, None, None
        return feats, mask, neg[0].repeat_interleave(k, 0), neg[1].repeat_interleave(k, 0)

    def _encode(self, texts: list, max_tokens: Optional[int] = None):
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder (loaded without text_encoder=): pass prompt_embeds "
                             "and prompt_attention_mask, and negative_prompt_embeds with their mask when "
                             "guidance_scale != 1")
        with self._on_device(self.text_encoder):
            return self.text_encoder.encode(texts, max_tokens=max_tokens)

    # ----------------------------------------------------------------------------------------------------------
    # Generation

    def prepare_latents(self, batch: int, height: int, width: int, *, generator=None, seed=None, latents=None):
        """Initial noise [batch, 4, height/8, width/8], float32 on the CPU: the given latents; one draw per image
        from a list of generators; one draw for the batch from one generator; or, with seed, the nodes' noise
        (make_noise: image i gets the same noise in any batch size)."""
        shape = (batch, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR)
        if latents is not None:
            if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(f"latents have shape {got}, expected {shape} (batch, 4, height/8, width/8)")
            return latents.detach().float().cpu()
        if seed is not None:
            return make_noise(seed, shape)
        if isinstance(generator, (list, tuple)):
            draws = [torch.randn((1,) + shape[1:], generator=g, device=g.device, dtype=torch.float32)
                     for g in generator]
            return torch.cat(draws).cpu()
        if generator is not None:
            return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).cpu()
        return torch.randn(shape, dtype=torch.float32)

    def __call__(
        self,
        prompt: Union[str, Sequence[str], None] = None,
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 4.0,
        height: int = 1024,
        width: int = 1024,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        seed: Optional[int] = None,
        solver: str = "euler",
        shift: float = 4.0,
        extrapolation: str = "t2i",
        guidance: str = "faithful",
        callback_on_step_end: Optional[Callable] = None,
        return_dict: bool = True,
        grid: str = "lumina",
        grid_shift: float = POWER_SHIFT,
        grid_rho: float = POWER_RHO,
        batch_cfg: bool = True,
    ):
        """Generate images; returns LuminaT2IPipelineOutput(images=...) (a 1-tuple with return_dict=False).

        num_inference_steps counts solver steps, as the Lumina Sampler node (the original demo's 30 grid points are
        29 steps). guidance_scale 1.0 skips the negative prompt. A list of prompts is generated as one batch,
        num_images_per_prompt images each (consecutive). Noise: `latents` if given, else one draw per image from a
        list of generators (one per image), one draw from a single generator, the nodes' noise for `seed`, or
        torch's global generator. callback_on_step_end(pipe, step, t, {"latents": x, "denoised": x1}) runs after
        each step (x in model space); its return value is not used, and raising from it stops the generation.
        grid, grid_shift, grid_rho: the solver grid, as the Lumina Sampler's: "lumina" (the shifted grid at `shift`)
        or "power" (sigma_i = shift_s((1 - i/N)^rho) with s = grid_shift, rho = grid_rho); with a multistep solver
        the few-step settings of the README's "Few-step sampling", e.g. solver="ab3", grid="power".
        batch_cfg: False runs the negative prompt as its own evaluation (`lumina_core.sample`): less memory, more
        time.
        """
        dit = unwrap(self.transformer)
        cap = dit.config.cap_feat_dim
        problem = size_error(width, height)
        if problem:
            raise ValueError(f"{problem} (got width={width}, height={height})")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")
        for name, value, choices in (("solver", solver, SOLVERS), ("extrapolation", extrapolation, EXTRAPOLATIONS),
                                     ("guidance", guidance, GUIDANCE_MODES), ("grid", grid, GRIDS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if seed is not None and generator is not None:
            raise ValueError("give either seed or generator, not both")
        n_steps = len(time_grid(num_inference_steps, shift)) - 1  # validates steps and shift
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        if output_type != "latent" and self._vae is None and self._vae_path is None:
            raise ValueError('this pipeline has no VAE: load it with vae="sdxl_vae.safetensors" or use '
                             'output_type="latent"')

        if prompt is not None:
            n_prompts = len(_as_list(prompt, "prompt"))
        elif torch.is_tensor(prompt_embeds):
            n_prompts = prompt_embeds.shape[0]
        else:
            n_prompts = 1
        batch = n_prompts * num_images_per_prompt
        if isinstance(generator, (list, tuple)) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images ({n_prompts} prompts x "
                             f"{num_images_per_prompt} images per prompt): give one generator per image, or one "
                             f"for the whole batch")
        noise = self.prepare_latents(batch, height, width, generator=generator, seed=seed, latents=latents)

        guided = guidance_scale != 1.0
        feats, mask, nfeats, nmask = text_inputs(self,
            prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
            negative_prompt_attention_mask, guided, num_images_per_prompt, cap)
        if self.text_encoder is not None:
            check_cap_feat_dim(feats.shape[-1], cap, encoder_name=self.text_encoder.folder)

        device = self.device
        with self._on_device(self.transformer), self._progress(n_steps) as bar:

            def on_step(info):
                if bar is not None:
                    bar.update(info["step"] + 1 - bar.n)
                if callback_on_step_end is not None:
                    callback_on_step_end(self, info["step"], info["t"], {"latents": info["x"],
                                                                         "denoised": info["denoised"]})

            samples = sample(
                _TextPreparedCall(self.transformer), noise.to(device), (feats, mask),
                (nfeats, nmask) if guided else None, steps=num_inference_steps, cfg=guidance_scale, shift=shift,
                solver=solver, extrapolation=extrapolation, guidance=guidance, callback=on_step, grid=grid,
                grid_shift=grid_shift, grid_rho=grid_rho, batch_cfg=batch_cfg,
            )
        raw = to_vae_space(samples.float()).cpu()
        if output_type == "latent":
            images = raw
        else:
            vae = self.vae
            with self._on_device(vae):
                pixels = decode(vae, raw)
            images = pixels if output_type == "pt" else to_pil(pixels)
        return LuminaT2IPipelineOutput(images=images) if return_dict else (images,)

    def decode_latents(self, raw_latents: torch.Tensor, output_type: str = "pil"):
        """Raw SDXL-VAE latents (output_type="latent"'s images) -> PIL images or a [B, 3, H, W] tensor in [0, 1]."""
        vae = self.vae
        if vae is None:
            raise ValueError('this pipeline has no VAE: load it with vae="sdxl_vae.safetensors"')
        with self._on_device(vae):
            pixels = decode(vae, raw_latents)
        return pixels if output_type == "pt" else to_pil(pixels)
