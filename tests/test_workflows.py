"""The example workflows in workflows/: UI-format JSON that ComfyUI loads by drag and drop, naming only this pack's
nodes and a fixed list of ComfyUI core nodes, with consistent links and widget values inside the declared limits."""

from __future__ import annotations

import pytest

from nodes import NODE_CLASS_MAPPINGS
from tests.helpers_nodes import (
    CONTROL_VALUES,
    CORE_NODES,
    DIT_NAME,
    FLUX_VAE_NAME,
    FRONTEND_ONLY,
    GEMMA2_NAME,
    GEMMA_NAME,
    GGUF_DIT_NAME,
    GGUF_LLAMA_NAME,
    LLAMA_NAME,
    LUMINA2_ALL_IN_ONE_NAME,
    LUMINA2_DIT_NAME,
    NEXT_DIT_NAME,
    VAE_NAME,
    load_workflows,
    pack_object_info,
    socket_inputs,
    ui_to_api,
    widget_inputs,
    widget_values,
)

WORKFLOWS = load_workflows()
PACK = pack_object_info()
KNOWN = {**CORE_NODES, **PACK}
# Combo inputs listing model files: the workflows must use the README's names.
MODEL_FILES = {("LuminaFlagDiTLoader", "dit_name"): DIT_NAME, ("LuminaLlamaLoader", "llama_folder"): LLAMA_NAME}
# Saved encodings a workflow loads must be the first files some workflow's Lumina Save Conditioning writes.
SAVED_CONDITIONING = {
    f"{n['widgets_values'][0]}_00001_.safetensors [output]"
    for wf in WORKFLOWS.values() for n in wf["nodes"] if n["type"] == "LuminaSaveConditioning"
}
# The family of each README file name; the family-detecting loaders take any family's file, and the VAE is the
# family's (the SDXL VAE, or the FLUX AE for Lumina-Image-2.0).
DIT_FAMILY = {DIT_NAME: "lumina_t2i", NEXT_DIT_NAME: "lumina_next", LUMINA2_DIT_NAME: "lumina2",
              LUMINA2_ALL_IN_ONE_NAME: "lumina2", GGUF_DIT_NAME: "lumina_t2i"}
TEXT_FAMILY = {LLAMA_NAME: "lumina_t2i", GEMMA_NAME: "lumina_next", GEMMA2_NAME: "lumina2",
               LUMINA2_ALL_IN_ONE_NAME: "lumina2", GGUF_LLAMA_NAME: "lumina_t2i"}
FAMILY_VAE = {"lumina_t2i": VAE_NAME, "lumina_next": VAE_NAME, "lumina2": FLUX_VAE_NAME}
MODEL_CHOICES = {("LuminaDiTLoader", "dit_name"): tuple(DIT_FAMILY),
                 ("LuminaTextEncoderLoader", "text_encoder_folder"): tuple(TEXT_FAMILY),
                 ("VAELoader", "vae_name"): (VAE_NAME, FLUX_VAE_NAME),
                 # the LoRA the Lumina-Image-2.0 LoRA workflow loads (written by the integration server)
                 ("LuminaLoraLoader", "lora_name"): ("lumina2_lora.safetensors",)}
DIT_LOADERS = ("LuminaFlagDiTLoader", "LuminaDiTLoader")
TEXT_ENCODER_LOADERS = ("LuminaLlamaLoader", "LuminaTextEncoderLoader")
SAMPLERS = ("LuminaSampler", "CFGGuider", "LuminaCFGGuider", "KSampler")


# ComfyUI's conditioning nodes a workflow may put between the text and a sampler (areas, combined prompts): the
# text comes from their conditioning inputs.
CONDITIONING_TRANSFORMS = {"ConditioningCombine": ("conditioning_1", "conditioning_2"),
                           "ConditioningSetAreaPercentage": ("conditioning",)}
# Pack nodes that encode text themselves (from a text_encoder input).
TEXT_NODES = ("LuminaTextEncode", "LuminaRegionGrid")


def _nodes(wf, type_=None):
    return [n for n in wf["nodes"] if type_ is None or n["type"] == type_]


