"""Guidance methods as composable terms: ``pipe(..., guidance=[emag.CFG(7.0), emag.EMAG(scale=1.5)])``."""

from __future__ import annotations

from typing import Any

from .apg import APG
from .base import Branch, GuidanceConfig, Setup, TermRuntime
from .cads import CADS
from .cfg import CFG, CFGZeroStar
from .pag import PAG
from .slg import SLG, STG


def needs_negative(term: Any) -> bool:
    """Whether ``term`` can use the unconditional (negative) prediction in some step."""
    fn = getattr(term, "needs_negative", None)
    if callable(fn):
        return bool(fn())
    if isinstance(term, (CFG, CFGZeroStar)):
        return term.scale != 1.0 if isinstance(term, CFG) else True
    if type(term).__name__ == "EMAG":
        return term.combination == "additive"
    return False


__all__ = ["APG", "CADS", "Branch", "CFG", "CFGZeroStar", "PAG", "SLG", "STG", "GuidanceConfig", "Setup", "TermRuntime", "needs_negative"]
