"""Step windows and the step context: one convention for every guidance method.

A window answers "is this term active at this step?" from an explicit :class:`StepContext`, never
from a call counter. The user-facing form is :class:`Window`: a HALF-OPEN interval of the schedule
``[start, stop)`` in fractions of the number of steps, i.e. step ``i`` of ``N`` is inside iff
``start <= i / N < stop``. The reference codes' own windows are kept as named, exact mappings
(:class:`SD3ReferenceWindow`, :class:`RemainingStepsWindow`, :class:`StrictWindow` for the SD3.5
reference's skip-layer guidance, :class:`GuiderWindow` for diffusers' guiders) so that published runs
are reproduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .math.ema import k2idx


@dataclass(frozen=True)
class StepContext:
    """Where the sampler is: step ``index`` (0-based) of ``num_steps``, the model time ``timestep``
    (whatever the scheduler feeds the model: 999..0 for DDPM, 1000..0 for flow matching) and the
    EDM-equivalent noise level ``sigma_edm`` (None when unknown)."""

    index: int
    num_steps: int
    timestep: float = 0.0
    sigma_edm: float | None = None
    param: Any = None  # emag.parametrization.FlowMatching / EpsilonVP of this step, when known

    @property
    def remaining(self) -> int:
        """Steps remaining after this one, ``N - 1 - i`` (the reference codes count this way)."""
        return self.num_steps - 1 - self.index

    @property
    def progress(self) -> float:
        """``i / N``, the fraction of the schedule already done."""
        return self.index / self.num_steps


@runtime_checkable
class StepWindow(Protocol):
    def contains(self, ctx: StepContext) -> bool: ...

    def describe(self) -> str: ...


def window_steps(window: StepWindow, num_steps: int) -> list[int]:
    """The step indices of an ``num_steps``-step schedule at which ``window`` is active."""
    return [i for i in range(num_steps) if window.contains(StepContext(i, num_steps))]


@dataclass(frozen=True)
class Window:
    """Half-open fraction window ``[start, stop)``: step ``i`` of ``N`` is active iff ``start <= i/N < stop``.

    ``Window(0, 1)`` is every step. Comparisons tolerate 1e-9 of float error, so ``Window(0.3, 1)``
    at ``N = 10`` starts exactly at step 3.
    """

    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        _check_fractions(self.start, self.stop)

    def first_last(self, num_steps: int) -> tuple[int, int]:
        """``(first, end)`` step indices, ``end`` exclusive."""
        return math.ceil(self.start * num_steps - 1e-9), math.ceil(self.stop * num_steps - 1e-9)

    def contains(self, ctx: StepContext) -> bool:
        first, end = self.first_last(ctx.num_steps)
        return first <= ctx.index < end

    def describe(self) -> str:
        return f"steps i with {self.start:g} <= i/N < {self.stop:g}"


def _check_fractions(start: float, stop: float) -> None:
    for name, v in (("start", start), ("stop", stop)):
        if not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"Expected `{name}` to be a fraction between 0.0 and 1.0, but got {v!r}.")
    if start > stop:
        raise ValueError(f"Expected `start` <= `stop`, but got start={start}, stop={stop}.")


@dataclass(frozen=True)
class StrictWindow:
    """``N * start < i < N * stop``, strict on both sides (docs/method.md section 6.4): the
    SD3.5 reference's and diffusers' SD3 pipeline's skip-layer-guidance window, evaluated exactly as
    they write it (``i > N * start and i < N * stop``, floats)."""

    start: float = 0.0
    stop: float = 1.0

    def __post_init__(self) -> None:
        _check_fractions(self.start, self.stop)

    def contains(self, ctx: StepContext) -> bool:
        return ctx.index > ctx.num_steps * self.start and ctx.index < ctx.num_steps * self.stop

    def describe(self) -> str:
        return f"steps i with N*{self.start:g} < i < N*{self.stop:g}"


@dataclass(frozen=True)
class GuiderWindow:
    """diffusers' guiders (docs/method.md section 6.4): ``int(start * N) <= i < int(stop * N)``;
    ``strict_start=True`` is their perturbation guiders' (SLG, PAG, SEG) ``int(start * N) < i``."""

    start: float = 0.0
    stop: float = 1.0
    strict_start: bool = False

    def __post_init__(self) -> None:
        _check_fractions(self.start, self.stop)

    def contains(self, ctx: StepContext) -> bool:
        first, end = int(self.start * ctx.num_steps), int(self.stop * ctx.num_steps)
        return (first < ctx.index if self.strict_start else first <= ctx.index) and ctx.index < end

    def describe(self) -> str:
        op = "<" if self.strict_start else "<="
        return f"steps i with int({self.start:g}*N) {op} i < int({self.stop:g}*N)"