def _by_id(wf):
    return {n["id"]: n for n in wf["nodes"]}


def _links(wf):
    return {l[0]: l for l in wf["links"]}


def _source(wf, node, input_name):
    """The node feeding `input_name` of `node`."""
    inp = next(i for i in node["inputs"] if i["name"] == input_name)
    return _by_id(wf)[_links(wf)[inp["link"]][1]]


def _model_loader(wf, node):
    """The loader the MODEL of `node` comes from, through the nodes that patch a MODEL (a LoRA loader, ...)."""
    source = _source(wf, node, "model")
    while source["type"] not in DIT_LOADERS and any(i["name"] == "model" for i in source["inputs"]):
        source = _source(wf, source, "model")
    return source


def _text_sources(wf, node, input_name):
    """The nodes the text of a CONDITIONING input comes from, through ComfyUI's conditioning nodes."""
    source = _source(wf, node, input_name)
    if source["type"] in CONDITIONING_TRANSFORMS:
        return [s for name in CONDITIONING_TRANSFORMS[source["type"]] for s in _text_sources(wf, source, name)]
    return [source]


def _widgets_count(type_):
    if type_ in FRONTEND_ONLY:
        return FRONTEND_ONLY[type_]
    if "widgets_count" in KNOWN[type_]:
        return KNOWN[type_]["widgets_count"]
    return sum(2 if control else 1 for *_, control in widget_inputs(KNOWN[type_]))


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 5


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_ui_format_and_known_node_types(name):
    wf = WORKFLOWS[name]
    assert wf["version"] == 0.4 and isinstance(wf["nodes"], list) and isinstance(wf["links"], list)
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)) and wf["last_node_id"] >= max(ids)
    link_ids = [l[0] for l in wf["links"]]
    assert len(link_ids) == len(set(link_ids)) and wf["last_link_id"] >= max(link_ids)
    for node in wf["nodes"]:
        assert node["type"] in KNOWN or node["type"] in FRONTEND_ONLY, f"unknown node type {node['type']}"
        assert node.get("mode", 0) == 0, "no muted or bypassed nodes in the examples"
        assert {"pos", "size", "inputs", "outputs", "widgets_values", "order"} <= set(node)


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_links_are_consistent(name):
    wf = WORKFLOWS[name]
    nodes = _by_id(wf)
    for link_id, origin, out_slot, target, in_slot, type_ in wf["links"]:
        out = nodes[origin]["outputs"][out_slot]
        inp = nodes[target]["inputs"][in_slot]
        assert out["type"] == type_ == inp["type"], f"link {link_id}: {out['type']} -> {inp['type']} as {type_}"
        assert link_id in (out["links"] or []) and inp["link"] == link_id
        info = KNOWN[nodes[target]["type"]]
        assert dict(socket_inputs(info))[inp["name"]] == type_
        assert KNOWN[nodes[origin]["type"]]["output"][out_slot] == type_
    links = _links(wf)
    for node in wf["nodes"]:
        for out in node["outputs"]:
            for link_id in out["links"] or []:
                assert links[link_id][1] == node["id"]
        for inp in node["inputs"]:
            assert inp["link"] is None or links[inp["link"]][3] == node["id"]
        if node["type"] in KNOWN:  # every socket input is connected (none is optional in these nodes)
            connected = {i["name"] for i in node["inputs"] if i["link"] is not None}
            assert connected == {n for n, _ in socket_inputs(KNOWN[node["type"]])}, node["type"]


