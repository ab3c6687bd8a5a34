"""LoRAs on the three Lumina DiTs, in every key form people share (SPEC.md §11).

Truth: a model whose weights were merged independently (tests/helpers_lora.py): each LoRA is written down first as
(original module, rows, up, down, alpha), then spelled in a file format with the tests' own name tables.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lumina_core
from lumina_core.__main__ import main
from lumina_core.families import load_dit
from lumina_core.lora import LoraError, LoraFamilyError, apply_lora, convert_lora, loaded_loras, remove_lora
from lumina_core.lora.names import FAMILY_NAMES
from lumina_core.tiny import make_tiny_next_dit, write_tiny_next_dit
from lumina_core.weights.fp8 import CastLinear, linear_weight_names
from lumina_core.weights.weight_patches import WeightPatch, add_weight_patch, remove_weight_patches
from tests.conftest import BF16_U, FP32_U
from tests.helpers_lora import (
    CAP,
    FAMILIES,
    FORMATS,
    identical,
    make_entries,
    make_model,
    merged,
    rel,
    run,
    snapshot,
    spell,
)

FP8 = getattr(torch, "float8_e4m3fn", None)

# ---------------------------------------------------------------------------------------------------------------
# Every family, every format


@pytest.mark.parametrize("alpha", [True, False], ids=["alpha", "no_alpha"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gives_the_forward_of_the_merged_weights(family, fmt, alpha):
    model = make_model(family)
    entries = make_entries(family, fmt, model, alpha=alpha)
    # without alpha the original-name file uses the PEFT suffixes: both spellings of a module are covered
    state = spell(entries, family, fmt, suffixes=None if alpha or fmt != "original" else ("lora_A.weight",
                                                                                          "lora_B.weight"))
    expected = run(merged(model, (entries, 0.8)), family)
    before = run(model, family)
    report = apply_lora(model, state, 0.8)
    assert report.unmatched == [] and len(report.applied) == len(entries)
    out = run(model, family)
    assert rel(out, expected) < 1e-5
    assert rel(before, expected) > 1e-2  # the LoRA changes the output: the comparison is not vacuous


@pytest.mark.parametrize("family", FAMILIES)
def test_strength_zero_changes_nothing_and_unload_restores_every_bit(family):
    model = make_model(family).to(torch.bfloat16)
    original = snapshot(model)
    state = spell(make_entries(family, "peft", make_model(family)), family, "peft")
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    apply_lora(model, state, 0.0)
    assert identical(snapshot(model), original)
    apply_lora(model, state, 1.3)
    apply_lora(model, spell(make_entries(family, "kohya", make_model(family), seed=1), family, "kohya"), -0.7)
    assert not identical(snapshot(model), original)
    remove_lora(model)
    assert identical(snapshot(model), original) and loaded_loras(model) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_two_stacked_loras_equal_both_merged_and_removing_one_leaves_the_other(family):
    model = make_model(family)
    first = make_entries(family, "original", model, seed=1)
    second = make_entries(family, "peft", model, seed=2, alpha=False)
    apply_lora(model, spell(first, family, "original"), 1.0, name="first")
    apply_lora(model, spell(second, family, "peft"), 0.5, name="second")
    assert loaded_loras(model) == ["first", "second"]
    base = make_model(family)
    assert rel(run(model, family), run(merged(base, (first, 1.0), (second, 0.5)), family)) < 1e-5
    remove_lora(model, "first")
    assert rel(run(model, family), run(merged(base, (second, 0.5)), family)) < 1e-5


def test_bf16_weights_merge_once_from_the_original():
    """Stacked LoRAs on bf16 weights are summed in fp32 from the loaded weights and rounded once."""
    model = make_model("lumina_next").to(torch.bfloat16)
    base = snapshot(model)
    loras = [make_entries("lumina_next", "kohya", model, seed=s) for s in (1, 2, 3)]
    for entries in loras:
        apply_lora(model, spell(entries, "lumina_next", "kohya"), 1.0)
    patched = snapshot(model)
    for key in {e["module"] + ".weight" for e in loras[0]}:
        total = base[key].double()
        for entries in loras:
            for e in (e for e in entries if e["module"] + ".weight" == key):
                total += e["alpha"] / e["down"].shape[0] * (e["up"].double() @ e["down"].double())
        assert ((patched[key].double() - total).abs() <= 2 * BF16_U * total.abs() + 1e-6).all(), key


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8 dtypes")
def test_fp8_weights_are_patched_as_cast_and_never_rewritten(tmp_path, cpu_compute):
    path = write_tiny_next_dit(tmp_path / "next.safetensors", seed=3, cap_feat_dim=CAP)
    fp8 = load_dit(path, dtype=FP8)
    stored = snapshot(fp8)
    # truth: the fp32 model holding the very values fp8 storage computes with, the LoRA merged into it
    reference = load_dit(path, dtype=torch.float32)
    linear = linear_weight_names(fp8)
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            tensor.copy_(tensor.to(FP8 if name in linear else cpu_compute).float())
    entries = make_entries("lumina_next", "peft", reference)
    without = run(fp8, "lumina_next")
    report = apply_lora(fp8, spell(entries, "lumina_next", "peft"), 1.0)
    assert len(report.applied) == len(entries)
    assert identical(snapshot(fp8), stored)  # the fp8 bytes are not touched
    out = run(fp8, "lumina_next")
    expected = run(merged(reference, (entries, 1.0)), "lumina_next")
    # fp32 compute: the reference's own arithmetic up to the order of the sums; bf16: the activations' rounding
    # over the layers (as test_fp8_next), with the LoRA's own product rounded too
    bound = 1e-5 if cpu_compute == torch.float32 else 2 * (reference.config.n_layers + 2) * BF16_U
    assert rel(out, expected) < bound
    assert rel(without, expected) > 4 * bound  # far more than the rounding: the LoRA is applied
    remove_lora(fp8)
    assert identical(snapshot(fp8), stored)
    assert not any(m._forward_hooks for m in fp8.modules())


class DequantizingLinear(CastLinear):
    """A layer that builds its weight per forward (as a GGUF layer dequantizes its blocks) and applies its
    `weight_function` list to it, ComfyUI's convention."""

    applies_weight_function = True

    def forward(self, x):
        weight = self.weight.to(device=x.device, dtype=torch.float32)
        for function in getattr(self, "weight_function", ()):
            weight = function(weight)
        return nn.functional.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def test_layers_that_cast_their_weight_can_apply_the_patches_themselves():
    model = make_model("lumina2")
    truth_entries = make_entries("lumina2", "peft", model, seed=4)
    expected = run(merged(model, (truth_entries, 1.0)), "lumina2")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                layer = DequantizingLinear(child.in_features, child.out_features, bias=child.bias is not None)
                layer.load_state_dict(child.state_dict())
                setattr(module, child_name, layer)
    stored = snapshot(model)
    apply_lora(model, spell(truth_entries, "lumina2", "peft"), 1.0)
    assert identical(snapshot(model), stored) and not any(m._forward_hooks for m in model.modules())
    assert rel(run(model, "lumina2"), expected) < 1e-5
    remove_lora(model)
    assert not any("weight_function" in vars(m) for m in model.modules())
    assert identical(snapshot(model), stored)


