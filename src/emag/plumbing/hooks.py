"""Forward hooks that belong to one call: they act only in the thread that installed them, and all of
them are removed when the call ends, whatever raises.

A pipeline call installs hooks on modules that other threads may run at the same time (a second
pipeline wrapping the same transformer, a plain diffusers call in a web server's worker). A hook
registered through :class:`CallHooks` passes through unchanged when it fires in another thread, so
another thread's forward pass never sees this call's edits; the calls themselves are serialised per
transformer by :mod:`emag.plumbing.exclusive`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

from torch import nn


class CallHooks:
    """Registers forward (pre-)hooks for the current thread only; :meth:`remove` removes every one of
    them even if removing one raises (the first error is re-raised afterwards)."""

    def __init__(self) -> None:
        self.owner = threading.get_ident()
        self._handles: list = []

    def _owned(self, fn: Callable) -> Callable:
        owner = self.owner

        @functools.wraps(fn)
        def hook(*args, **kwargs):
            if threading.get_ident() != owner:
                return None  # another thread's forward pass: not this call's business
            return fn(*args, **kwargs)

        return hook

    def pre(self, module: nn.Module, fn: Callable, **kwargs) -> None:
        self._handles.append(module.register_forward_pre_hook(self._owned(fn), **kwargs))

    def post(self, module: nn.Module, fn: Callable, **kwargs) -> None:
        self._handles.append(module.register_forward_hook(self._owned(fn), **kwargs))

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        error = None
        while self._handles:
            handle = self._handles.pop()
            try:
                handle.remove()
            except BaseException as exc:  # noqa: BLE001 - keep removing the others first
                error = error or exc
        if error is not None:
            raise error
