"""The text encoders: the shared Hugging Face folder loader and one small module per encoder."""
