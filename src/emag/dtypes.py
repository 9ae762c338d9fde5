"""Floating dtypes by name: one table for the EMA storage dtype and the command line's ``--dtype``."""

from __future__ import annotations

from typing import Any

import torch

# name (and common aliases) -> dtype
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}
# what a model can run in (the command line's --dtype choices)
MODEL_DTYPES = ("float32", "float16", "bfloat16")


def parse_float_dtype(value: Any, what: str) -> torch.dtype | None:
    """None, a name from :data:`FLOAT_DTYPES` or one of the floating torch dtypes it names; ``what`` names
    the argument in errors."""
    if value is None:
        return value
    if isinstance(value, torch.dtype):
        if value not in FLOAT_DTYPES.values():
            raise ValueError(f"`{what}` must be a floating dtype (torch.float16, torch.bfloat16, torch.float32 or "
                             f"torch.float64), got {value}.")
        return value
    if isinstance(value, str) and value.lower() in FLOAT_DTYPES:
        return FLOAT_DTYPES[value.lower()]
    raise ValueError(f"Unknown `{what}` {value!r}; expected one of {sorted(set(FLOAT_DTYPES))} or a floating "
                     "torch.dtype.")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
