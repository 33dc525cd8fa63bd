"""Floating-point dtypes by the names configs use (``float32``, ``bfloat16``, ``float16``)."""

from __future__ import annotations

import torch

from twostep.core.errors import TwostepError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise TwostepError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]
