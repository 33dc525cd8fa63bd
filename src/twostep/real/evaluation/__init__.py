"""Real-model evaluation: ``twostep evaluate`` (:mod:`.run`) and evaluation during training (:mod:`.training`).

Light on import: the metric libraries and models load inside the functions that use them.
"""
