"""The SDXL VAE outside ComfyUI, through diffusers' `AutoencoderKL` (optional: `pip install ".[pipeline]"`).

Lumina-T2I decodes with the SDXL VAE (stabilityai/sdxl-vae). Rather than a second implementation of that network,
the pipeline uses diffusers' well-kept one, imported only when an image is decoded. `sdxl_vae.safetensors` is
published in the original (LDM) key layout; `AutoencoderKL.from_single_file` converts it, but it needs the model
configuration, which it would otherwise fetch from the Hugging Face hub. The SDXL VAE's configuration is therefore
kept with this package (`sdxl_vae_config/config.json`) and passed as a local folder, so loading never goes online.
A file whose shapes differ from the released VAE (the tests' tiny VAE) gets that configuration with the channel
widths and block count read from its tensor shapes.
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
from .latent import LATENT_CHANNELS

logger = logging.getLogger(__name__)

SDXL_VAE_CONFIG_DIR = Path(__file__).resolve().parent / "sdxl_vae_config"
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


def sdxl_vae_config() -> dict:
    """The released SDXL VAE's diffusers configuration (kept with the package)."""
    return json.loads((SDXL_VAE_CONFIG_DIR / "config.json").read_text())


def config_for_file(path) -> dict:
    """The SDXL VAE configuration with the level widths and resnets per level of the file at `path` (read from the
    tensor shapes in its header), refusing files that are not 4-channel SDXL-style VAEs."""
    path = Path(path)
    src = open_tensor_file(path, VAEError)
    widths, blocks = {}, {}
    for key in src.keys:
        for pattern in _LEVEL_KEYS:
            m = pattern.match(key)
            if m:
                level, block = int(m.group(1)), int(m.group(2))
                blocks[level] = max(blocks.get(level, 0), block + 1)
                if block == 0:
                    widths[level] = int(src.shape(key)[0])
    if not widths or "post_quant_conv.weight" not in src.keys:
        sample = ", ".join(src.keys[:3])
        raise VAEError(
            f"{path} is not a VAE in the SDXL layout (no encoder.down.*/post_quant_conv keys; first keys: {sample}). "
            f"Use sdxl_vae.safetensors from stabilityai/sdxl-vae."
        )
    latent = int(src.shape("post_quant_conv.weight")[0])
    if latent != LATENT_CHANNELS:
        raise VAEError(
            f"{path} is a VAE with {latent} latent channels; Lumina-T2I uses the 4-channel SDXL VAE "
            f"(a 16-channel VAE is SD3's or Flux's). Use sdxl_vae.safetensors from stabilityai/sdxl-vae."
        )
    config = sdxl_vae_config()
    levels = sorted(widths)
    config["block_out_channels"] = [widths[i] for i in levels]
    config["layers_per_block"] = blocks[levels[0]]
    config["down_block_types"] = ["DownEncoderBlock2D"] * len(levels)
    config["up_block_types"] = ["UpDecoderBlock2D"] * len(levels)
    return config


def load_sdxl_vae(path, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """An SDXL VAE as diffusers' AutoencoderKL from a single .safetensors file (either key layout), offline."""
    AutoencoderKL = import_autoencoder_kl()
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise VAEError(f"VAE {path} is {what}: give the sdxl_vae.safetensors file (from stabilityai/sdxl-vae)")
    if path.suffix != ".safetensors":
        raise VAEError(f"VAE {path}: expected a .safetensors file such as sdxl_vae.safetensors, got {path.suffix!r}")
    start = time.perf_counter()
    config = config_for_file(path)
    with tempfile.TemporaryDirectory(prefix="lumina_vae_config_") as tmp:
        folder = SDXL_VAE_CONFIG_DIR
        if config != sdxl_vae_config():
            folder = Path(tmp)
            (folder / "config.json").write_text(json.dumps(config))
        # diffusers warns that "modules ... should be kept in float32: []" when from_single_file casts a model that
        # keeps no module in float32 (the SDXL VAE): nothing to act on, so the warning is held back here.
        with _quiet("diffusers.models.modeling_utils"):
            vae = AutoencoderKL.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                 torch_dtype=dtype)
    vae = vae.to(device=torch.device(device)).eval().requires_grad_(False)
    logger.info(
        "Loaded SDXL VAE from %s: widths %s, %s on %s in %.1f s",
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
    """Raw SDXL-VAE latents [B, 4, h, w] (model-space latent / 0.13025) -> images [B, 3, 8h, 8w], float32 in [0, 1],
    on the CPU. Runs where the VAE's parameters are, in their dtype."""
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
