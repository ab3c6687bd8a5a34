"""The VAEs outside ComfyUI, through diffusers' `AutoencoderKL` (optional: `pip install ".[pipeline]"`).

Lumina-T2I and Lumina-Next decode with the SDXL VAE (stabilityai/sdxl-vae), Lumina-Image-2.0 with the FLUX.1 AE
(`ae.safetensors`, 16 latent channels). Rather than a second implementation of these networks, the pipelines use
diffusers' well-kept one, imported only when an image is decoded. Both files are published in the original (LDM)
key layout; `AutoencoderKL.from_single_file` converts them, but it needs the model configuration, which it would
otherwise fetch from the Hugging Face hub. The configurations are therefore kept with this package
(`sdxl_vae_config/config.json`, `flux_ae_config/config.json`: the FLUX.1 AE's widths 128/256/512/512, 2 resnets per
level, no quant convolutions, scaling 0.3611 and shift 0.1159) and passed as a local folder, so loading never goes
online. A file whose shapes differ from the released VAE (the tests' tiny VAEs) gets that configuration with the
channel widths and block count read from its tensor shapes. ComfyUI's all-in-one checkpoints (lumina_2.safetensors)
keep the VAE under `vae.`: only those tensors are read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import time
from pathlib import Path

import torch

from ..weights.tensor_io import WeightsFileError, open_tensor_file
from .latent import LATENT_CHANNELS, latent_format

logger = logging.getLogger(__name__)

SDXL_VAE_CONFIG_DIR = Path(__file__).resolve().parent / "sdxl_vae_config"
FLUX_AE_CONFIG_DIR = Path(__file__).resolve().parent / "flux_ae_config"
# The packaged configuration of each latent format's VAE (lumina_core.image.latent.LATENT_FORMATS).
CONFIG_DIRS = {"sdxl": SDXL_VAE_CONFIG_DIR, "flux": FLUX_AE_CONFIG_DIR}
# Where ComfyUI's all-in-one checkpoints keep the VAE.
ALL_IN_ONE_PREFIX = "vae."
INSTALL_HINT = (
    'decoding images needs diffusers: pip install "comfyui-lumina[pipeline]" (from a clone: pip install ".[pipeline]", '
    'or pip install diffusers); output_type="latent" works without it'
)

# The first resnet of each encoder level, in the original (LDM) and the diffusers key layouts: its conv1 has the
# level's output channels, and the number of resnets per level is layers_per_block.
_LEVEL_KEYS = (
    re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight$"),
    re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv1\.weight$"),
)


class VAEError(WeightsFileError):
    """A VAE file that cannot be used, naming the file and what to use instead."""


def import_autoencoder_kl():
    """diffusers' AutoencoderKL, or an ImportError that says what to install."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return AutoencoderKL


def packaged_config(fmt: str = "sdxl") -> dict:
    """The released VAE's diffusers configuration for latent format `fmt` ("sdxl" or "flux"), kept with the
    package."""
    latent_format(fmt)  # names the known formats for an unknown one
    return json.loads((CONFIG_DIRS[fmt] / "config.json").read_text())


def sdxl_vae_config() -> dict:
    """The released SDXL VAE's diffusers configuration (kept with the package)."""
    return packaged_config("sdxl")


def flux_ae_config() -> dict:
    """The released FLUX.1 AE's diffusers configuration (kept with the package)."""
    return packaged_config("flux")


def _vae_prefix(keys) -> str:
    """"vae." for a ComfyUI all-in-one checkpoint (its VAE under that prefix), "" for a VAE file."""
    return ALL_IN_ONE_PREFIX if any(k.startswith(ALL_IN_ONE_PREFIX + "decoder.") for k in keys) else ""


