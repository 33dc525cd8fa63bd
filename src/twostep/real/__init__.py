"""The real Z-Image path: diffusers pipeline folders, cached Qwen3 embeddings, teacher latents, training."""
