"""One syntax for transformer block selections, shared by every method.

Accepted forms: an int (``7``), a sequence of ints (``[6, 7, 8]``) or a string with comma-separated
indices and inclusive ranges (``"6,7,8"``, ``"6-8"``, ``"2,12-15"``). Indices are whole block numbers
into the model's block list, never substrings of module names, so ``"1"`` can never match block 10.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LayerSpec = int | str | Sequence[int]

_TOKEN = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(spec: LayerSpec) -> tuple[int, ...]:
    """Parse a block selection into sorted, unique, non-negative block indices."""
    if isinstance(spec, bool):
        raise TypeError(f"Layers must be ints or a string like '6,7,8' or '6-8', got {spec!r}.")
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        items = []
        for token in spec.split(","):
            m = _TOKEN.match(token)
            if not m:
                raise ValueError(f"Cannot parse layer selection {spec!r}: expected e.g. '6,7,8' or '6-8' or '2,12-15'.")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ValueError(f"Layer range {token.strip()!r} in {spec!r} is empty (end before start).")
            items.extend(range(lo, hi + 1))
    else:
        try:
            items = list(spec)
        except TypeError:
            raise TypeError(f"Layers must be ints or a string like '6,7,8' or '6-8', got {spec!r}.") from None
        for x in items:
            if isinstance(x, bool) or not isinstance(x, int):
                raise TypeError(f"Layer indices must be ints, got {x!r} in {spec!r}.")
    if not items:
        raise ValueError("The layer selection is empty: give at least one block index.")
    for x in items:
        if x < 0:
            raise ValueError(f"Layer indices must be >= 0, got {x} in {spec!r}.")
    return tuple(sorted(set(items)))


def check_layers_in_range(layers: Sequence[int], num_blocks: int, model_name: str) -> None:
    """Raise a clear error when a block index does not exist in the model."""
    bad = [l for l in layers if l >= num_blocks]
    if bad:
        raise ValueError(
            f"Layer(s) {bad} out of range: {model_name} has {num_blocks} transformer blocks "
            f"(valid indices 0-{num_blocks - 1})."
        )


def format_layers(layers: Sequence[int]) -> str:
    return ",".join(str(l) for l in layers)
