"""The real Z-Image world: diffusers pipeline folders, cached Qwen3 embeddings, teacher latents, training.

It plugs into the engine (``twostep.engine``) the way ``distill.py`` does for the offline worlds.
"""
