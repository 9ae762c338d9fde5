"""Warnings that point at the user's line: the first caller outside this package (and torch's
``no_grad`` wrapper), however deep in a pipeline call they are raised."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_WRAPPERS = (os.path.join("torch", "utils", "_contextlib.py"),)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` with the stack level of the first frame outside emag."""
    level, frame = 2, sys._getframe(1)  # level 1 is this function
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not (name.startswith(_PACKAGE) or name.endswith(_WRAPPERS)):
            break
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
