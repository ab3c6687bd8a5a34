"""The family registry: each family recognised from its own files only, and a new family added by one entry."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from lumina_core import families
from lumina_core.models.next_dit import NextDiT
from lumina_core.tiny import write_tiny_flag_dit, write_tiny_next_dit
from lumina_core.weights.layouts import CheckpointError
from nodes.flow_model import ComfyFlowMixin, comfy_dit_class


def _folder(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "config, family",
    [({"model_type": "llama"}, "lumina_t2i"), ({"architectures": ["LlamaForCausalLM"]}, "lumina_t2i"),
     ({"model_type": "gemma"}, "lumina_next"), ({"architectures": ["GemmaForCausalLM"]}, "lumina_next"),
     ({"model_type": "gemma2"}, "lumina2"), ({"architectures": ["Gemma2ForCausalLM"]}, "lumina2")],
)
def test_text_encoder_family_from_config_json(tmp_path, config, family):
    assert families.text_encoder_family(_folder(tmp_path, "te", config)).name == family


@pytest.mark.parametrize("model_type", ["gemma3", "t5", "clip_text_model"])
def test_other_text_encoders_are_not_lumina_ones(tmp_path, model_type):
    folder = _folder(tmp_path, "te", {"model_type": model_type})
    assert not families.is_text_encoder_folder(folder)
    with pytest.raises(families.TextEncoderFolderError, match=f"'{model_type}'.*LLaMA-2-7B.*Gemma-2B"):
        families.load_text_encoder(folder)


def test_each_checkpoint_matches_exactly_one_family(tmp_path):
    paths = {
        "lumina_t2i": write_tiny_flag_dit(tmp_path / "flag.safetensors"),
        "lumina_next": write_tiny_next_dit(tmp_path / "next.safetensors"),
    }
    paths["lumina_next_diffusers"] = write_tiny_next_dit(tmp_path / "next_d.safetensors", layout="diffusers")
    from tests.helpers_lumina2 import LAYOUTS, write_dit

    for layout in LAYOUTS:
        paths[f"lumina2_{layout}"] = write_dit(tmp_path / layout, layout)
    for name, path in paths.items():
        from lumina_core.weights.tensor_io import open_tensor_file

        keys = open_tensor_file(path).keys
        matching = [f.name for f in families.FAMILIES.values() if f.matches_checkpoint(keys)]
        assert matching == [name.replace("_diffusers", "") if name.startswith("lumina_") else "lumina2"], name


def test_mismatch_message_names_the_encoder_the_dit_needs():
    with pytest.raises(ValueError, match=r"comes from Gemma-2B \(Lumina-Next\).*Flag-DiT, which needs LLaMA-2-7B"):
        families.check_same_family(families.LUMINA_T2I, families.LUMINA_NEXT)
    families.check_same_family(families.LUMINA_NEXT, families.LUMINA_NEXT)


class TinyThirdDiT(NextDiT):
    family = "third"


def test_a_third_family_is_one_registry_entry(tmp_path, monkeypatch):
    """A family whose checkpoints carry a marker key: load_dit, the ComfyUI wrapper and the sampler defaults follow
    from its entry alone."""
    path = write_tiny_next_dit(tmp_path / "third.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["third_family_marker"] = torch.zeros(1)
    save_file(state, str(path))

    def load(p, *, dtype, device, operations=None):
        model = TinyThirdDiT(families.LUMINA_NEXT.read_dit_config(tmp_path / "plain.safetensors"))
        return model.to(dtype)

    write_tiny_next_dit(tmp_path / "plain.safetensors")
    third = dataclasses.replace(
        families.LUMINA_NEXT,
        name="third",
        title="Third",
        matches_checkpoint=lambda keys: "third_family_marker" in keys,
        load_dit=load,
        dit_class=lambda: TinyThirdDiT,
        defaults=dataclasses.replace(families.LUMINA_NEXT.defaults, solver="rk4"),
    )
    # The Next-DiT entry also matches this file's keys; the registry takes the first match, so the new one goes first.
    monkeypatch.setattr(families, "FAMILIES", {"third": third, **families.FAMILIES})
    assert families.checkpoint_family(path) is third
    model = families.load_dit(path, dtype=torch.float32)
    assert isinstance(model, TinyThirdDiT) and families.family_of(model) is third
    wrapper = comfy_dit_class(third)
    assert issubclass(wrapper, ComfyFlowMixin) and issubclass(wrapper, TinyThirdDiT)


def test_non_dit_files_are_refused_with_what_they_are(tmp_path):
    vae = tmp_path / "vae.safetensors"
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, str(vae))
    with pytest.raises(CheckpointError, match="a VAE; load it with ComfyUI's Load VAE"):
        families.load_dit(vae)
