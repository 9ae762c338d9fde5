"""Version-specific shims, kept in one place."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def quiet_transformers_import():
    """transformers 5.x warns at import time that optional image processors want torchvision, which
    SD3 text-to-image never uses; keep those import-time warnings out of our users' logs."""
    try:
        from transformers.utils import logging as tlog
    except Exception:  # pragma: no cover - transformers missing
        yield
        return
    previous = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(previous)