def config_for_file(path, fmt: str = "sdxl") -> dict:
    """The packaged configuration of `fmt`'s VAE with the level widths and resnets per level of the file at `path`
    (read from the tensor shapes in its header), refusing files that are not a VAE of that latent format: a
    4-channel SDXL-style VAE for "sdxl", a 16-channel FLUX-style AE for "flux" (also inside an all-in-one file)."""
    path = Path(path)
    fmt_info = latent_format(fmt)
    src = open_tensor_file(path, VAEError)
    prefix = _vae_prefix(src.keys) if fmt != "sdxl" else ""
    widths, blocks = {}, {}
    for key in src.keys:
        if not key.startswith(prefix):
            continue
        for pattern in _LEVEL_KEYS:
            m = pattern.match(key[len(prefix):])
            if m:
                level, block = int(m.group(1)), int(m.group(2))
                blocks[level] = max(blocks.get(level, 0), block + 1)
                if block == 0:
                    widths[level] = int(src.shape(key)[0])
    if fmt == "sdxl":
        # post_quant_conv maps the latent channels; the FLUX AE has none, its decoder's conv_in reads them.
        channels_key = next((k for k in ("post_quant_conv.weight", "decoder.conv_in.weight") if k in src.keys), None)
        if not widths or channels_key is None:
            sample = ", ".join(src.keys[:3])
            raise VAEError(
                f"{path} is not a VAE in the SDXL layout (no encoder.down.*/post_quant_conv keys; first keys: "
                f"{sample}). Use sdxl_vae.safetensors from stabilityai/sdxl-vae."
            )
        shape = src.shape(channels_key)
        latent = int(shape[0] if channels_key.startswith("post_quant_conv") else shape[1])
        if latent != LATENT_CHANNELS or channels_key != "post_quant_conv.weight":
            raise VAEError(
                f"{path} is a VAE with {latent} latent channels; Lumina-T2I and Lumina-Next use the 4-channel SDXL "
                f"VAE (a 16-channel VAE is SD3's or Flux's; the FLUX AE is Lumina-Image-2.0's). Use "
                f"sdxl_vae.safetensors from stabilityai/sdxl-vae."
            )
    else:
        conv_in = prefix + "decoder.conv_in.weight"
        if not widths or conv_in not in src.keys:
            sample = ", ".join(src.keys[:3])
            raise VAEError(
                f"{path} is not a VAE in the FLUX AE layout (no encoder.down.*/decoder.conv_in keys; first keys: "
                f"{sample}). Use {fmt_info.vae}."
            )
        latent = int(src.shape(conv_in)[1])
        if latent != fmt_info.channels:
            raise VAEError(
                f"{path} is a VAE with {latent} latent channels; Lumina-Image-2.0 uses {fmt_info.vae} with "
                f"{fmt_info.channels} (a 4-channel VAE is the SDXL VAE of Lumina-T2I and Lumina-Next)."
            )
    config = packaged_config(fmt)
    levels = sorted(widths)
    config["block_out_channels"] = [widths[i] for i in levels]
    config["layers_per_block"] = blocks[levels[0]]
    config["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
    config["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
    return config


def load_sdxl_vae(path, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """An SDXL VAE as diffusers' AutoencoderKL from a single .safetensors file (either key layout), offline."""
    return load_vae(path, "sdxl", dtype=dtype, device=device)


def load_vae(path, fmt: str = "sdxl", *, dtype: torch.dtype = torch.float32, device="cpu"):
    """The VAE of latent format `fmt` as diffusers' AutoencoderKL, offline: "sdxl" from sdxl_vae.safetensors,
    "flux" from the FLUX.1 AE's ae.safetensors or the `vae.` part of ComfyUI's all-in-one lumina_2.safetensors
    (either key layout)."""
    AutoencoderKL = import_autoencoder_kl()
    path = Path(path)
    what = latent_format(fmt).vae
    if not path.is_file():
        state = "a folder" if path.is_dir() else "missing"
        raise VAEError(f"VAE {path} is {state}: give the file of {what}")
    if path.suffix != ".safetensors":
        raise VAEError(f"VAE {path}: expected a .safetensors file, {what}; got {path.suffix!r}")
    start = time.perf_counter()
    config = config_for_file(path, fmt)
    source = str(path)
    src = open_tensor_file(path, VAEError)
    prefix = _vae_prefix(src.keys) if fmt != "sdxl" else ""
    if prefix:  # only the VAE's tensors of an all-in-one checkpoint, read one by one
        source = {k[len(prefix):]: src.get(k) for k in src.keys if k.startswith(prefix)}
    with tempfile.TemporaryDirectory(prefix="lumina_vae_config_") as tmp:
        folder = CONFIG_DIRS[fmt]
        if config != packaged_config(fmt):
            folder = Path(tmp)
            (folder / "config.json").write_text(json.dumps(config))
        # diffusers warns that "modules ... should be kept in float32: []" when from_single_file casts a model that
        # keeps no module in float32: nothing to act on, so the warning is held back here.
        with _quiet("diffusers.models.modeling_utils"):
            vae = AutoencoderKL.from_single_file(source, config=str(folder), local_files_only=True,
                                                 torch_dtype=dtype)
    vae = vae.to(device=torch.device(device)).eval().requires_grad_(False)
    logger.info(
        "Loaded %s from %s: widths %s, %s on %s in %.1f s",
        "SDXL VAE" if fmt == "sdxl" else "FLUX AE",
        path,
        config["block_out_channels"],
        str(dtype).removeprefix("torch."),
        device,
        time.perf_counter() - start,
    )
    return vae


@contextlib.contextmanager
def _quiet(logger_name: str):
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def decode(vae, raw_latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B, C, h, w] (SDXL: model-space latent / 0.13025; FLUX: latent / 0.3611 + 0.1159) -> images
    [B, 3, 8h, 8w], float32 in [0, 1], on the CPU. Runs where the VAE's parameters are, in their dtype."""
    param = next(vae.parameters())
    with torch.no_grad():
        pixels = vae.decode(raw_latents.to(device=param.device, dtype=param.dtype)).sample
    return (pixels.float() / 2 + 0.5).clamp(0, 1).cpu()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] floats in [0, 1] -> [B, H, W, 3] uint8 (rounded to the nearest level)."""
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_pil(images: torch.Tensor) -> list:
    """[B, 3, H, W] floats in [0, 1] -> a list of RGB PIL images."""
    from PIL import Image

    return [Image.fromarray(img.numpy()) for img in to_uint8(images)]
