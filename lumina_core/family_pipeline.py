"""`FamilyPipeline`: what the script pipelines of every Lumina family share, the registry giving the rest.

A family's pipeline (`LuminaT2IPipeline`, `LuminaPipeline` for Lumina-Next, `Lumina2Pipeline` for Lumina-Image-2.0)
names its registry entry; from it come the DiT and text-encoder loaders, the latent format (channels, scale and
shift, which VAE decodes it and its packaged configuration) and the sampling defaults. Here: loading from local files
(`from_files`, `from_pretrained` of a diffusers folder: `pipeline_files`), devices and model CPU offload, attention slicing, LoRA, the
noise, the text of a call (prompts or precomputed embeddings), one generation through `lumina_core.sample` (exactly
the Lumina Sampler node's sampling) and the VAE decode through diffusers' AutoencoderKL (`image.vae`).

Files are only read from local paths; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from .families import Family, get_family
from .generation import sample
from .image.latent import LatentFormat, latent_format, to_vae_space
from .image.vae import decode, load_vae, to_pil
from .lora import apply_lora, remove_lora
from .pipeline_files import PipelineFiles
from .pipeline_parts import VAE_FACTOR, _as_list, _check_embeds, _TextPreparedCall, size_error, unwrap
from .sampling.schedule import make_noise

logger = logging.getLogger(__name__)

# Queries per attention chunk for enable_attention_slicing("auto"): a 1024x1024 image (4160 tokens) in 5 chunks.
AUTO_QUERY_CHUNK = 1024
# The diffusers pipelines' output types, and ours.
IMAGE_OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# diffusers' default image side (its transformers' sample_size 128 times the VAE factor 8).
DEFAULT_SIZE = 1024
# Files a diffusers `transformer/` or `vae/` folder may hold alone.


@dataclass
class LuminaPipelineOutput:
    """images: PIL images ("pil"), a float array [B, H, W, 3] in [0, 1] ("np"), a float tensor [B, 3, H, W] in
    [0, 1] ("pt"), or the model-space latents ("latent"; as diffusers returns them, before the VAE's scale and
    shift are undone)."""

    images: Union[list, torch.Tensor]


class FamilyPipeline(PipelineFiles):
    """The family-generic part of the script pipelines; a subclass sets `family_name` (a registry key).

    transformer: the family's DiT (replace it by `torch.compile(pipe.transformer)` to compile it); text_encoder: the
    family's text encoder (None if only precomputed embeddings are used); vae: diffusers' AutoencoderKL, or loaded on
    first decode from `vae_path` (None: only output_type="latent").
    """

    family_name = ""

    def __init__(self, transformer, text_encoder=None, vae=None, *, vae_path=None,
                 vae_dtype: torch.dtype = torch.float32):
        self.transformer = transformer
        self.text_encoder = text_encoder
        self._vae = vae
        self._vae_path = None if vae_path is None else Path(vae_path)
        self._vae_dtype = vae_dtype
        self._device = torch.device("cpu")
        self._offload_device: Optional[torch.device] = None
        self._progress_bar_config: dict = {}

    @classmethod
    def registry_entry(cls) -> Family:
        return get_family(cls.family_name)

    @property
    def family(self) -> Family:
        return self.registry_entry()

    @property
    def latent_format(self) -> LatentFormat:
        return latent_format(self.family.latent_format)

    def _dit(self):
        family = self.family
        return unwrap(self.transformer, family.dit_class(), f"a {family.title} {family.dit_title}")

    def _call_model(self) -> _TextPreparedCall:
        family = self.family
        return _TextPreparedCall(self.transformer, family.dit_class(), f"a {family.title} {family.dit_title}")

    @property
    def vae(self):
        """diffusers' AutoencoderKL, loaded from the VAE file on first use (diffusers is imported only then)."""
        return self.load_vae()

    def load_vae(self):
        """Load the VAE file now (else the first decode does), and return the VAE (None without a VAE file)."""
        if self._vae is None and self._vae_path is not None:
            self._vae = load_vae(self._vae_path, self.family.latent_format, dtype=self._vae_dtype,
                                 device=self._home_device)
        return self._vae

    @vae.setter
    def vae(self, value):
        self._vae = value

    @property
    def tokenizer(self):
        return None if self.text_encoder is None else self.text_encoder.tokenizer

    # ----------------------------------------------------------------------------------------------------------
    # Devices, offload, attention slicing, LoRA

    @property
    def device(self) -> torch.device:
        """Where the models run (the offload device once enable_model_cpu_offload is on)."""
        return self._offload_device if self._offload_device is not None else self._device

    @property
    def _home_device(self) -> torch.device:
        """Where the models rest between uses."""
        return torch.device("cpu") if self._offload_device is not None else self._device

    def _models(self):
        return [m for m in (self.text_encoder, self.transformer, self._vae) if m is not None]

    def to(self, device):
        """Move every model to `device` (this turns model CPU offload off)."""
        self._device = torch.device(device)
        self._offload_device = None
        for model in self._models():
            model.to(device=self._device)
        return self

    def enable_model_cpu_offload(self, gpu_id: Optional[int] = None, device=None) -> None:
        """Keep each model in CPU memory and move it to the GPU only while it runs (the text encoder while
        encoding, the transformer while sampling, the VAE while decoding), so the peak is the largest model, not
        their sum. Without a GPU everything runs on the CPU, as before."""
        if device is None:
            device = f"cuda:{gpu_id or 0}" if torch.cuda.is_available() else "cpu"
        self._offload_device = torch.device(device)
        for model in self._models():
            model.to(device=torch.device("cpu"))

    @contextlib.contextmanager
    def _on_device(self, model):
        """Run `model` on self.device; with offload on, move it there for the block and back to the CPU after."""
        if self._offload_device is None or model is None:
            yield
            return
        model.to(device=self._offload_device)
        try:
            yield
        finally:
            model.to(device=torch.device("cpu"))
            if self._offload_device.type == "cuda":
                torch.cuda.empty_cache()

    def enable_attention_slicing(self, slice_size: Union[str, int, None] = "auto") -> None:
        """Compute attention in chunks of `slice_size` queries ("auto": 1024); the result equals the unsliced one
        and the attention scores are held for one chunk at a time."""
        if slice_size == "auto":
            slice_size = AUTO_QUERY_CHUNK
        if slice_size is not None and (isinstance(slice_size, bool) or not isinstance(slice_size, int)
                                       or slice_size < 1):
            raise ValueError(f"slice_size must be 'auto', a positive int (queries per chunk) or None, got "
                             f"{slice_size!r}")
        self._dit().set_attention_slicing(slice_size)

    def disable_attention_slicing(self) -> None:
        self._dit().set_attention_slicing(None)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the tqdm progress bar on stderr (e.g. disable=True)."""
        self._progress_bar_config = dict(kwargs)

    def load_lora_weights(self, path, strength: float = 1.0, adapter_name: Optional[str] = None):
        """Apply a LoRA file (PEFT/diffusers, kohya or original names) to the transformer, on top of those loaded;
        returns the report (applied modules, unmatched keys). See lumina_core.lora."""
        return apply_lora(self._dit(), path, strength, name=adapter_name)

    def unload_lora_weights(self) -> None:
        """Remove every LoRA: the transformer's weights are the loaded ones again, bit for bit."""
        remove_lora(self._dit())

    @contextlib.contextmanager
    def _progress(self, total: int):
        config = {"total": total, "file": sys.stderr, "desc": self.family.title, "unit": "step",
                  **self._progress_bar_config}
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm comes with transformers; without it there is simply no bar
            yield None
            return
        bar = tqdm(**config)
        try:
            yield bar
        finally:
            bar.close()

    # ----------------------------------------------------------------------------------------------------------
    # Text

    def _encode(self, texts: list, max_tokens: Optional[int] = None, **options):
        """Features [N, L, D] (float32) and mask [N, L] (bool) of `texts`, on the CPU; options go to the encoder."""
        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder (loaded without text_encoder=): pass prompt_embeds "
                             "and prompt_attention_mask, and negative_prompt_embeds with their mask when "
                             "guidance_scale > 1")
        with self._on_device(self.text_encoder):
            return self.text_encoder.encode(texts, max_tokens=max_tokens, **options)

    def _encode_negatives(self, texts: list, max_tokens: Optional[int] = None, **options):
        """The negative prompts' features and mask (a family may encode them differently from the prompts)."""
        return self._encode(texts, max_tokens, **options)

    def _check_embeds(self, embeds, mask, which: str):
        family = self.family
        return _check_embeds(embeds, mask, which, self._dit().config.cap_feat_dim,
                             expects=f"this {family.dit_title} expects", features=family.text_encoder_title)

    def _call_text(self, prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                   negative_prompt_attention_mask, *, guided: bool, per_prompt: int, max_tokens=None,
                   options: Optional[dict] = None):
        """(features, mask, negative features, negative mask) of a call, from prompts or embeddings: [N*k, L, D]
        and [N*k, L] for N prompts and k = per_prompt images each; the negatives [1 or N*k, ...] (one negative for
        all is kept as one row), None without guidance."""
        options = options or {}
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("give either prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give a prompt (or a list of prompts), or prompt_embeds with prompt_attention_mask")
        if negative_prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("negative_prompt_embeds need prompt_embeds: pass both, or text prompts only")
            if negative_prompt is not None:
                raise ValueError("give either negative_prompt or negative_prompt_embeds, not both")
        if prompt is not None:
            feats, mask = self._encode(_as_list(prompt, "prompt"), max_tokens, **options)
        else:
            feats, mask = self._check_embeds(prompt_embeds, prompt_attention_mask, "prompt_embeds")
        n = feats.shape[0]
        feats, mask = feats.repeat_interleave(per_prompt, 0), mask.repeat_interleave(per_prompt, 0)
        if not guided:
            return feats, mask, None, None
        nf, nm = self._negative_text(negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask, n,
                                     max_tokens)
        if nf.shape[0] != 1:
            nf, nm = nf.repeat_interleave(per_prompt, 0), nm.repeat_interleave(per_prompt, 0)
        return feats, mask, nf, nm

    def _negative_text(self, negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask, n: int,
                       max_tokens=None):
        """The negative features and mask for n prompts: [1 or n, L, D] and [1 or n, L]."""
        if negative_prompt_embeds is None:
            if negative_prompt_attention_mask is not None:
                raise ValueError("negative_prompt_attention_mask given without negative_prompt_embeds")
            negatives = _as_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
            if len(negatives) not in (1, n):
                raise ValueError(f"{len(negatives)} negative prompts for {n} prompts: give one negative prompt, or "
                                 f"one per prompt")
            return self._encode_negatives(negatives, max_tokens)
        nf, nm = self._check_embeds(negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt_embeds")
        if nf.shape[0] not in (1, n):
            raise ValueError(f"negative_prompt_embeds have batch {nf.shape[0]} for {n} prompt embeddings: give 1 or "
                             f"{n}")
        return nf, nm

    # ----------------------------------------------------------------------------------------------------------
    # Generation

    def prepare_latents(self, batch: int, height: int, width: int, *, generator=None, seed=None, latents=None):
        """Initial noise [batch, channels, height/8, width/8] (the family's latent channels), float32 on the CPU:
        the given latents; one draw per image from a list of generators; one draw for the batch from one
        generator; or, with seed, the nodes' noise (make_noise: image i gets the same noise in any batch size)."""
        channels = self.latent_format.channels
        shape = (batch, channels, height // VAE_FACTOR, width // VAE_FACTOR)
        if latents is not None:
            if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(f"latents have shape {got}, expected {shape} (batch, {channels}, height/8, "
                                 f"width/8)")
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

    def _check_call(self, width, height, output_type, num_images_per_prompt, seed, generator, guidance_scale):
        problem = size_error(width, height, self.family.title)
        if problem:
            raise ValueError(f"{problem} (got width={width}, height={height})")
        if output_type not in IMAGE_OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r} is not one of {', '.join(IMAGE_OUTPUT_TYPES)}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if seed is not None and generator is not None:
            raise ValueError("give either seed or generator, not both")
        if not guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
        if output_type != "latent" and self._vae is None and self._vae_path is None:
            raise ValueError(f'this pipeline has no VAE: load it with vae= ({self.latent_format.vae}) or use '
                             f'output_type="latent"')

    def _noise(self, prompt, prompt_embeds, num_images_per_prompt, height, width, generator, seed, latents):
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
        return self.prepare_latents(batch, height, width, generator=generator, seed=seed, latents=latents)

    def _sample(self, noise: torch.Tensor, cond, uncond, *, n_steps: int, on_step: Optional[Callable] = None,
                regions: Optional[Sequence] = None, **settings) -> torch.Tensor:
        """Model-space latents (float32, CPU) of one generation through `lumina_core.sample`: the transformer on
        the run device for the sampling only, a progress bar of n_steps, on_step(info) after each step."""
        with self._on_device(self.transformer), self._progress(n_steps) as bar:

            def callback(info):
                if bar is not None:
                    bar.update(info["step"] + 1 - bar.n)
                if on_step is not None:
                    on_step(info)

            latents = sample(self._call_model(), noise.to(self.device), cond, uncond, regions=regions,
                             callback=callback, **settings)
        return latents.float().cpu()

    def _output(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        images = latents if output_type == "latent" else self.decode_latents(latents, output_type)
        return LuminaPipelineOutput(images=images) if return_dict else (images,)

    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil"):
        """Model-space latents (output_type="latent"'s images) -> PIL images, a [B, H, W, 3] float array ("np") or
        a [B, 3, H, W] tensor in [0, 1] ("pt"), through the family's VAE."""
        vae = self.vae
        if vae is None:
            raise ValueError(f"this pipeline has no VAE: load it with vae= ({self.latent_format.vae})")
        with self._on_device(vae):
            pixels = decode(vae, to_vae_space(latents.float(), self.family.latent_format))
        if output_type == "pt":
            return pixels
        if output_type == "np":
            return pixels.permute(0, 2, 3, 1).numpy()
        return to_pil(pixels)
