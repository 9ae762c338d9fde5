"""One call at a time per transformer, and per-thread call results.

Two threads may call pipelines that share one transformer (the same pipeline, or two ``from_pipe``
wrappers, which also share the scheduler). A guided call installs hooks on the transformer and keeps
per-call state (EMA, scheduler timesteps), so concurrent calls are serialised: the second one waits
until the first returns, then runs exactly as it would alone. The hooks themselves act only in the
thread that installed them (:mod:`emag.plumbing.hooks`), so a plain diffusers call running meanwhile in
another thread is unaffected. A call made from inside a running call on the same transformer in the
same thread (e.g. from its ``callback_on_step_end``) would deadlock or mix the two calls' edits and is
refused with :class:`PipelineBusyError`.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from weakref import WeakKeyDictionary

from torch import nn

logger = logging.getLogger("emag")


class PipelineBusyError(RuntimeError):
    """A pipeline was called again from inside a running call on the same transformer in the same thread."""


class _Owner:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: int | None = None


_owners: WeakKeyDictionary[nn.Module, _Owner] = WeakKeyDictionary()
_owners_lock = threading.Lock()


@contextmanager
def exclusive(model: nn.Module) -> Iterator[None]:
    """Hold ``model`` for one call: wait while another thread holds it; refuse a re-entrant call."""
    with _owners_lock:
        owner = _owners.get(model)
        if owner is None:
            owner = _owners[model] = _Owner()
    me = threading.get_ident()
    if owner.thread == me:
        raise PipelineBusyError(
            f"This {type(model).__name__} is already running a pipeline call in this thread (a pipeline called "
            "from its own callback?). Calls on one transformer run one at a time; make the second call after the "
            "first returns, or on another copy of the model.")
    if not owner.lock.acquire(blocking=False):
        logger.info("Waiting for another thread's call on this %s to finish (calls on one transformer run one at "
                    "a time).", type(model).__name__)
        owner.lock.acquire()
    owner.thread = me
    try:
        yield
    finally:
        owner.thread = None
        owner.lock.release()


def one_call_at_a_time(call: Callable) -> Callable:
    """Decorate a pipeline's ``__call__``: the call holds its transformer (:func:`exclusive`)."""

    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        with exclusive(self.transformer):
            return call(self, *args, **kwargs)

    return wrapper


class PerThread:
    """A pipeline attribute with one value per thread: after a call, each thread reads what its own last
    call set (``pipe.emag_trace`` is the calling thread's trace, never another thread's)."""

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def _local(self, obj) -> threading.local:
        local = obj.__dict__.get("_emag_per_thread")
        if local is None:
            local = obj.__dict__.setdefault("_emag_per_thread", threading.local())
        return local

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return getattr(self._local(obj), self.name, None)

    def __set__(self, obj, value) -> None:
        setattr(self._local(obj), self.name, value)
