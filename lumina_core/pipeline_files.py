"""Loading a script pipeline from local files: `from_files` (a DiT file, a text encoder, a VAE file) and
`from_pretrained` (a folder in diffusers' layout), mixed into every family's pipeline (`FamilyPipeline`), which
gives them `registry_entry` and its constructor. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from .families import checkpoint_family, load_text_encoder, text_encoder_family
from .image.latent import latent_format
from .text.hf_folder import check_cap_feat_dim
from .weights.tensor_io import DIFFUSERS_WEIGHTS, find_index

_DIT_SUFFIXES = (".safetensors", ".gguf", ".pth", ".pt", ".ckpt")


class PipelineFiles:
    """The loading classmethods of `FamilyPipeline` (a mixin: `cls` is the family's pipeline class)."""

    @classmethod
    def from_files(cls, dit, text_encoder=None, vae=None, *, torch_dtype: torch.dtype = torch.bfloat16,
                   device="cpu"):
        """Load from local files: dit, any file of the family's DiT that `load_dit` reads (safetensors in the
        original, ComfyUI or diffusers layout, a diffusers `transformer/` folder, .pth, fp8, GGUF); text_encoder,
        the family's text encoder (a Hugging Face folder, a diffusers `text_encoder/` folder, or ComfyUI's single
        file where the family has one); vae, the VAE file of the family's latent format (read when an image is first
        decoded).

        The VAE is kept in float32 when torch_dtype is float16 (the VAEs overflow in fp16).
        """
        family = cls.registry_entry()
        found = checkpoint_family(dit)
        if found.name != family.name:
            raise ValueError(f"{dit} holds a {found.title} {found.dit_title}; {cls.__name__} runs {family.title} "
                             f"({family.dit_title}): use the pipeline of {found.title}")
        encoder = None
        if text_encoder is not None:
            te_family = text_encoder_family(text_encoder)
            if te_family.name != family.name:
                raise ValueError(f"{text_encoder} holds {te_family.text_encoder_title}, the text encoder of "
                                 f"{te_family.title}; {family.title} needs {family.text_encoder_source}")
            encoder = load_text_encoder(text_encoder, dtype=torch_dtype, device=device)
        model = family.load_dit(dit, dtype=torch_dtype, device=device)
        if encoder is not None:
            check_cap_feat_dim(encoder.hidden_size, model.config.cap_feat_dim, encoder_name=str(text_encoder),
                               dit_name=str(dit))
        if vae is not None and not Path(vae).is_file():
            fmt = latent_format(family.latent_format)
            raise FileNotFoundError(f"VAE file {vae} does not exist: give the path of {fmt.vae}")
        vae_dtype = torch.float32 if torch_dtype == torch.float16 else torch_dtype
        pipe = cls(model, encoder, vae_path=vae, vae_dtype=vae_dtype)
        pipe._device = torch.device(device)
        return pipe

    @classmethod
    def from_pretrained(cls, folder, *, transformer=None, torch_dtype: torch.dtype = torch.bfloat16, device="cpu"):
        """Load a local folder in diffusers' layout: transformer/ (diffusers' sharded folder with its index json,
        or one DiT file), text_encoder/ (beside tokenizer/, as diffusers keeps them), vae/ (one .safetensors;
        optional). transformer: another DiT instead of transformer/: a file `load_dit` reads (a GGUF, say) or a
        loaded model."""
        folder = Path(folder)
        layout = ("transformer/ (diffusers' folder or one DiT file), text_encoder/ + tokenizer/, vae/ (one "
                  ".safetensors, optional)")
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder; expected {layout}")

        def files(sub: str, suffixes) -> list:
            where = folder / sub
            return sorted(p for p in where.iterdir() if p.suffix in suffixes) if where.is_dir() else []

        def one(sub: str, suffixes, found: list):
            if len(found) == 1:
                return found[0]
            what = "no" if not found else f"{len(found)} ({', '.join(p.name for p in found)})"
            raise FileNotFoundError(f"{folder / sub} holds {what} {'/'.join(suffixes)} files; expected exactly one. "
                                    f"Layout: {layout}")

        loaded = None
        if transformer is None:
            dit_dir = folder / "transformer"
            if dit_dir.is_dir() and (find_index(dit_dir) is not None or (dit_dir / DIFFUSERS_WEIGHTS).is_file()):
                dit = dit_dir
            else:
                dit = one("transformer", _DIT_SUFFIXES, files("transformer", _DIT_SUFFIXES))
        elif isinstance(transformer, torch.nn.Module):
            loaded, dit = transformer, None
        else:
            dit = Path(transformer)
        vae_files = files("vae", (".safetensors",))
        vae = one("vae", (".safetensors",), vae_files) if vae_files else None
        te = folder / "text_encoder"
        if not te.is_dir():
            raise FileNotFoundError(f"{te} is missing; expected {layout}")
        if loaded is None:
            return cls.from_files(dit=dit, text_encoder=te, vae=vae, torch_dtype=torch_dtype, device=device)
        pipe = cls(loaded, load_text_encoder(te, dtype=torch_dtype, device=device), vae_path=vae,
                   vae_dtype=torch.float32 if torch_dtype == torch.float16 else torch_dtype)
        pipe._dit()  # refuses a model of another family
        pipe._device = torch.device(device)
        return pipe
