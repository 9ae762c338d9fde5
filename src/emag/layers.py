"""One syntax for transformer block selections, shared by every method.

Accepted forms: an int (``7``), a sequence of ints (``[6, 7, 8]``) or a string with comma-separated
indices and inclusive ranges (``"6,7,8"``, ``"6-8"``, ``"2,12-15"``). Indices are whole block numbers
into the model's block list, never substrings of module names, so ``"1"`` can never match block 10.
In a model with several block lists (Flux: ``double`` and ``single``) each index is written with its
list, ``"double:10-12,single:5-7"`` (a :class:`BlockRef` each); the model family turns them into block
positions (:meth:`emag.families.ModelFamily.resolve_layers`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class BlockRef:
    """A block addressed within a named block list (``double:10``)."""

    list: str
    index: int

    def __str__(self) -> str:
        return f"{self.list}:{self.index}"


LayerSpec = int | str | Sequence[int] | Sequence[BlockRef]

_TOKEN = re.compile(r"^\s*(?:([A-Za-z_]\w*)\s*:\s*)?(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_layers(spec: LayerSpec) -> tuple[int, ...] | tuple[BlockRef, ...]:
    """Parse a block selection into sorted, unique, non-negative block indices (or, where the lists are
    named, ``list:index`` references; a selection uses one form)."""
    if isinstance(spec, bool):
        raise TypeError(f"Layers must be ints or a string like '6,7,8' or '6-8', got {spec!r}.")
    if isinstance(spec, int):
        items = [spec]
    elif isinstance(spec, str):
        items = []
        named = None
        for token in spec.split(","):
            m = _TOKEN.match(token)
            if not m:
                raise ValueError(f"Cannot parse layer selection {spec!r}: expected e.g. '6,7,8' or '6-8' or '2,12-15' "
                                 "(or, in a model with named block lists, 'double:10-12,single:5-7').")
            name, lo = m.group(1), int(m.group(2))
            hi = int(m.group(3)) if m.group(3) is not None else lo
            if hi < lo:
                raise ValueError(f"Layer range {token.strip()!r} in {spec!r} is empty (end before start).")
            if named is not None and named != (name is not None):
                raise ValueError(f"Layer selection {spec!r} mixes named ('list:index') and plain indices: use one form.")
            named = name is not None
            items.extend(BlockRef(name, i) if named else i for i in range(lo, hi + 1))
    else:
        try:
            items = list(spec)
        except TypeError:
            raise TypeError(f"Layers must be ints or a string like '6,7,8' or '6-8', got {spec!r}.") from None
        for x in items:
            if not isinstance(x, BlockRef) and (isinstance(x, bool) or not isinstance(x, int)):
                raise TypeError(f"Layer indices must be ints, got {x!r} in {spec!r}.")
        if len({isinstance(x, BlockRef) for x in items}) > 1:
            raise ValueError(f"Layer selection {spec!r} mixes named ('list:index') and plain indices: use one form.")
    if not items:
        raise ValueError("The layer selection is empty: give at least one block index.")
    for x in items:
        if (x.index if isinstance(x, BlockRef) else x) < 0:
            raise ValueError(f"Layer indices must be >= 0, got {x} in {spec!r}.")
    return tuple(sorted(set(items)))


def format_layers(layers: Sequence[int] | Sequence[BlockRef]) -> str:
    return ",".join(str(l) for l in layers)