def _check_value(where, kind, opts, value):
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else opts["options"]
        assert value in options, f"{where}: {value!r} not in {options}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    if kind in ("INT", "FLOAT"):
        assert opts.get("min", value) <= value <= opts.get("max", value), f"{where}: {value} outside limits"


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_widget_values_within_declared_limits(name):
    for node in WORKFLOWS[name]["nodes"]:
        type_ = node["type"]
        assert len(node["widgets_values"]) == _widgets_count(type_), f"{name}: {type_} widget count"
        if type_ in FRONTEND_ONLY:
            continue
        info = KNOWN[type_]
        values = widget_values(node, info)
        wv, i = node["widgets_values"], 0
        for input_name, kind, opts, control in widget_inputs(info):
            where = f"{name}: {type_}.{input_name}"
            value = values[input_name]
            if (type_, input_name) in MODEL_FILES:
                assert value == MODEL_FILES[(type_, input_name)], where
            elif (type_, input_name) == ("LuminaLoadConditioning", "conditioning_file"):
                assert value in SAVED_CONDITIONING, where
            elif (type_, input_name) in MODEL_CHOICES:
                assert value in MODEL_CHOICES[(type_, input_name)], where
            else:
                _check_value(where, kind, opts, value)
            i += 1
            if control:
                assert wv[i] in CONTROL_VALUES, where
                i += 1
        validate = getattr(NODE_CLASS_MAPPINGS.get(type_), "VALIDATE_INPUTS", None)
        if validate:
            assert validate(**{k: values[k] for k in ("resolution", "width", "height") if k in values}) is True


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_converts_to_a_complete_api_prompt(name):
    prompt = ui_to_api(WORKFLOWS[name], KNOWN)
    for node_id, node in prompt.items():
        info = KNOWN[node["class_type"]]
        declared = {n for n, _ in socket_inputs(info)} | {w[0] for w in widget_inputs(info)}
        assert set(node["inputs"]) == declared, f"{name}: node {node_id} ({node['class_type']})"
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert value[0] in prompt


@pytest.mark.parametrize("name", sorted(WORKFLOWS))
def test_samplers_take_lumina_text_and_models(name):
    wf = WORKFLOWS[name]
    families = set()
    for node in [n for n in wf["nodes"] if n["type"] in SAMPLERS]:
        dit = _model_loader(wf, node)
        assert dit["type"] in DIT_LOADERS
        families.add(DIT_FAMILY[dit["widgets_values"][0]])
        for encode in [s for which in ("positive", "negative") for s in _text_sources(wf, node, which)]:
            if encode["type"] == "LuminaLoadConditioning":  # a saved encoding: no text encoder in this workflow
                continue
            if encode["type"] == "LuminaSaveConditioning":  # passes the encoding through while saving it
                encode = _source(wf, encode, "conditioning")
            assert encode["type"] in TEXT_NODES
            loader = _source(wf, encode, "text_encoder")
            assert loader["type"] in TEXT_ENCODER_LOADERS
            # The DiT and the text encoder belong to one family (the README's file names say which).
            assert DIT_FAMILY[dit["widgets_values"][0]] == TEXT_FAMILY[loader["widgets_values"][0]]
    for node in _nodes(wf, "VAEDecode") + _nodes(wf, "VAEEncode"):
        vae = _source(wf, node, "vae")
        assert vae["type"] == "VAELoader"
        assert {FAMILY_VAE[f] for f in families} == {vae["widgets_values"][0]}, "the VAE of the DiT's family"
    assert _nodes(wf, "SaveImage"), "every example saves its images"


def _sampler_values(wf):
    return [widget_values(n, PACK["LuminaSampler"]) for n in _nodes(wf, "LuminaSampler")]


def _latent_values(wf):
    return [widget_values(n, PACK["LuminaEmptyLatent"]) for n in _nodes(wf, "LuminaEmptyLatent")]


def _scenario(predicate):
    return [name for name, wf in WORKFLOWS.items() if predicate(wf)]


def test_basic_text_to_image_1024():
    assert _scenario(lambda wf: any(v["resolution"] == "1024x1024" and v["batch_size"] == 1 for v in _latent_values(wf))
                     and any(v["denoise"] == 1.0 for v in _sampler_values(wf)))


def test_negative_prompt_and_batch_of_four():
    def negative_text(wf):
        return [widget_values(_source(wf, s, "negative"), PACK["LuminaTextEncode"])["text"]
                for s in _nodes(wf, "LuminaSampler")]

    assert _scenario(lambda wf: any(v["batch_size"] == 4 for v in _latent_values(wf))
                     and any(t.strip() for t in negative_text(wf)))


