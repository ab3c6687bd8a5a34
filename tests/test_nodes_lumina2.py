"""Lumina-Image-2.0 in the nodes (plain Python): the DiT file lists (split files, sharded diffusers folders, ComfyUI's
all-in-one checkpoints), the loader's MODEL, ComfyUI's calling convention and the latent channels."""

from __future__ import annotations

import pytest
import torch

from lumina_core.models.unified_next_dit import UnifiedNextDiT
from nodes import NODE_CLASS_MAPPINGS as N
from nodes import comfy_model, model_files
from nodes.flow_model import ComfyUnifiedNextDiT, comfy_dit_class, make_step
from nodes.latent import latent_for_family
from tests.helpers_lumina2 import write_dit
from tests.reference_lumina2 import TINY, random_state_dict, reference_forward

SPLIT_NAME = "lumina_2_model_bf16.safetensors"
ALL_IN_ONE_NAME = "lumina_2.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    dit_dir, ckpt_dir = root / "diffusion_models", root / "checkpoints"
    write_dit(dit_dir / "split", "comfy_bf16").rename(dit_dir / SPLIT_NAME)
    write_dit(dit_dir / "Lumina-Image-2.0", "diffusers_sharded")
    write_dit(ckpt_dir / "aio", "comfy_all_in_one").rename(ckpt_dir / ALL_IN_ONE_NAME)
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(ckpt_dir / "sdxl.safetensors"))
    model_files.set_model_folders("diffusion_models", [dit_dir])
    model_files.set_model_folders("checkpoints", [ckpt_dir])
    return root


def test_dit_list_holds_split_sharded_and_all_in_one_files(models):
    names = N["LuminaDiTLoader"].INPUT_TYPES()["required"]["dit_name"][0]
    index = "Lumina-Image-2.0/transformer/diffusion_pytorch_model.safetensors.index.json"
    assert SPLIT_NAME in names and ALL_IN_ONE_NAME in names and index in names
    assert "sdxl.safetensors" not in names  # a checkpoint without a Lumina DiT
    assert not any("-of-0000" in n for n in names)  # shards appear once, as their index


@pytest.mark.parametrize("name", [SPLIT_NAME, ALL_IN_ONE_NAME,
                                  "Lumina-Image-2.0/transformer/diffusion_pytorch_model.safetensors.index.json"])
def test_every_listed_file_loads_as_a_lumina2_model(models, name):
    (model,) = N["LuminaDiTLoader"]().load(name, "fp32")
    dit = comfy_model.lumina_dit(model)
    assert isinstance(dit, UnifiedNextDiT) and dit.family == "lumina2"
    want = random_state_dict(TINY, 0)["layers.0.attention.qkv.weight"]
    if "index" not in name:
        want = want.to(torch.bfloat16).float()
    assert torch.equal(dit.state_dict()["layers.0.attention.qkv.weight"], want)


def test_comfy_forward_is_the_negated_velocity_at_t_equal_one_minus_sigma():
    from lumina_core import families

    assert comfy_dit_class(families.LUMINA_2) is ComfyUnifiedNextDiT
    from lumina_core.models.config import UnifiedNextDiTConfig

    model = ComfyUnifiedNextDiT(UnifiedNextDiTConfig.tiny())
    sd = random_state_dict(TINY, 2)
    model.load_state_dict(sd)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 6, generator=g)
    sigma = torch.tensor([0.7, 0.7])
    context = torch.randn(2, 5, TINY["cap_feat_dim"], generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    step = make_step(model, x, sigma, context, mask, {})
    out = model(x, sigma, context=context, attention_mask=mask, lumina_step=step)
    ref = reference_forward(sd, TINY, x, 1 - sigma, context, mask.bool(), dtype=torch.float64)
    assert ((out.double() + ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_empty_latent_is_widened_and_a_foreign_latent_refused():
    from lumina_core import families

    (latent,) = N["LuminaEmptyLatent"]().generate("1024x1024", 1024, 1024, 2)
    widened = latent_for_family(latent["samples"], families.LUMINA_2)
    assert widened.shape == (2, 16, 128, 128) and not widened.any()
    assert latent_for_family(latent["samples"], families.LUMINA_NEXT) is latent["samples"]
    sdxl = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"4 channels.*Lumina-Image-2.0.*16-channel.*ae\.safetensors"):
        latent_for_family(sdxl, families.LUMINA_2)
    with pytest.raises(ValueError, match=r"16 channels.*Lumina-Next.*4-channel.*sdxl_vae"):
        latent_for_family(torch.randn(1, 16, 8, 8), families.LUMINA_NEXT)


def test_faithful_guidance_is_the_familys_original():
    """3 of 4 SDXL channels guided for Lumina-T2I/Next; all 16 FLUX channels for Lumina-Image-2.0, as its
    original; the same rule on ComfyUI's denoised predictions."""
    from lumina_core.sampling.guidance import guide
    from nodes.flow_sampler import keep_conditional_channels

    g = torch.Generator().manual_seed(0)
    for channels in (4, 16):
        c, u = torch.randn(2, channels, 3, 3, generator=g), torch.randn(2, channels, 3, 3, generator=g)
        full = u + 4.0 * (c - u)
        out = guide(c, u, 4.0, "faithful")
        if channels == 16:
            assert torch.equal(out, full)
            assert torch.equal(keep_conditional_channels(full, c), full)
        else:
            assert torch.equal(out[:, :3], full[:, :3]) and torch.equal(out[:, 3:], c[:, 3:])
            assert torch.equal(keep_conditional_channels(full, c), out)
