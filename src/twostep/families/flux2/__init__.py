"""FLUX.2 klein (``black-forest-labs/FLUX.2-klein-4B``, diffusers ``Flux2KleinPipeline``) as a model family."""
