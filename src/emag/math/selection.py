"""Per-step layer choice among the EMAG candidate blocks (docs/method.md section 4).

Modes, with the reference code's numbers in brackets:
- ``"all"`` [0]: perturb every candidate at once.
- ``"adaptive"`` [2, default]: the single candidate with the largest score ``D = mean|E - R|``.
- ``"entropy"`` [1]: the candidate whose attention has the lowest (batch-median) mean row entropy.
- ``"entropy_adaptive"`` [3]: among the ``top_k`` (default 5) lowest-entropy candidates, the largest D.

Ties always go to the lowest block index (the reference sorts a block-ordered list with a stable
sort). When no candidate has a statistic yet, all candidates are perturbed (the reference fallback).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

SELECTION_MODES = ("adaptive", "all", "entropy", "entropy_adaptive")


def _argmax_first(values: Mapping[int, float], order: Sequence[int]) -> int:
    """The key of the largest value; ties go to the key that comes first in ``order``."""
    best = None
    for layer in order:
        if best is None or values[layer] > values[best]:
            best = layer
    assert best is not None
    return best


def _argmin_first(values: Mapping[int, float], order: Sequence[int]) -> int:
    return _argmax_first({k: -v for k, v in values.items()}, order)


def select_layers(
    candidates: Sequence[int],
    scores: Mapping[int, float | None],
    entropies: Mapping[int, float | None] | None = None,
    mode: str = "adaptive",
    top_k: int = 5,
) -> list[int]:
    """Choose which candidate block(s) to perturb this step, globally for the whole batch.

    ``scores`` / ``entropies`` map a block index to its batch-median statistic, or ``None`` when the
    block has not been observed yet. ``candidates`` must be in increasing block order.
    """
    order = list(candidates)
    if mode == "all":
        return order
    if mode not in SELECTION_MODES:
        raise ValueError(f"Unknown selection mode {mode!r}; expected one of {SELECTION_MODES}.")
    scored = {l: float(scores[l]) for l in order if scores.get(l) is not None}
    if mode == "adaptive":
        return [_argmax_first(scored, [l for l in order if l in scored])] if scored else order
    ent = {l: float(entropies[l]) for l in order if entropies and entropies.get(l) is not None}
    if not ent:
        return order
    if mode == "entropy":
        return [_argmin_first(ent, [l for l in order if l in ent])]
    # entropy_adaptive: stable ascending sort by entropy, keep top_k, then the largest score,
    # ties to the lowest block index.
    lowest = sorted((l for l in order if l in ent), key=lambda l: ent[l])[:top_k]
    pool = [l for l in order if l in lowest and l in scored]
    return [_argmax_first(scored, pool)] if pool else order


def select_layers_per_row(
    candidates: Sequence[int],
    row_scores: Mapping[int, Tensor | None],
    row_entropies: Mapping[int, Tensor | None] | None = None,
    mode: str = "adaptive",
    top_k: int = 5,
    batch_size: int | None = None,
) -> dict[int, Tensor]:
    """Opt-in per-sample variant of :func:`select_layers`: each batch row chooses its own block.

    ``row_scores[l]`` is a ``[B]`` tensor of per-row scores. Returns ``{layer: bool mask [B]}`` for
    every candidate (a mask may be all False). Rows apply exactly the rule of :func:`select_layers`
    to their own statistics.
    """
    stats = [t for t in list(row_scores.values()) + list((row_entropies or {}).values()) if t is not None]
    if batch_size is None:
        if not stats:
            raise ValueError("batch_size is required when no statistic has been observed yet.")
        batch_size = int(stats[0].shape[0])
    masks = {l: torch.zeros(batch_size, dtype=torch.bool) for l in candidates}
    for row in range(batch_size):
        s = {l: (None if row_scores.get(l) is None else float(row_scores[l][row])) for l in candidates}
        e = None
        if row_entropies is not None:
            e = {l: (None if row_entropies.get(l) is None else float(row_entropies[l][row])) for l in candidates}
        for layer in select_layers(candidates, s, e, mode, top_k):
            masks[layer][row] = True
    return masks