def test_gguf_layers_get_the_patches_on_their_dequantized_weight():
    quantized = pytest.importorskip("lumina_core.weights.quantized")
    helpers = pytest.importorskip("tests.helpers_gguf")
    import numpy as np

    g = torch.Generator().manual_seed(3)
    layer = quantized.GGUFLinear(64, 32, bias=True).requires_grad_(False)
    raw, values = helpers.encode(torch.randn(32, 64, generator=g) / 8, helpers.Q.Q8_0, np.random.default_rng(0))
    layer.load_quantized(torch.from_numpy(raw), helpers.Q.Q8_0, (32, 64))
    blocks = layer.weight.detach().clone()
    up, down = torch.randn(32, 4, generator=g), torch.randn(4, 64, generator=g)
    x = torch.randn(3, 64, generator=g)
    plain = layer(x)
    patch = WeightPatch(up, down, 0.5)
    assert add_weight_patch(layer, patch) == "layer"
    expected = nn.functional.linear(x, values + 0.5 * up @ down, layer.bias)
    assert rel(layer(x), expected) < 1e-6 and torch.equal(layer.weight, blocks)
    remove_weight_patches(layer)
    assert torch.equal(layer(x), plain) and not layer._forward_hooks


# ---------------------------------------------------------------------------------------------------------------
# What does not fit


