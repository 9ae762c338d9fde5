"""Route the fused attention call of chosen attention modules to a handler, for one scope.

diffusers' SD3 and DiT processors call ``F.scaled_dot_product_attention`` directly with ``(B, H, N, D)``
tensors (after the Q/K projections and any QK-norm). A :class:`torch.overrides.TorchFunctionMode` is
entered by a forward pre-hook of each chosen attention module and left by an always-called forward
hook, so only SDPA calls made INSIDE those modules, in the thread that installed the hooks, are seen,
whatever processor class is installed. Hooks are removed when the context exits, also on error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .hooks import CallHooks


@dataclass(frozen=True)
class AttentionCall:
    """One intercepted attention call: which block, and how many leading image tokens it has."""

    layer: int
    num_image_tokens: int


# handler(call, sdpa, args, kwargs) -> attention output
Handler = Callable[[AttentionCall, Callable[..., Tensor], tuple, dict], Tensor]


class _SDPARouter(TorchFunctionMode):
    def __init__(self, call: AttentionCall, handler: Handler) -> None:
        super().__init__()
        self.call = call
        self.handler = handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.handler(self.call, func, args, kwargs)
        return func(*args, **kwargs)


def _hidden_states_of(args: tuple, kwargs: dict) -> Tensor:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden is None:
        raise RuntimeError("Could not find `hidden_states` in the attention module's inputs (guidance edits need it).")
    return hidden


@contextmanager
def route_attention(modules: dict[int, nn.Module], handler: Handler) -> Iterator[None]:
    """While active, SDPA calls inside ``modules[l]`` go to ``handler(AttentionCall(l, n_img), ...)``.

    Only forward passes of the thread that entered the context are routed (see :mod:`.hooks`). On exit
    the hooks are removed first and then any mode a forward left entered is left, each step completing
    even if the other raises."""
    hooks = CallHooks()
    stack: list[_SDPARouter] = []

    def make_hooks(layer: int):
        def pre(module, args, kwargs):
            n_img = _hidden_states_of(args, kwargs).shape[1]
            router = _SDPARouter(AttentionCall(layer, n_img), handler)
            router.__enter__()
            stack.append(router)

        def post(module, args, kwargs, output):
            if stack:
                stack.pop().__exit__(None, None, None)

        return pre, post

    try:
        for layer, module in modules.items():
            pre, post = make_hooks(layer)
            hooks.pre(module, pre, with_kwargs=True)
            hooks.post(module, post, with_kwargs=True, always_call=True)
        yield
    finally:
        try:
            hooks.remove()
        finally:
            _leave_all(stack)


def _leave_all(stack: list[_SDPARouter]) -> None:
    """Leave the modes a forward left entered (only if it died between the two hooks), all of them even
    if leaving one raises."""
    error = None
    while stack:
        try:
            stack.pop().__exit__(None, None, None)
        except BaseException as exc:  # noqa: BLE001 - leave the others first
            error = error or exc
    if error is not None:
        raise error


def bind_sdpa(args: tuple, kwargs: dict) -> dict:
    """Name the arguments of an ``F.scaled_dot_product_attention`` call."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    bound.setdefault("attn_mask", None)
    bound.setdefault("dropout_p", 0.0)
    bound.setdefault("is_causal", False)
    bound.setdefault("scale", None)
    return bound
