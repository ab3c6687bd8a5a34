"""Latent conventions and VAE decoding outside ComfyUI."""
