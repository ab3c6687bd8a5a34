"""The Lumina DiTs as PyTorch modules: configurations, stateless maths, the shared parts, one file per DiT."""
