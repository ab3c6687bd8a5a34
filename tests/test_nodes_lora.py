"""Lumina LoRA Loader on plain Python (the MODEL is a PlainModel): files from models/loras, the LoRA applied to a copy
of the DiT, and the key map it hands ComfyUI (the form of ComfyUI's own `model_lora_keys_unet`: the MODEL's state-dict
key, or (key, (dim, first row, rows)) for a row block). The real ComfyUI runs it in
tests/integration/test_comfyui_lora.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lumina_core.lora import plan_lora
from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, model_files
from nodes.comfy_lora import comfy_key_map, model_family
from nodes.comfy_model import PlainModel
from tests.helpers_lora import identical, make_entries, make_model, merged, rel, run, snapshot, spell

NODE = NODE_CLASS_MAPPINGS["LuminaLoraLoader"]


@pytest.fixture
def loras(tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    model_files.set_model_folders("loras", [folder])
    return folder


def test_registered_under_its_display_name_and_lists_the_lora_folder(loras):
    (loras / "styles" / "a.safetensors").write_bytes(b"")
    (loras / "b.pt").write_bytes(b"")
    (loras / "notes.txt").write_text("not a LoRA")
    assert NODE_DISPLAY_NAME_MAPPINGS["LuminaLoraLoader"] == "Lumina LoRA Loader"
    required = NODE.INPUT_TYPES()["required"]
    assert list(required) == ["model", "lora_name", "strength_model"]
    assert required["lora_name"][0] == ["b.pt", "styles/a.safetensors"]
    assert NODE.RETURN_TYPES == ("MODEL",) and NODE.CATEGORY == "Lumina/loaders"


@pytest.mark.parametrize("family, fmt", [("lumina2", "peft"), ("lumina_next", "peft"), ("lumina_t2i", "kohya")])
def test_applies_a_lora_to_a_copy_of_the_models_dit(loras, family, fmt):
    dit = make_model(family)
    entries = make_entries(family, fmt, dit)
    save_file(spell(entries, family, fmt), str(loras / "styles" / "lora.safetensors"))
    model = PlainModel(dit)
    before = snapshot(dit)
    (out,) = NODE().load_lora(model, "styles/lora.safetensors", 0.75)
    assert out is not model and identical(snapshot(dit), before)  # the input MODEL is left as it is
    expected = run(merged(make_model(family), (entries, 0.75)), family)
    assert rel(run(out.model.diffusion_model, family), expected) < 1e-5
    (same,) = NODE().load_lora(model, "styles/lora.safetensors", 0.0)
    assert same is model


def test_a_lora_of_another_family_is_refused_naming_it(loras):
    save_file(spell(make_entries("lumina2", "peft", make_model("lumina2")), "lumina2", "peft"),
              str(loras / "l2.safetensors"))
    with pytest.raises(ValueError, match="LoRA for Lumina-Image-2.0 .* the model is Lumina-T2I"):
        NODE().load_lora(PlainModel(make_model("lumina_t2i")), "l2.safetensors", 1.0)


def test_missing_lora_names_the_folder(loras):
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        NODE().load_lora(PlainModel(make_model("lumina_t2i")), "gone.safetensors", 1.0)


def test_key_map_puts_diffusers_qkv_blocks_on_their_rows():
    """Lumina-Image-2.0 tiny: 4 query heads, 2 kv heads of 16 -> to_q rows 0:64, to_k 64:96, to_v 96:128 (SPEC.md §9
    at full size: 0:2304, 2304:3072, 3072:3840)."""
    dit = make_model("lumina2")
    entries = make_entries("lumina2", "peft", dit, modules=["layers.1.attention.qkv", "layers.0.feed_forward.w2"])
    shapes = {k: tuple(v.shape) for k, v in dit.state_dict().items() if v.ndim == 2}
    key_map = comfy_key_map(plan_lora(spell(entries, "lumina2", "peft"), shapes, "lumina2"))
    qkv = "diffusion_model.layers.1.attention.qkv.weight"
    assert key_map == {
        "transformer.layers.1.attn.to_q": (qkv, (0, 0, 64)),
        "transformer.layers.1.attn.to_k": (qkv, (0, 64, 32)),
        "transformer.layers.1.attn.to_v": (qkv, (0, 96, 32)),
        "transformer.layers.0.feed_forward.linear_2": "diffusion_model.layers.0.feed_forward.w2.weight",
    }


def test_model_family_reads_a_plain_modules_names():
    """ComfyUI's own Lumina 2 MODEL carries no family: it is recognised from its (original) parameter names."""
    class Foreign(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def state_dict(self, *args, **kwargs):
            return self.inner.state_dict(*args, **kwargs)

    assert model_family(PlainModel(Foreign(make_model("lumina2")))) == "lumina2"
    with pytest.raises(ValueError, match="not a Lumina DiT"):
        model_family(PlainModel(torch.nn.Linear(4, 4)))