def test_img2img_from_a_loaded_image_at_denoise_06():
    def img2img(wf):
        for sampler in _nodes(wf, "LuminaSampler"):
            encode = _source(wf, sampler, "latent_image")
            if encode["type"] != "VAEEncode" or widget_values(sampler, PACK["LuminaSampler"])["denoise"] != 0.6:
                continue
            node = _source(wf, encode, "pixels")
            while node["type"] != "LoadImage" and node["inputs"]:
                node = _source(wf, node, node["inputs"][0]["name"])
            if node["type"] == "LoadImage":
                return True
        return False

    assert _scenario(img2img)


def test_2048x1024_with_extrapolation():
    assert _scenario(lambda wf: any(v["resolution"] == "2048x1024" for v in _latent_values(wf))
                     and all(v["extrapolation"] != "off" for v in _sampler_values(wf)))


def test_comfy_custom_sampler_with_lumina_sigmas():
    def custom(wf):
        for adv in _nodes(wf, "SamplerCustomAdvanced"):
            guider = _source(wf, adv, "guider")
            sampler = _source(wf, adv, "sampler")
            if (
                _source(wf, adv, "sigmas")["type"] == "LuminaSigmas"
                and _source(wf, adv, "noise")["type"] == "RandomNoise"
                and sampler["type"] == "KSamplerSelect" and sampler["widgets_values"][0] == "euler"
                and guider["type"] in ("CFGGuider", "BasicGuider")
                and _source(wf, guider, "model")["type"] == "LuminaFlagDiTLoader"
            ):
                return True
        return False

    assert _scenario(custom)


def test_compositional_2x2_grid_of_the_original_demo():
    def grid(wf):
        for sampler in _nodes(wf, "LuminaSampler"):
            source = _source(wf, sampler, "positive")
            if source["type"] != "LuminaRegionGrid" or _source(wf, sampler, "negative") is not source:
                continue
            v = widget_values(source, PACK["LuminaRegionGrid"])
            s = widget_values(sampler, PACK["LuminaSampler"])
            if (v["rows"], v["columns"]) == (2, 2) and len([c for c in v["captions"].splitlines() if c.strip()]) == 4 \
                    and (s["solver"], s["steps"], s["cfg"], s["shift"]) == ("midpoint", 29, 4.0, 4.0):
                return True
        return False

    assert _scenario(grid)


def test_area_conditioning_with_comfyuis_nodes_in_ksampler():
    def upstream(wf, node):
        """node and every node feeding it conditioning."""
        feeding = [_source(wf, node, i["name"]) for i in node["inputs"] if i["type"] == "CONDITIONING"]
        return [node] + [n for f in feeding for n in upstream(wf, f)]

    def areas(wf):
        for sampler in _nodes(wf, "KSampler"):
            positive = _source(wf, sampler, "positive")
            kinds = [n["type"] for n in upstream(wf, positive)]
            if (positive["type"] == "ConditioningCombine" and kinds.count("ConditioningSetAreaPercentage") >= 2
                    and len(_text_sources(wf, sampler, "positive")) >= 3):
                return True
        return False

    assert _scenario(areas)


def _next_samplers(wf):
    return [widget_values(s, PACK["LuminaSampler"]) for s in _nodes(wf, "LuminaSampler")
            if _source(wf, s, "model")["widgets_values"][0] == NEXT_DIT_NAME]


def test_lumina_next_1024_with_the_demo_settings():
    assert _scenario(lambda wf: any(v["resolution"] == "1024x1024" for v in _latent_values(wf))
                     and any((v["solver"], v["steps"], v["shift"], v["cfg"]) == ("midpoint", 29, 4.0, 4.0)
                             for v in _next_samplers(wf)))


def test_lumina_next_extrapolation_beyond_the_trained_area_with_time_aware_scaling():
    def big(wf):
        sizes = [v for v in _latent_values(wf) if v["resolution"] != "custom"]
        return any(int(w) * int(h) > 1024 * 1024 for v in sizes for w, h in [v["resolution"].split("x")])

    assert _scenario(lambda wf: big(wf) and any(v["extrapolation"] == "time_aware" and v["solver"] == "midpoint"
                                                 for v in _next_samplers(wf)))


