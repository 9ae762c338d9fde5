"""Guidance methods as composable terms: ``pipe(..., guidance=[emag.CFG(7.0), emag.EMAG(scale=1.5)])``."""

from __future__ import annotations

from typing import Any

from .apg import APG
from .autoguidance import Autoguidance
from .base import Branch, GuidanceConfig, Setup, TermRuntime
from .cads import CADS
from .cfg import CFG, CFGZeroStar
from .erg import ERG
from .pag import PAG
from .s2 import S2
from .sag import SAG
from .seg import SEG
from .slg import SLG, STG
from .tpg import TPG


def needs_negative(term: Any) -> bool:
    """Whether ``term`` can use the unconditional (negative) prediction in some step."""
    fn = getattr(term, "needs_negative", None)
    if callable(fn):
        return bool(fn())
    if isinstance(term, CFGZeroStar):
        return True
    if type(term).__name__ == "EMAG":
        return term.combination == "additive"
    return False


__all__ = [
    "APG", "Autoguidance", "Branch", "CADS", "CFG", "CFGZeroStar", "ERG", "GuidanceConfig", "PAG", "S2", "SAG", "SEG",
    "SLG", "STG", "Setup", "TPG", "TermRuntime", "needs_negative",
]
