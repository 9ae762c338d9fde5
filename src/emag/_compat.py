"""Version-specific shims, kept in one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers.utils import logging as transformers_logging


@contextlib.contextmanager
def quiet_transformers_import() -> Iterator[None]:
    """transformers 5.x warns at import time that optional image processors want torchvision, which
    SD3 text-to-image never uses; keep those import-time warnings out of our users' logs."""
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)
