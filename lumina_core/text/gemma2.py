"""Gemma-2-2B text encoder of Lumina-Image-2.0: load google/gemma-2-2b (a Hugging Face folder, a diffusers
`text_encoder` folder, or one of ComfyUI's single files) and turn prompts into caption features.

Follows the original (github Alpha-VLLM/Lumina-Image-2.0, `sample.py` `encode_prompt`, SPEC §9), which is:

    tokenizer = AutoTokenizer.from_pretrained("google/gemma-2-2b"); tokenizer.padding_side = "right"
    cap = system_prompt + " <Prompt Start> " + prompt        # sample.py:246-261; "empty": the prompt alone
    inputs = tokenizer([cap, neg_cap], padding=True, pad_to_multiple_of=8, max_length=256, truncation=True)
    feats = Gemma2Model(input_ids, attention_mask, output_hidden_states=True).hidden_states[-2]

so every prompt is [BOS] + tokens (no EOS), cut to 256 ids, right padded with <pad> to the longest prompt of the
call rounded up to a multiple of 8, and the features are the output of decoder layer 24 of 26 (before the final
norm), computed with the attention mask: the same layout and layer as Lumina-Next's Gemma (`gemma.bos_token_rows`,
`gemma.penultimate_features`). The negative prompt is "" without system prompt (sample.py:222, :262-263).

Gemma-2 caps its attention logits (50 tanh(x/50)); transformers applies that only in its eager attention (its SDPA
path cannot, and refuses Gemma-2), so the model always runs eager. ComfyUI's own Gemma-2 skips the capping and
the sliding window, so its features differ slightly from these, which are the original's.

System prompts: `system_prompt` is a preset name (SYSTEM_PROMPTS, or the original's names "real"/"align"),
None for the default "superior", or the text itself. A value with no whitespace that is no preset name is refused
rather than used as text: it is nearly always a misspelt preset, and a system prompt is a sentence.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

import torch
from transformers import Gemma2Config, Gemma2Model

from ..weights.fp8 import CastLinear, storage_dtypes, swap_linear_layers
from .gemma import (
    OTHER_ENCODERS,
    bos_token_rows,
    penultimate_features,
    pipeline_tokenizer_folder,
    rebuild_embed_scale,
)
from .hf_folder import (
    HFTextEncoder,
    as_prompt_list,
    load_tokenizer,
    log_loaded,
    model_type_of,
    read_config_json,
    rebuild_rotary_buffers,
    storage_plan,
)
from .hf_weights import TextEncoderError, read_weights
from .single_file import file_sources, find_layout, model_type_of_file, open_weights
from .spiece import SentencePieceTokenizer

logger = logging.getLogger(__name__)

GEMMA_2_2B = "google/gemma-2-2b"
PROMPT_START = " <Prompt Start> "  # between the system prompt and the prompt (sample.py:247-257)

# The original's presets (sample.py:246-259, without the " <Prompt Start> " their strings end in), under the names
# the original's README and SPEC use; SYSTEM_PROMPT_ALIASES holds sample.py's `--system_type` values.
SYSTEM_PROMPTS = {
    "superior": "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts.",
    "alignment": "You are an assistant designed to generate high-quality images with the highest degree of "
    "image-text alignment based on textual prompts.",
    "base": "You are an assistant designed to generate high-quality images based on user prompts.",
    "aesthetics": "You are an assistant designed to generate high-quality images with highest degree of aesthetics "
    "based on user prompts.",
    "4grid": "You are an assistant designed to generate four high-quality images with highest degree of aesthetics "
    "arranged in 2x2 grids based on user prompts.",
    "empty": "",  # no system prompt and no " <Prompt Start> " tag: the prompt alone
}
SYSTEM_PROMPT_ALIASES = {"real": "superior", "align": "alignment"}
DEFAULT_SYSTEM_PROMPT = "superior"  # sample.py's default `--system_type real`
NO_SYSTEM_PROMPT = "empty"  # the original's negative prompt "" is encoded this way

# google/gemma-2-2b's config.json (as published, written by transformers 4.42.4). A single file carries no config:
# the sizes come from its tensor shapes (gemma2_config_from_shapes), everything else from here.
GEMMA_2_2B_CONFIG = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,  # scores scaled by 256^-0.5; equal to head_dim here, not in every Gemma-2
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,  # on layers 0, 2, 4, ...; never reached by a 256-token prompt
    "torch_dtype": "float32",
    "transformers_version": "4.42.4",
    "use_cache": True,
    "vocab_size": 256000,
}

_GET_GEMMA2 = (
    f"Lumina-Image-2.0 needs Gemma-2-2B ({GEMMA_2_2B}): its Hugging Face folder (config.json, tokenizer files, "
    "model*.safetensors), the text_encoder folder of a diffusers pipeline (Alpha-VLLM/Lumina-Image-2.0's) next to "
    "its tokenizer folder, ComfyUI's gemma_2_2b_fp16.safetensors, or ComfyUI's all-in-one lumina_2.safetensors."
)


def system_prompt_text(system_prompt: str | None = None) -> str:
    """The text of a system prompt: a preset's (by name or alias, any case; None: the default), or the given
    text itself, unchanged. "empty", "" (or only whitespace) give "": no system prompt."""
    if system_prompt is None:
        return SYSTEM_PROMPTS[DEFAULT_SYSTEM_PROMPT]
    if not isinstance(system_prompt, str):
        raise TypeError(f"system_prompt must be a preset name or a string, not {type(system_prompt).__name__}")
    name = system_prompt.strip().lower()
    name = SYSTEM_PROMPT_ALIASES.get(name, name)
    if name in SYSTEM_PROMPTS:
        return SYSTEM_PROMPTS[name]
    if not name:
        return ""
    if not any(c.isspace() for c in name):
        names = ", ".join([*SYSTEM_PROMPTS, *SYSTEM_PROMPT_ALIASES])
        raise ValueError(
            f"Unknown system prompt preset {system_prompt!r}: the presets are {names}. A system prompt of your own "
            "is a sentence (for example \"You are an assistant designed to generate high-quality images.\")."
        )
    return system_prompt


def lumina2_prompt(prompt: str, system_prompt: str | None = None) -> str:
    """The text the original encodes: system prompt + " <Prompt Start> " + prompt, or the prompt alone when the
    system prompt is "" ("empty")."""
    text = system_prompt_text(system_prompt)
    return prompt if text == "" else text + PROMPT_START + prompt


def prompt_texts(prompts, system_prompt: str | None = None, negative_prompt: str | None = None) -> list[str]:
    """The texts of one encoding call: each prompt with the system prompt, then, when given, the negative prompt,
    which gets the system prompt only when it is not "" (demo.py:152-153; sample.py's negative is always "")."""
    system = system_prompt_text(system_prompt)  # checked once, even when the negative needs none
    texts = [lumina2_prompt(prompt, system) for prompt in as_prompt_list(prompts)]
    if negative_prompt is not None:
        texts.append(lumina2_prompt(negative_prompt, system) if negative_prompt else "")
    return texts


def _refusal(what: str, single_file: bool = False) -> str:
    """What a model that is not Gemma-2 is, and where it belongs."""
    known = OTHER_ENCODERS.get(what)
    if not known:
        return ""
    if single_file and what in ("llama", "gemma"):
        known += ", from its Hugging Face folder (config.json, tokenizer files, weights), not from a single file"
    return f"{known}. "


def _check_gemma2_config(folder: str) -> None:
    """Raise unless config.json exists and describes a Gemma-2 model; say what the model is otherwise."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        hint = ""
        if os.path.isfile(os.path.join(folder, "model_index.json")):
            hint = (
                "It looks like the root of a diffusers pipeline; select its text encoder folder, "
                f"{os.path.join(folder, 'text_encoder')}. "
            )
        raise TextEncoderError(f"No config.json in {folder}. {hint}{_GET_GEMMA2}")
    raw = read_config_json(folder)
    if raw is None:
        raise TextEncoderError(
            f"Could not read {config_path} as a Hugging Face model config (a JSON object). Re-download it from "
            f"{GEMMA_2_2B}."
        )
    model_type = model_type_of(raw)
    if model_type != "gemma2":
        what = f"model_type {raw.get('model_type')!r}" if raw.get("model_type") else "no model_type"
        if raw.get("architectures"):
            what += f", architectures {list(raw['architectures'])}"
        raise TextEncoderError(
            f"{folder} holds a model that is not Gemma-2-2B ({what} in config.json). {_refusal(model_type)}"
            f"{_GET_GEMMA2}"
        )


def gemma2_config_from_shapes(shapes: dict, origin: str) -> Gemma2Config:
    """Gemma-2-2B's released configuration with the sizes a file's tensors have (keys of Gemma2Model: `layers.N.*`,
    `embed_tokens.weight`); the head count follows from the query rows and the released head_dim (256)."""
    head_dim = GEMMA_2_2B_CONFIG["head_dim"]
    vocab_size, hidden_size = shapes["embed_tokens.weight"]
    q_rows = shapes["layers.0.self_attn.q_proj.weight"][0]
    kv_rows = shapes["layers.0.self_attn.k_proj.weight"][0]
    if q_rows % head_dim or kv_rows % head_dim:
        raise TextEncoderError(
            f"The attention weights in {origin} have {q_rows} query and {kv_rows} key rows, which are not whole "
            f"heads of {head_dim} channels as in {GEMMA_2_2B}: the file holds another model. {_GET_GEMMA2}"
        )
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.") and k.split(".")[1].isdigit()}
    sizes = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0],
        "num_hidden_layers": max(layers) + 1,
        "num_attention_heads": q_rows // head_dim,
        "num_key_value_heads": kv_rows // head_dim,
    }
    return Gemma2Config.from_dict({**GEMMA_2_2B_CONFIG, **sizes}, attn_implementation="eager")


class Gemma2TextEncoder(HFTextEncoder):
    """A Gemma2Model and its tokenizer, producing Lumina-Image-2.0 caption features (same interface as
    GemmaTextEncoder, plus the system prompt)."""

    family = "lumina2"
    system_prompts = SYSTEM_PROMPTS  # the presets `encode` takes by name (callers test for this attribute)

    title = "Gemma-2"
    source = GEMMA_2_2B
    get_hint = _GET_GEMMA2
    gguf_architecture = "gemma2"

    @classmethod
    def from_folder(cls, path, **kwargs):
        """Load a Hugging Face folder (google/gemma-2-2b) or a diffusers `text_encoder` folder; keywords as for
        HFTextEncoder.from_folder. ComfyUI's single files go to `from_file`."""
        if os.path.isfile(path):
            raise TextEncoderError(
                f"{path} is a file, not a folder: load ComfyUI's single files with Gemma2TextEncoder.from_file, or "
                "let lumina_core.load_text_encoder choose the loader."
            )
        return super().from_folder(path, **kwargs)

    @classmethod
    def config_class(cls):
        return Gemma2Config

    @classmethod
    def model_class(cls):
        return Gemma2Model

    @classmethod
    def check_config(cls, folder: str) -> None:
        _check_gemma2_config(folder)

    @classmethod
    def tokenizer_folder(cls, folder: str) -> str:
        """The folder itself (google/gemma-2-2b), or, for the `text_encoder` folder of a diffusers pipeline, its
        sibling `tokenizer` folder."""
        return pipeline_tokenizer_folder(folder, GEMMA_2_2B)

    @classmethod
    def load_tokenizer(cls, folder: str):
        return load_tokenizer(
            folder, title="Gemma-2", get_hint=_GET_GEMMA2, needed=("bos", "pad"), add_bos_token=True,
            add_eos_token=False,
            files=f"{GEMMA_2_2B}: tokenizer.json, tokenizer_config.json, special_tokens_map.json",
        )

    @classmethod
    def check_model_config(cls, config, folder: str) -> None:
        if config.num_hidden_layers < 2:
            where = folder if os.path.isfile(folder) else f"config.json in {folder}"
            raise TextEncoderError(
                f"{where} declares {config.num_hidden_layers} decoder layer(s); Lumina-Image-2.0 "
                f"reads the second-to-last layer's output, so at least 2 are needed. {_GET_GEMMA2}"
            )
        # The only transformers attention that applies attn_logit_softcapping (see the module docstring).
        config._attn_implementation = "eager"

    @classmethod
    def rebuild_buffers(cls, model, device: torch.device) -> None:
        rebuild_embed_scale(model, device)
        rebuild_rotary_buffers(model, device)  # also checks that nothing is left on the meta device

    @classmethod
    def from_file(
        cls,
        path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device="cpu",
        compute_dtype: torch.dtype | None = None,
        linear_cls=None,
    ):
        """Load ComfyUI's gemma_2_2b_fp16.safetensors, or the Gemma-2 of its all-in-one lumina_2.safetensors (the
        DiT and VAE in it are not read). dtype, device, compute_dtype, linear_cls: as for `from_folder`.

        The tokenizer is the file's SentencePiece model (needs the sentencepiece package); the configuration is
        gemma-2-2b's with the sizes of the file's tensors. Only the header is read before every key and shape has
        been checked; then each tensor once, in its storage dtype.
        """
        device, _fp8, compute_dtype = storage_plan(dtype, device, compute_dtype)
        start = time.perf_counter()
        st = open_weights(path)
        path = os.fspath(path)
        layout = find_layout(st.keys)
        if layout is None:
            what = model_type_of_file(st)
            holds = f"a {what!r} model" if what else f"no Gemma-2 (first keys: {', '.join(st.keys[:4])})"
            raise TextEncoderError(
                f"{path} holds {holds}, not Gemma-2-2B in one of ComfyUI's layouts. {_refusal(what, True)}"
                f"{_GET_GEMMA2}"
            )
        if layout.tokenizer_key not in st.keys:
            raise TextEncoderError(
                f"{path} holds Gemma-2 weights but no tokenizer ({layout.tokenizer_key!r}): it is not a complete "
                f"ComfyUI file (a weights file of a Hugging Face folder? Then choose that folder). {_GET_GEMMA2}"
            )
        spiece = st.get(layout.tokenizer_key)
        origin = f"{layout.tokenizer_key!r} of {path}"
        if spiece.dtype != torch.uint8 or spiece.ndim != 1:
            raise TextEncoderError(f"{origin} is not a 1-D uint8 tensor (the SentencePiece model). {_GET_GEMMA2}")
        tokenizer = SentencePieceTokenizer(spiece.numpy().tobytes(), origin=origin, get_hint=_GET_GEMMA2)
        shapes = {k[len(layout.prefix):]: st.shape(k) for k in st.keys if k.startswith(layout.prefix)}
        fix = f"Download the file again. {_GET_GEMMA2}"
        missing = [k for k in ("embed_tokens.weight", "layers.0.self_attn.q_proj.weight",
                               "layers.0.self_attn.k_proj.weight", "layers.0.mlp.gate_proj.weight") if k not in shapes]
        if missing:
            raise TextEncoderError(f"{path} ({layout.name}) lacks {[layout.prefix + k for k in missing]}. {fix}")
        config = gemma2_config_from_shapes(shapes, path)
        cls.check_model_config(config, path)
        if config.vocab_size < len(tokenizer):
            raise TextEncoderError(
                f"The tokenizer in {path} has {len(tokenizer)} tokens but the embedding only {config.vocab_size} "
                f"rows: the file is not one model. {fix}"
            )

        with torch.device("meta"):
            model = Gemma2Model(config)
        if _fp8 or linear_cls is not None:
            swap_linear_layers(model, linear_cls or CastLinear)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        sources = file_sources(st, layout, expected, "Gemma-2", fix)
        state_dict = read_weights(sources, storage_dtypes(model, dtype, compute_dtype), device, GEMMA_2_2B)
        model.load_state_dict(state_dict, strict=True, assign=True)
        cls.rebuild_buffers(model, device)
        model.eval().requires_grad_(False)

        encoder = cls(model, tokenizer, path)
        encoder.storage_dtype = dtype
        logger.info("%s is %s", path, layout.name)
        log_loaded(cls.title, encoder, dtype, compute_dtype, device, start)
        return encoder

    def tokenize(self, texts: str | Sequence[str], *, max_tokens: int | None = None):
        """Token ids [B, L] (int64, right padded with <pad>) and mask [B, L] (bool) of finished texts (system
        prompt included: `prompt_texts`): [BOS] + tokens, no EOS, at most max_tokens ids (default 256), L the
        longest row rounded up to a multiple of 8, as the original's tokenizer call."""
        return bos_token_rows(self.tokenizer, as_prompt_list(texts), max_tokens=max_tokens, reader="Lumina-Image-2.0")

    def encode(
        self,
        prompts: str | Sequence[str],
        system_prompt: str | None = None,
        *,
        negative_prompt: str | None = None,
        max_tokens: int | None = None,
        output_device=None,
    ):
        """Caption features [B, L, 2304] (float32) and mask [B, L] (bool), both on output_device (default CPU).

        system_prompt: a preset name of SYSTEM_PROMPTS (or "real"/"align"), None for "superior", or the text
        itself; "empty" (or "") encodes the prompts alone. negative_prompt: encoded as one more row of the same
        call, as the original's [prompt, negative] call; "" (the original's) without the system prompt. To encode
        the negative alone: `encode("", system_prompt="empty")`.

        The features are `hidden_states[-2]` with the attention mask passed. Encoding prompts one at a time gives
        the same features on their real tokens as the joint call (Gemma-2 is causal, padded on the right); only
        the padded rows differ, and the DiT drops those (it keeps cap_feats[i, :cap_len]).
        """
        ids, mask = self.tokenize(prompt_texts(prompts, system_prompt, negative_prompt), max_tokens=max_tokens)
        return penultimate_features(self.model, ids, mask, output_device)
