"""Pure tensor math: no modules, no hooks, no state.

Every function here implements one equation of the EMAG paper (arXiv 2512.17303) or of a guidance
method it is compared with, and is unit-tested in isolation.
"""

from .combine import cfg, emag_additive, emag_nested, emag_only, merge_guided_channels
from .ema import (
    attention_probs,
    blend,
    ema_deviation_sums,
    ema_score,
    ema_score_per_row,
    ema_update_,
    head_chunks,
    k2idx,
    renormalize_rows,
    row_entropy,
)
from .selection import select_layers

__all__ = [
    "attention_probs",
    "blend",
    "cfg",
    "ema_deviation_sums",
    "head_chunks",
    "ema_score",
    "ema_score_per_row",
    "ema_update_",
    "emag_additive",
    "emag_nested",
    "emag_only",
    "k2idx",
    "merge_guided_channels",
    "renormalize_rows",
    "row_entropy",
    "select_layers",
]
