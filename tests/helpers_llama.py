"""Tiny Hugging Face LLaMA folders for tests (the builders live in lumina_core.tiny, shared with the demo)."""

from lumina_core.tiny import TINY_VOCAB_SIZE, make_tiny_llama_folder, make_tiny_tokenizer, tiny_llama_config

__all__ = ["TINY_VOCAB_SIZE", "make_tiny_llama_folder", "make_tiny_tokenizer", "tiny_llama_config"]
