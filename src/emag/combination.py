"""The combination of one step's branch predictions into the guided prediction.

In the order of the composition contract (docs/guidance.md, how terms compose): the refine terms
rewrite the conditional prediction, the uncond terms replace the unconditional one, the CFG-like base
term combines them, the additive terms add their differences, the base term's post-processing (CFG
rescale) follows; the guided channels replace the conditional prediction's (the rest, e.g. DiT's learned
variance, stay). Terms combine in the model's native output space, or in x0 space when an active term
asks for it (or always, ``combine_space="x0"``); a term whose result depends on the space computes in
its own and is converted (docs/guidance.md, output spaces).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .guidance.base import TermRuntime
from .math.combine import merge_guided_channels
from .windows import StepContext

COMBINE_SPACES = ("auto", "x0")


class Predictions(Mapping):
    """Branch predictions of one step in the combine space, plus what terms may need to convert."""

    def __init__(self, preds: dict[str, Tensor], inputs: dict[str, Tensor], x: Tensor, space: str, param: Any,
                 channels: int, native: dict[str, Tensor] | None = None) -> None:
        self._preds, self.inputs, self.x, self.space, self.param, self.channels = preds, inputs, x, space, param, channels
        self._native = preds if native is None and space == "native" else native
        self._other: dict[str, Predictions] = {}  # converted copies (never self: no reference cycle)

    def in_space(self, space: str) -> "Predictions":
        """The same branch predictions in ``space`` (``"native"`` or ``"x0"``), converted from the model's
        outputs with each branch's own input."""
        if space == self.space:
            return self
        if space not in self._other:
            if self._native is None:
                raise RuntimeError("These predictions were built without the native outputs.")
            preds = {name: self.param.to_x0(self.inputs.get(name, self.x)[:, :self.channels], eps) if space == "x0"
                     else eps for name, eps in self._native.items()}
            self._other[space] = Predictions(preds, self.inputs, self.x, space, self.param, self.channels, self._native)
        return self._other[space]

    def __getitem__(self, name: str) -> Tensor:
        return self._preds[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._preds)

    def __len__(self) -> int:
        return len(self._preds)


def _convert(t: Tensor | None, frm: str, to: str, x: Tensor, param: Any, delta: bool = False) -> Tensor | None:
    """A prediction (or, ``delta=True``, a difference of predictions) at input ``x`` from space ``frm``
    to space ``to``: the affine map between the model's native output and x0 (its linear part for a
    difference)."""
    if t is None or frm == to:
        return t
    f = param.to_x0 if to == "x0" else param.from_x0
    return f(x, t) - f(x, torch.zeros_like(t)) if delta else f(x, t)


class Combination:
    """One step's combination: the predictions in the combine space and the terms that combine them."""

    def __init__(self, active: Sequence[TermRuntime], p: Predictions, x: Tensor, ctx: StepContext) -> None:
        self.active, self.p, self.x, self.ctx = active, p, x, ctx
        self.base = next((r for r in active if r.kind == "base"), None)

    def run(self, term: TermRuntime, fn: Callable, *tensors: Tensor | None, delta: bool = False,
            own: str | None = None) -> Tensor:
        """``fn(p, *tensors)`` in the space ``term`` computes in (its own when its result depends on the
        space; ``own`` overrides it), converted from and back to the combine space."""
        space, param = self.p.space, self.ctx.param
        own = own or (term.space if term.space_sensitive else space)
        if own == space:
            return fn(self.p, *tensors)
        out = fn(self.p.in_space(own), *(_convert(t, space, own, self.x, param) for t in tensors))
        return _convert(out, own, space, self.x, param, delta=delta)

    def governing(self, term: TermRuntime) -> TermRuntime:
        """The term whose space a refine / additive term is computed in: a space-sensitive base term that
        reshapes the others (APG) governs them."""
        return self.base if self.base is not None and self.base.space_sensitive else term

    def refined(self, c: Tensor) -> Tensor:
        """The refine terms applied to the conditional prediction, in order (EMAG nested: ``c'``)."""
        base, ctx = self.base, self.ctx
        for r in self.active:
            if r.kind == "refine":
                fn = (lambda q, t, r=r: base.apply_refine(r, t, q, ctx)) if base is not None else \
                    (lambda q, t, r=r: r.refine(t, q, ctx))
                c = self.run(self.governing(r), fn, c)
        return c

    def uncond(self) -> Tensor | None:
        """The unconditional prediction, replaced by an uncond term's (ERG, autoguidance) if any."""
        u = self.p.get("uncond")
        for r in self.active:
            if r.kind == "uncond":
                u = self.run(r, lambda q, r=r: r.replace_uncond(q, self.ctx))
        return u

    def with_additive(self, guided: Tensor, c: Tensor) -> Tensor:
        """``guided`` plus each additive term's difference (``s (c - p)``)."""
        base, ctx = self.base, self.ctx
        for r in self.active:
            if r.kind == "additive":
                fn = (lambda q, t, r=r: base.apply_delta(r, t, q, ctx)) if base is not None else \
                    (lambda q, t, r=r: r.delta(t, q, ctx))
                guided = guided + self.run(self.governing(r), fn, c, delta=True)
        return guided

    def guided(self) -> Tensor | None:
        """The guided prediction in the combine space (None: CFG-Zero*'s zero-init, a zero output)."""
        base, ctx = self.base, self.ctx
        c = self.p["cond"]
        refined = self.refined(c)
        u = self.uncond()
        guided = self.run(base, lambda q, t, v: base.combine(t, v, q, ctx), refined, u) if base is not None else refined
        guided = self.with_additive(guided, c)
        if base is not None:
            guided = self.run(base, lambda q, g, t: base.post(g, t, ctx), guided, c, own=base.post_space)
            if base.zero_output(ctx):
                # CFG-Zero*'s zero-init: the step's whole output is zero, the other terms included; they were
                # still evaluated (their per-step state and RNG streams advance)
                return None
        return guided


def combine_space(active: Sequence[TermRuntime], ctx: StepContext, combine_space: str) -> str:
    """``"x0"`` when an active term asks for it or the call does, else ``"native"`` (nothing active: the
    conditional prediction itself, no round trip through x0 space)."""
    space = "x0" if active and (combine_space == "x0" or any(r.space == "x0" for r in active)) else "native"
    spaces = {space} | {r.space for r in active if r.space_sensitive} | {r.post_space for r in active if r.post_space}
    if spaces != {"native"} and ctx.param is None:
        raise ValueError("Combining in x0 space needs the step's parametrisation (scheduler not supported).")
    return space


def combine(active: Sequence[TermRuntime], outputs: dict[str, Tensor], inputs: dict[str, Tensor], x: Tensor,
            ctx: StepContext, channels: int, guided_channels: int, space_policy: str) -> Tensor:
    """The guided prediction of a step with every output channel: the guided ones from the combination,
    the rest from the conditional branch."""
    ch = channels
    space = combine_space(active, ctx, space_policy)
    native = {name: out[:, :ch] for name, out in outputs.items()}
    p = Predictions(native, inputs, x, "native", ctx.param, ch).in_space(space)
    guided = Combination(active, p, x[:, :ch], ctx).guided()
    if guided is None:
        return torch.zeros_like(outputs["cond"])
    if space == "x0":
        guided = ctx.param.from_x0(x[:, :ch], guided)
    if guided is outputs["cond"][:, :ch] and guided_channels == ch and outputs["cond"].shape[1] == ch:
        return outputs["cond"]
    return merge_guided_channels(guided, outputs["cond"], guided_channels)


__all__ = ["COMBINE_SPACES", "Combination", "Predictions", "combine"]