def _lumina2_workflows(dit_name, text_encoder_name):
    """Lumina Sampler settings of the workflows sampling the Lumina-Image-2.0 DiT `dit_name` with text from
    `text_encoder_name`, with the positive's system prompt and the negative's text."""
    found = []
    for name, wf in WORKFLOWS.items():
        for sampler in _nodes(wf, "LuminaSampler"):
            if _model_loader(wf, sampler)["widgets_values"][0] != dit_name:
                continue
            pos, neg = (widget_values(_source(wf, sampler, k), PACK["LuminaTextEncode"]) for k in ("positive", "negative"))
            loaders = {_source(wf, _source(wf, sampler, k), "text_encoder")["widgets_values"][0]
                       for k in ("positive", "negative")}
            latent = widget_values(_source(wf, sampler, "latent_image"), PACK["LuminaEmptyLatent"])
            if loaders == {text_encoder_name}:
                found.append((name, widget_values(sampler, PACK["LuminaSampler"]), pos, neg, latent))
    return found


@pytest.mark.parametrize("dit_name, text_encoder_name", [(LUMINA2_DIT_NAME, GEMMA2_NAME),
                                                         (LUMINA2_ALL_IN_ONE_NAME, LUMINA2_ALL_IN_ONE_NAME)],
                         ids=["split_files", "all_in_one"])
def test_lumina2_1024_with_the_original_demo_settings(dit_name, text_encoder_name):
    demo = []
    for name, v, pos, neg, latent in _lumina2_workflows(dit_name, text_encoder_name):
        settings = (v["solver"], v["steps"], v["cfg"], v["shift"], v["cfg_trunc"], v["renorm_cfg"], v["guidance"])
        if (settings == ("midpoint", 17, 4.0, 6.0, 0.25, 1.0, "faithful") and latent["resolution"] == "1024x1024"
                and pos["system_prompt"] == "superior" and pos["text"].strip() and neg["text"] == ""):
            demo.append(name)
    assert demo


def test_lumina2_model_in_comfyuis_ksampler():
    def ksampler(wf):
        for node in _nodes(wf, "KSampler"):
            v = widget_values(node, KNOWN["KSampler"])
            dit = _model_loader(wf, node)
            latent = _source(wf, node, "latent_image")
            if (dit["type"] == "LuminaDiTLoader" and DIT_FAMILY[dit["widgets_values"][0]] == "lumina2"
                    and latent["type"] in ("EmptySD3LatentImage", "LuminaEmptyLatent")
                    and 20 <= v["steps"] <= 30 and v["cfg"] == 4.0 and v["denoise"] == 1.0):
                return True
        return False

    assert _scenario(ksampler)


def test_two_stage_workflows_from_gguf_files():
    """Stage 1 encodes with the GGUF LLaMA, samples with the GGUF DiT and saves the encodings; stage 2 samples from
    those saved encodings with the GGUF DiT and loads no text encoder."""
    def loaders(wf):
        return {n["type"]: n["widgets_values"][0] for n in wf["nodes"]
                if n["type"].startswith("Lumina") and n["type"].endswith("Loader")}

    def saved(wf):
        return {f"{n['widgets_values'][0]}_00001_.safetensors [output]"
                for n in _nodes(wf, "LuminaSaveConditioning")}

    encode = [wf for wf in WORKFLOWS.values()
              if loaders(wf) == {"LuminaTextEncoderLoader": GGUF_LLAMA_NAME, "LuminaDiTLoader": GGUF_DIT_NAME}
              and len(saved(wf)) == 2 and _nodes(wf, "LuminaSampler")]
    assert encode
    samplers = [wf for wf in WORKFLOWS.values() if loaders(wf) == {"LuminaDiTLoader": GGUF_DIT_NAME}
                and {n["widgets_values"][0] for n in _nodes(wf, "LuminaLoadConditioning")} == saved(encode[0])]
    assert samplers