def test_unmatched_and_text_encoder_keys_are_reported():
    model = make_model("lumina2")
    entries = make_entries("lumina2", "peft", model, modules=["layers.0.attention.qkv", "layers.1.feed_forward.w1"])
    state = spell(entries, "lumina2", "peft")
    extra = {
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4),
        "transformer.layers.0.attn.to_add_out.lora_A.weight": torch.zeros(4, 64),
        "transformer.layers.0.attn.to_add_out.lora_B.weight": torch.zeros(64, 4),
        "transformer.layers.0.feed_forward.linear_1.lora_magnitude_vector": torch.zeros(4),
    }
    report = apply_lora(model, {**state, **extra}, 1.0)
    assert report.unmatched == sorted(extra)
    assert len(report.applied) == len(entries) == 4
    assert "text-encoder part" in report.reasons["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert "names no layer" in report.reasons["transformer.layers.0.attn.to_add_out.lora_A.weight"]
    assert rel(run(model, "lumina2"), run(merged(make_model("lumina2"), (entries, 1.0)),
                                          "lumina2")) < 1e-5


def test_diffusers_cross_attention_query_copy_has_no_place_in_the_next_dit():
    model = make_model("lumina_next")
    entries = make_entries("lumina_next", "peft", model, modules=["layers.0.attention.wq"])
    state = spell(entries, "lumina_next", "peft")
    state.update({k.replace("attn1.to_q", "attn2.to_q"): v for k, v in state.items()})
    report = apply_lora(model, state, 1.0)
    assert report.applied == ["transformer.layers.0.attn1.to_q"]
    assert all("attn2.to_q" in k and "no exact place" in report.reasons[k] for k in report.unmatched)


@pytest.mark.parametrize("made_for, model_family, fmt, named", [
    ("lumina2", "lumina_t2i", "original", "Lumina-Image-2.0"),
    ("lumina2", "lumina_next", "kohya", "Lumina-Image-2.0"),
    ("lumina_t2i", "lumina_next", "kohya", "Lumina-T2I"),
    ("lumina_next", "lumina_t2i", "original", "Lumina-Next"),
    ("lumina_next", "lumina2", "peft", "Lumina-Next"),
    ("lumina_t2i", "lumina2", "original", "Lumina-T2I"),
])
def test_a_lora_of_another_family_is_refused_naming_it(made_for, model_family, fmt, named):
    state = spell(make_entries(made_for, fmt, make_model(made_for)), made_for, fmt)
    model = make_model(model_family)
    before = snapshot(model)
    with pytest.raises(LoraFamilyError, match=f"LoRA for {named}"):
        apply_lora(model, state)
    assert identical(snapshot(model), before) and loaded_loras(model) == []


def test_a_lora_for_another_size_is_refused_with_the_shapes():
    big = make_tiny_next_dit(0, dim=96, n_heads=4, n_kv_heads=2)
    state = spell(make_entries("lumina_next", "original", big), "lumina_next", "original")
    with pytest.raises(LoraError, match=r"does not fit this Lumina-Next .*96x96, the model's layer 64x64"):
        apply_lora(make_model("lumina_next"), state)


def test_a_lora_of_another_model_is_refused():
    state = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(LoraError, match="none of the 2 keys .* patches a layer of this Lumina-T2I"):
        apply_lora(make_model("lumina_t2i"), state)


def test_the_name_tables_list_exactly_each_familys_linear_layers():
    """An independent check of the tables the matching uses: the linear layers of each family's module."""
    import re

    for family in FAMILIES:
        model = make_model(family)
        linears = {re.sub(r"^(layers|noise_refiner|context_refiner)\.\d+\.", r"\1.N.", name)
                   for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert linears == set(FAMILY_NAMES[family].linears), family


# ---------------------------------------------------------------------------------------------------------------
# Files, conversion, the pipeline


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_convert_writes_original_names_that_apply_the_same(tmp_path, family, fmt):
    model = make_model(family)
    entries = make_entries(family, fmt, model, alpha=fmt != "peft")
    src = tmp_path / "lora.safetensors"
    save_file({**spell(entries, family, fmt), "lora_te_encoder_layers_0_fc1.lora_down.weight": torch.zeros(2, 3)},
              str(src))
    dst = tmp_path / "lora_comfy.safetensors"
    assert main(["lora-convert", str(src), str(dst)]) == 0
    converted = load_file(str(dst))
    weights = model.state_dict()
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in converted
             if k.startswith("diffusion_model.")}
    # what ComfyUI's generic map reads: diffusion_model.<a weight of the model without .weight>
    assert stems == {"diffusion_model." + e["module"] for e in entries}
    assert all(s[len("diffusion_model."):] + ".weight" in weights for s in stems)
    assert "lora_te_encoder_layers_0_fc1.lora_down.weight" in converted
    apply_lora(model, {k: v for k, v in converted.items() if k.startswith("diffusion_model.")})
    assert rel(run(model, family), run(merged(make_model(family), (entries, 1.0)), family)) < 1e-5


def test_pipeline_loads_and_unloads_lora_weights(tmp_path):
    dit = make_model("lumina_t2i")
    pipe = lumina_core.LuminaT2IPipeline(dit)
    original = snapshot(dit)
    entries = make_entries("lumina_t2i", "kohya", dit)
    path = tmp_path / "style.safetensors"
    save_file(spell(entries, "lumina_t2i", "kohya"), str(path))
    report = pipe.load_lora_weights(path, strength=0.6)
    assert report.name == "style" and report.unmatched == []
    assert rel(run(dit, "lumina_t2i"), run(merged(make_model("lumina_t2i"), (entries, 0.6)),
                                          "lumina_t2i")) < 1e-5
    pipe.unload_lora_weights()
    assert identical(snapshot(dit), original)


def test_lumina_core_exports_apply_lora():
    assert lumina_core.apply_lora is apply_lora


def test_conversion_of_diffusers_qkv_blocks_is_exact_with_any_ranks():
    model = make_model("lumina2")
    entries = make_entries("lumina2", "peft", model, modules=["layers.0.attention.qkv"])
    out, dropped = convert_lora(spell(entries, "lumina2", "peft"))
    assert dropped == {}
    down, up = out["diffusion_model.layers.0.attention.qkv.lora_down.weight"], \
        out["diffusion_model.layers.0.attention.qkv.lora_up.weight"]
    assert down.shape[0] == sum(e["down"].shape[0] for e in entries) and up.shape[0] == 128
    expected = torch.zeros(128, 64, dtype=torch.float64)
    for e in entries:
        expected[slice(*e["rows"])] += e["alpha"] / e["down"].shape[0] * (e["up"].double() @ e["down"].double())
    assert torch.allclose(up.double() @ down.double(), expected, rtol=0, atol=64 * FP32_U)


def test_other_spellings_of_the_same_modules():
    """OneTrainer (lora_transformer_ + diffusers names with dots as _), PEFT's adapter-named tensors (.lora_A.default)
    and `base_model.model.` + original names land where the other forms do."""
    model = make_model("lumina2")
    entries = make_entries("lumina2", "peft", model, modules=["layers.0.attention.qkv", "noise_refiner.0.adaLN_modulation.1",
                                                               "layers.1.feed_forward.w1"])
    stems = {"attn.to_q": "lora_transformer_layers_0_attn_to_q", "attn.to_k": "lora_transformer_layers_0_attn_to_k",
             "attn.to_v": "lora_transformer_layers_0_attn_to_v"}
    state = {}
    for e in entries:
        if e["block"]:
            stem, down, up = stems[e["block"]], "lora_down.weight", "lora_up.weight"
        elif e["module"].startswith("noise_refiner"):
            stem, down, up = "transformer.noise_refiner.0.norm1.linear", "lora_A.default.weight", "lora_B.default.weight"
        else:
            stem, down, up = "base_model.model." + e["module"], "lora_A.weight", "lora_B.weight"
        state.update({f"{stem}.{down}": e["down"], f"{stem}.{up}": e["up"], f"{stem}.alpha": torch.tensor(e["alpha"])})
    report = apply_lora(model, state)
    assert report.unmatched == [] and len(report.applied) == len(entries) == 5
    assert rel(run(model, "lumina2"), run(merged(make_model("lumina2"), (entries, 1.0)), "lumina2")) < 1e-5