@dataclass(frozen=True)
class RemainingStepsWindow:
    """Absolute window on steps REMAINING, ``lo <= N - 1 - i <= hi`` (inclusive): the DiT reference.

    The reference DiT sampler counts ``curr = 249 .. 0`` over its 250-step schedule and never rescales
    its windows: with 50 steps or fewer, ``RemainingStepsWindow(50, 150)`` is never active.
    """

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.lo < 0 or self.hi < self.lo:
            raise ValueError(f"Expected 0 <= lo <= hi, but got lo={self.lo}, hi={self.hi}.")

    def contains(self, ctx: StepContext) -> bool:
        return self.lo <= ctx.remaining <= self.hi

    def describe(self) -> str:
        return f"{self.lo} <= steps remaining <= {self.hi}"


@dataclass(frozen=True)
class SD3ReferenceWindow:
    """The SD3 reference window in units of a 250-step schedule, mapped with :func:`k2idx`.

    With ``s = N - 1 - i`` steps remaining: active iff ``k2idx(stop) <= s <= k2idx(start) - k2idx(delta)``
    (docs/method.md section 6.2). The EMA window is ``(start=250, stop=50, delta=0)``; the replacement window is
    ``(250, 50, delta=50)``. At N = 28 they are steps 0..22 and 5..22.
    """

    start: float = 250.0
    stop: float = 50.0
    delta: float = 0.0
    base: float = 250.0

    def bounds(self, num_steps: int) -> tuple[int, int]:
        lo = k2idx(self.stop, num_steps, self.base)
        hi = k2idx(self.start, num_steps, self.base) - k2idx(self.delta, num_steps, self.base)
        return lo, hi

    def contains(self, ctx: StepContext) -> bool:
        lo, hi = self.bounds(ctx.num_steps)
        return lo <= ctx.remaining <= hi

    def describe(self) -> str:
        return (f"k2idx({self.stop:g}) <= steps remaining <= k2idx({self.start:g}) - k2idx({self.delta:g})"
                f" (units of a {self.base:g}-step schedule)")


@dataclass(frozen=True)
class SigmaInterval:
    """Active iff ``lo < sigma_EDM <= hi`` (Kynkäänniemi et al. 2024, the guidance interval, Eqs. 5-6).

    ``sigma_EDM = sqrt((1 - abar) / abar)`` for VP models and ``t / (1 - t)`` for rectified flow
    (so ``(0.28, 5.42]`` is ``t`` in ``(0.219, 0.844]`` on SD3). Decided per step from the step's own
    noise level, so the interval always falls on step boundaries.
    """

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not (0.0 <= self.lo < self.hi):
            raise ValueError(f"Expected 0 <= lo < hi for a sigma interval, got ({self.lo}, {self.hi}].")

    def contains(self, ctx: StepContext) -> bool:
        if ctx.sigma_edm is None:
            raise ValueError("This step has no EDM noise level: a sigma interval needs the pipeline's scheduler.")
        return self.lo < ctx.sigma_edm <= self.hi

    def describe(self) -> str:
        return f"{self.lo:g} < sigma_EDM <= {self.hi:g}"


@dataclass(frozen=True)
class AllSteps:
    def contains(self, ctx: StepContext) -> bool:
        return True

    def describe(self) -> str:
        return "every step"


def as_window(value: object, what: str) -> StepWindow:
    """Accept a window object or a ``(start, stop)`` pair of fractions."""
    if isinstance(value, StepWindow):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return Window(float(value[0]), float(value[1]))
    raise TypeError(f"`{what}` must be a Window, a (start, stop) pair of fractions, or None; got {value!r}.")
