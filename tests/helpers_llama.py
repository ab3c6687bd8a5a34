"""Tiny Hugging Face LLaMA folders for tests (the builders live in lumina_core.tiny, shared with the demo)."""

from lumina_core.tiny import TINY_VOCAB_SIZE, make_tiny_llama_folder, make_tiny_tokenizer, tiny_llama_config

__all__ = [
    "TINY_VOCAB_SIZE",
    "llama2_hf_config_json",
    "make_tiny_llama_folder",
    "make_tiny_tokenizer",
    "tiny_llama_config",
]


def llama2_hf_config_json(*, hidden_size, intermediate_size, num_attention_heads, num_hidden_layers, vocab_size):
    """config.json with the keys meta-llama/Llama-2-7b-hf publishes (written by transformers 4.31), any shape."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_attention_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.31.0.dev0",
        "use_cache": True,
        "vocab_size": vocab_size,
    }
