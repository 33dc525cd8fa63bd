"""The engine: the Turbo++ distillation method and its loop, independent of what is distilled.

``flow`` fixes the conventions (σ = 1 is noise, ``v = ε - x``, Turbo schedule, Euler sampler); ``student`` and
``discriminator`` are the K-step student and the heads on frozen teacher features; ``recipe`` holds the losses;
``train`` runs the loop (optimizers, D:G schedule, EMA, logs, checkpoints); ``teacher_data`` caches teacher
trajectories from any velocity function; ``checkpoint`` saves weights and training state. It sees networks only
through the ``backbone.Backbone`` protocol and data only through a ``TeacherSource`` and the cache, so it imports
nothing from ``families/``, ``real/`` or ``offline/``; they plug in around it (``offline/distill.py`` for digits
and detail, ``real/train.py`` for a real pipeline of any family).
"""
