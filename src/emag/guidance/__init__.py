"""Guidance methods as composable terms: ``pipe(..., guidance=[emag.CFG(7.0), emag.EMAG(scale=1.5)])``.

One module per method (EMAG: the :mod:`.emag` subpackage), each a small config dataclass (what users
write) and a runtime (the per-call state); ``base`` is the contract they follow, ``call`` decides a
call from their declarations, ``registry`` names them for the command line.
"""

from __future__ import annotations

from .apg import APG
from .autoguidance import Autoguidance
from .base import Branch, GuidanceConfig, Setup, TermRuntime
from .cads import CADS
from .cfg import CFG, CFGZeroStar
from .emag import EMAG
from .erg import ERG
from .pag import PAG
from .s2 import S2
from .sag import SAG
from .seg import SEG
from .slg import SLG, STG
from .tpg import TPG

__all__ = [
    "APG", "Autoguidance", "Branch", "CADS", "CFG", "CFGZeroStar", "EMAG", "ERG", "GuidanceConfig", "PAG", "S2",
    "SAG", "SEG", "SLG", "STG", "Setup", "TPG", "TermRuntime",
]
