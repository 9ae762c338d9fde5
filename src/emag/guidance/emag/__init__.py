"""EMAG, Exponential Moving Average Guidance (Yadav, Huy, Liu, ECCV 2026, arXiv 2512.17303), as a guidance
term: ``config`` (the :class:`EMAG` object and the presets), ``settings`` (its defaults resolved for one
model), ``protocols`` (the per-family update protocols of the published numbers), ``state`` (the per-call
EMA, score, block choice and storage), ``edits`` (the attention edits that feed and apply the EMA) and
``runtime`` (the term in a call). The method is described in docs/method.md.
"""

from .config import EMAG, PRESETS, Preset, check_preset_family, get_preset
from .runtime import EMAGRuntime, StepRecord
from .settings import (
           COMBINATIONS,
           EMA_STORAGES,
           TRACKED_ROWS,
           VARIANTS,
           ResolvedEMAG,
           resolve,
)

__all__ = ["COMBINATIONS", "EMAG", "EMAGRuntime", "EMA_STORAGES", "PRESETS", "Preset", "ResolvedEMAG", "StepRecord",
           "TRACKED_ROWS", "VARIANTS", "check_preset_family", "get_preset", "resolve"]
