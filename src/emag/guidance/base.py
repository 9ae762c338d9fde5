"""The composition contract every guidance method follows (docs/guidance.md, composition).

A method is a small frozen **config** dataclass (what the user writes: ``PAG(3.0, layers=[13])``) whose
``runtime(setup)`` builds a **runtime** owning the per-call state (EMA, momentum buffers, RNGs). At
each step the engine asks every active runtime which extra **branches** it needs (and which edits it
attaches to the shared ``cond`` / ``uncond`` branches), evaluates all branches, then combines:

1. ``refine``   terms rewrite the conditional prediction (EMAG nested: ``c' = c + (w_e - 1)(c - c_e)``);
2. ``uncond``   terms replace the unconditional prediction (ERG, autoguidance's weak model);
3. ``base``     the CFG-like term, at most one (CFG, APG, CFG-Zero*); ``D = c'`` when none is active;
4. ``additive`` terms add ``s (c - p)`` (PAG, SEG, SAG, SLG, S², TPG, EMAG additive);
5. post-processing (CFG rescale), then conversion back to the model's native output space.

``condition`` terms (CADS) rewrite the conditioning fed to the branches instead. Windows are per term
and evaluated on the explicit :class:`~emag.windows.StepContext`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..families import ModelFamily
from ..plumbing.edits import AttentionEdit, BlockEdit
from ..windows import (
    AllSteps,
    SigmaInterval,
    StepContext,
    StepWindow,
    Window,
    as_window,
)

KINDS = ("refine", "uncond", "base", "additive", "condition")


def check_scale(name: str, value: Any, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return float(value)


def window_of(value: Any, what: str = "window") -> StepWindow:
    """``None`` -> every step; a ``(start, stop)`` pair -> :class:`Window`; window objects as they are."""
    if value is None:
        return AllSteps()
    return as_window(value, what)


@dataclass
class Branch:
    """One extra prediction a term needs at one stage of a step.

    ``condition`` is ``"cond"`` or ``"uncond"`` (or a weakened text condition's name); ``attention`` /
    ``blocks`` are the edits on this branch's rows, keyed by block index; ``model`` selects a separate
    network (autoguidance); ``make_input(outputs, x_t)`` builds the branch's input from the outputs of
    earlier stages and the step's input (default: ``x_t`` itself).

    Suffix execution (exact, used by EMAG's fast path): a branch with ``start_block = k > 0`` resumes
    from the hidden states the normal branch ``source`` had when entering block ``k`` in this step's
    normal pass (its blocks before ``k`` would see identical inputs); the term must request that
    capture with :meth:`TermRuntime.capture_blocks`. ``keep_until = j`` marks a branch whose rows are
    only observed: they leave the pass after block ``j`` and produce no output.
    """

    name: str
    condition: str = "cond"
    attention: dict[int, list[AttentionEdit]] = field(default_factory=dict)
    blocks: dict[int, list[BlockEdit]] = field(default_factory=dict)
    model: str = "main"
    make_input: Callable[[dict[str, Tensor], Tensor], Tensor] | None = None
    start_block: int = 0
    source: str | None = None
    keep_until: int | None = None


@dataclass
class Setup:
    """What a runtime may need to know about the call, fixed before the first step."""

    family: ModelFamily
    num_blocks: int
    num_steps: int
    batch_size: int
    device: Any = None
    dtype: Any = None
    uses_uncond: bool = True
    fast: bool = True  # exact savings (suffix execution, skipped identical passes) allowed
    block_counts: tuple[int, ...] | None = None  # blocks per block list (None: one list of num_blocks)

    @property
    def counts(self) -> tuple[int, ...]:
        return self.block_counts or (self.num_blocks,)


class TermRuntime:
    """Per-call state and behaviour of one guidance term. Override what the term's kind needs."""

    kind: str = "additive"
    space: str = "native"  # "native" or "x0"
    # True when the term's result depends on the space it is computed in (non-affine or branch weights not
    # summing to one, docs/guidance.md section 2.2): it is then always computed in ``space`` and converted,
    # whatever space the other terms are combined in
    space_sensitive: bool = False
    # base terms: the space ``post`` (e.g. CFG rescale) runs in; None = the combine space
    post_space: str | None = None
    name: str = "term"

    def __init__(self, config: Any, window: StepWindow) -> None:
        self.config = config
        self.window = window

    # -- planning ------------------------------------------------------------------------------------
    def active(self, ctx: StepContext) -> bool:
        return self.window.contains(ctx)

    def needs_uncond(self, ctx: StepContext) -> bool:
        return False

    def zero_output(self, ctx: StepContext) -> bool:
        """True when the term's result at this step is exactly zero (in the native space) whatever the
        predictions, e.g. CFG-Zero*'s zero-init: when it is the only active term, no model pass runs."""
        return False

    def branches(self, ctx: StepContext, stage: int) -> list[Branch]:
        """The extra branches of ``stage``: 0 (evaluated with the normal branches, from ``x_t``) or 1 (after
        them: inputs or decisions that depend on stage 0's outputs)."""
        return []

    def shared_edits(self, ctx: StepContext, branch: str) -> tuple[dict[int, list[AttentionEdit]], dict[int, list[BlockEdit]]]:
        """Edits this term attaches to the shared ``cond`` / ``uncond`` branches (e.g. observers)."""
        return {}, {}

    def attention_layers(self) -> set[int]:
        return set()

    # True when the term's attention edits only rewrite or observe queries (EMAG-Q, SEG): defined on linear
    # attention too, which has no attention map to read or replace
    queries_only: bool = False

    def capture_blocks(self, ctx: StepContext) -> set[int]:
        """Blocks whose entering hidden states this term's suffix branches resume from this step."""
        return set()

    def branch_key(self) -> str | None:
        """What this term's extra branches are named after: two terms with the same key would evaluate the
        same branches (e.g. two PAGs on the same layers)."""
        return getattr(self, "branch_name", None)

    def extra_models(self) -> dict[str, Any]:
        """Separate networks this term evaluates branches with (``Branch.model`` names), e.g. the weak
        model of autoguidance. The pipeline wraps each in the same backbone as the main model."""
        return {}

    def block_layers(self) -> set[int]:
        return set()

    def begin_call(self, geometry: Any) -> None:
        """Once, before the call's first pass: decisions that depend on the call's shapes (``geometry``:
        the attention's :class:`~emag.families.base.AttentionGeometry`; EMAG chooses its EMA storage)."""

    def decide(self, stage: int, ctx: StepContext, outputs: dict[str, Tensor]) -> None:
        """The term's decisions before the passes of ``stage`` of this step (``outputs``: the predictions
        of the earlier stages), e.g. EMAG's block choice; :meth:`branches` then describes the result."""

    def run_record(self) -> dict[str, Any]:
        """What the term decided at run time, for the run's metadata."""
        return {}

    # -- combination (inputs are in this term's space; ``p`` maps branch name -> prediction) ----------
    def refine(self, c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def replace_uncond(self, p: dict[str, Tensor], ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def combine(self, c: Tensor, u: Tensor | None, p: dict[str, Tensor], ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def delta(self, c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def condition(self, cond: Any, ctx: StepContext) -> Any:
        raise NotImplementedError

    def post(self, guided: Tensor, c: Tensor, ctx: StepContext) -> Tensor:
        return guided

    # -- hooks for a base term that reshapes the other terms (APG ``target="pert"``) ----------------
    def base_needs_uncond(self, ctx: StepContext) -> bool:
        """Base terms only: whether ``combine`` needs the unconditional prediction at this step.

        Default ``True``. APG with ``scale=1`` and ``target="pert"`` only reshapes the perturbation
        terms, so it stays active without an unconditional pass.
        """
        return True

    def apply_refine(self, term: "TermRuntime", c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> Tensor:
        """Base terms only: run the ``refine`` term ``term`` on ``c``. Default: ``term.refine(c, p, ctx)``."""
        return term.refine(c, p, ctx)

    def apply_delta(self, term: "TermRuntime", c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> Tensor:
        """Base terms only: the additive delta of ``term``. Default: ``term.delta(c, p, ctx)``."""
        return term.delta(c, p, ctx)

    def refine_parts(self, c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> tuple[float, Tensor] | None:
        """Refine terms: ``(scale, diff)`` with ``refine(c) == c + scale * diff``, or ``None`` when the
        refinement has no such form (then APG ``target="pert"`` cannot reshape it)."""
        return None

    def delta_parts(self, c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> tuple[float, Tensor] | None:
        """Additive terms: ``(scale, diff)`` with ``delta(c) == scale * diff``, or ``None`` when the delta
        has no such form. The canonical perturbation term ``s (c - p)`` is recognised without it."""
        return None

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, **{k: v for k, v in vars(self.config).items() if not k.startswith("_")}}


class GuidanceConfig:
    """Base of the user-facing config dataclasses. Subclasses implement ``runtime``; the other methods
    declare what the call needs from the term, and :mod:`emag.guidance.call` decides the call from
    them (the pipelines and the command line's plan both ask it)."""

    is_base = False  # a CFG-like term (CFG, APG, CFG-Zero*): at most one per call

    def runtime(self, setup: Setup) -> TermRuntime:  # pragma: no cover - interface
        raise NotImplementedError

    def with_defaults(self, family: ModelFamily, guidance_scale: float | None) -> "GuidanceConfig":
        """This config with its call- and family-dependent defaults written in (what runs, and what the
        run's metadata records)."""
        return self

    def uses_uncond(self, family: ModelFamily, guidance_scale: float) -> bool:
        """Whether the term can need the unconditional (negative) condition at some step of a call."""
        return False

    def text_conditions(self) -> list:
        """Weakened text conditions its branches use (:class:`~emag.plumbing.text_weakening.TextWeakening`)."""
        return []

    def default_guided_channels(self, family: ModelFamily, channels: int) -> int | None:
        """The latent channels the guided prediction replaces when no term says so explicitly (None: all)."""
        return None

    def call_defaults(self, family: ModelFamily) -> dict[str, Any]:
        """Call settings the term's published numbers used, for arguments the caller leaves unset."""
        return {}

    def pairs_with_cfg(self, family: ModelFamily, guidance_scale: float) -> bool:
        """Given through a pipeline's legacy ``emag=`` argument, whether ``CFG(guidance_scale)`` comes with it."""
        return False

    def noise_layout(self) -> str | None:
        """The sampler row layout the term's reference used (``"doubled"`` or ``"samples"``), if any."""
        return None


__all__ = [
    "AllSteps", "Branch", "GuidanceConfig", "KINDS", "Setup", "SigmaInterval", "TermRuntime", "Window",
    "check_scale", "window_of",
]
