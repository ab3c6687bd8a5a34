"""LLaMA's decoder in plain torch (lumina_core.text.llama_decoder), the model a llama.cpp LLaMA file loads into.

The truth: transformers' own LlamaModel (SDPA attention, as the folder loader builds it) holding the same weights,
called as Lumina-T2I's encoder calls it; and, for the loading, the features of the same weights from their Hugging
Face folder (tests/test_gguf_text.py) — here, that a lone LLaMA GGUF is loaded and encoded without transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from lumina_core import load_text_encoder
from lumina_core.text.llama_decoder import LlamaDecoder, LlamaDecoderConfig
from tests.helpers_gguf_text import llama_cpp_gguf, make_llama_folder

REPO = Path(__file__).resolve().parents[1]


def _pair(n_heads: int, n_kv_heads: int, dtype: torch.dtype):
    """(transformers LlamaModel, LlamaDecoder) with the same random weights, in `dtype`."""
    values = dict(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=64 // n_heads,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256)
    torch.manual_seed(0)
    reference = LlamaModel(LlamaConfig(**values, attn_implementation="sdpa")).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():  # norms around 1, not the initial ones
            p.copy_(torch.randn_like(p) * (0.1 if p.ndim == 1 else p.shape[-1] ** -0.5) + (p.ndim == 1))
    ours = LlamaDecoder(LlamaDecoderConfig.from_dict(values)).eval()
    assert set(ours.state_dict()) == set(reference.state_dict()) - {"rotary_emb.inv_freq",
                                                                     "rotary_emb.original_inv_freq"}
    ours.load_state_dict(reference.state_dict(), strict=False)
    reference.to(dtype).rotary_emb = type(reference.rotary_emb)(config=reference.config)  # fp32 frequencies, as
    return reference, ours.to(dtype)  # the folder loader keeps them (hf_folder.rebuild_rotary_buffers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("length", [1, 2, 19])
def test_the_features_are_transformers_llama_models(heads, dtype, length):
    reference, ours = _pair(*heads, dtype)
    ids = torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        truth = reference(input_ids=ids, use_cache=False).last_hidden_state
        features = ours(input_ids=ids, use_cache=False).last_hidden_state
    assert features.dtype == truth.dtype == dtype
    torch.testing.assert_close(features, truth, rtol=0, atol=0)  # the same operations in the same order
    assert truth.abs().max() > 0.5


def test_it_refuses_what_lumina_t2i_never_asks_of_it():
    _, ours = _pair(4, 4, torch.float32)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="attention mask"):
        ours(input_ids=ids, attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="cache"):
        ours(input_ids=ids, use_cache=True)
    with pytest.raises(ValueError, match="silu"):
        LlamaDecoderConfig.from_dict({**vars(ours.config), "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="key/value heads"):
        LlamaDecoderConfig.from_dict({**vars(ours.config), "num_key_value_heads": 3})


_LONE_GGUF_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from lumina_core import load_text_encoder
encoder = load_text_encoder(sys.argv[2], dtype=torch.float32)
features, mask = encoder.encode(["a photo of an astronaut riding a horse", ""])
torch.save({"features": features, "mask": mask}, sys.argv[3])
print(json.dumps({"model": type(encoder.model).__name__,
                  "transformers": sorted(m for m in sys.modules if m.split(".")[0] == "transformers")[:3]}))
"""


def test_a_lone_llama_gguf_is_encoded_without_transformers(tmp_path):
    folder = make_llama_folder(tmp_path / "hf", n_heads=4, n_kv_heads=2)
    (tmp_path / "lone").mkdir()
    lone = llama_cpp_gguf(folder, tmp_path / "lone" / "llama-2-7b.Q8_0.gguf", "Q8_0")  # no tokenizer files
    out = subprocess.run([sys.executable, "-c", _LONE_GGUF_CHILD, str(REPO), str(lone), str(tmp_path / "f.pt")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"model": "LlamaDecoder", "transformers": []}
    # The same features as this process, where transformers is imported (the tokenizer is the rebuilt one both
    # times; test_gguf_text holds the features to the folder's).
    saved = torch.load(tmp_path / "f.pt", weights_only=True)
    features, mask = load_text_encoder(lone, dtype=torch.float32).encode(["a photo of an astronaut riding a horse",
                                                                           ""])
    assert torch.equal(saved["mask"], mask)
    torch.testing.assert_close(saved["features"], features, rtol=0, atol=0)
