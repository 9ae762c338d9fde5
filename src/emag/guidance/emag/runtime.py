"""EMAG as a guidance term for one call: its per-call state, its decisions, and its combination.

At each step the engine asks the runtime, in order: whether it is active; its decision before the
passes of each stage (:meth:`EMAGRuntime.decide`: the block choice, made at the stage its protocol
says); its branches and the feeds it attaches to the normal branches; then its combination. The EMA
storage is decided once per call, before the first pass (:meth:`EMAGRuntime.begin_call`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..._warnings import warn
from ...families.base import AttentionGeometry
from ...math.combine import emag_only
from ...plumbing.edits import ExplicitAttention
from ...windows import RemainingStepsWindow, StepContext, window_steps
from ..base import Setup, TermRuntime
from .edits import EMAGFeed, EMAGReplace
from .protocols import protocol_of
from .settings import ResolvedEMAG, resolve
from .state import EMAGState


@dataclass
class StepRecord:
    """What EMAG did at one step: windows, chosen blocks, and the scores the choice was made from."""

    index: int
    ema: bool
    apply: bool
    chosen: list[int] = field(default_factory=list)
    scores: dict[int, float | None] = field(default_factory=dict)


def check_windows(cfg: ResolvedEMAG, num_steps: int) -> tuple[list[int], list[int]]:
    """The EMA and replacement steps of this schedule; the replacement may not precede the EMA."""
    ema_steps = window_steps(cfg.ema_window, num_steps)
    apply_steps = window_steps(cfg.apply_window, num_steps)
    if not cfg.is_neutral and (not ema_steps or not apply_steps):
        which = "EMA" if not ema_steps else "replacement"
        window = cfg.ema_window if not ema_steps else cfg.apply_window
        hint = (" The DiT reference windows are absolute (steps remaining of the reference's 250-step DDPM "
                "sampler, docs/method.md) and never open at 50 steps or fewer: sample with num_inference_steps=250 "
                "(and pipe.scheduler = emag.dit_reference_scheduler(), the reference sampler), or give fractional "
                "windows, e.g. EMAG(ema_window=(0.396, 0.8), apply_window=(0.596, 0.8)), their equivalent at "
                "250 steps." if isinstance(window, RemainingStepsWindow) else "")
        raise ValueError(f"EMAG's {which} window ({window.describe()}) selects none of the {num_steps} sampling "
                         f"steps, so EMAG would silently do nothing.{hint}")
    if apply_steps and (not ema_steps or apply_steps[0] < ema_steps[0]):
        raise ValueError(
            f"EMAG replacement window ({cfg.apply_window.describe()}) starts at step {apply_steps[0]} of "
            f"{num_steps}, before the EMA window ({cfg.ema_window.describe()}) has fed any EMA "
            f"(first EMA step: {ema_steps[0] if ema_steps else 'none'})."
        )
    return ema_steps, apply_steps


def can_act(ema_steps: list[int], apply_steps: list[int], updates_per_step: int) -> bool:
    """Whether some replacement step sees an EMA that differs from the live map it replaces.

    The first update sets ``E := R``. At a replacement step inside the EMA window the step's own
    updates come first (both protocols feed, then replace), so the EMA differs from the live map only
    once it holds a second map: an earlier step's, or (two updates per step) the same step's
    unconditional one. At a replacement step after the EMA window any earlier update differs from the
    live map.
    """
    ema = set(ema_steps)
    for a in apply_steps:
        fed = updates_per_step * sum(1 for e in ema_steps if e <= a)
        if fed >= (2 if a in ema else 1):
            return True
    return False


def warn_if_inert(cfg: ResolvedEMAG, num_steps: int, ema_steps: list[int], apply_steps: list[int],
                  updates_per_step: int) -> None:
    """Warn when EMAG (at a non-neutral scale) can never change the attention in this schedule: its
    perturbed prediction would equal the normal one at every step, up to rounding."""
    if cfg.is_neutral:
        return
    if cfg.blend == 0:
        reason = "blend=0 replaces the attention by itself"
    elif not can_act(ema_steps, apply_steps, updates_per_step):
        reason = (f"at its replacement step(s) {apply_steps} the EMA holds only that step's own attention (EMA "
                  f"window: {cfg.ema_window.describe()}, steps {ema_steps}; replacement window: "
                  f"{cfg.apply_window.describe()}); the first update sets the EMA to the live map")
    else:
        return
    warn(f"EMAG can never act in this {num_steps}-step schedule: {reason}, so its perturbed prediction "
         "equals the normal one at every step (the result is the other terms' guidance up to rounding). "
         "Use more steps or windows whose replacement starts after the EMA's first step.")


class EMAGRuntime(TermRuntime):
    name = "emag"

    def __init__(self, config: Any, setup: Setup) -> None:
        cfg = resolve(config, setup.family, setup.counts)
        super().__init__(config, cfg.ema_window)
        self.cfg = cfg
        self.setup = setup
        self.protocol = protocol_of(setup.family)
        self.kind = "additive" if cfg.combination == "additive" else "refine"
        self.fast = setup.fast
        if cfg.combination == "additive" and not setup.uses_uncond:
            raise ValueError("EMAG combination 'additive' uses the unconditional branch: enable CFG (scale > 1).")
        if cfg.cond_only_score:
            self.protocol.check_cond_only(cfg.combination)
        self.with_uncond = self.protocol.with_uncond(cfg.combination, setup.uses_uncond, cfg.cond_only_score)
        self.rows = self.protocol.ema_rows(cfg.combination, setup.batch_size, self.with_uncond, cfg.cond_only_score)
        n_rows = max(s.stop for s in self.rows.values())
        self.state = EMAGState(cfg, n_rows, self.protocol.score_timing)
        ema_steps, apply_steps = check_windows(cfg, setup.num_steps)
        per_step = self.protocol.updates_per_step(self)
        self.state.stored_updates = len(ema_steps) * per_step
        warn_if_inert(cfg, setup.num_steps, ema_steps, apply_steps, per_step)
        self.trace: list[StepRecord] = []
        self.chosen: dict = {}  # this step's choice: {block: True or a mask over EMA rows}

    # -- the call ------------------------------------------------------------------------------------
    def begin_call(self, geometry: AttentionGeometry) -> None:
        """Before the first pass: decide how the full-map EMA is held (dense or factored)."""
        self.state.choose_storage(geometry, self.setup.dtype or torch.float32,
                                  torch.device(self.setup.device or "cpu"))

    def run_record(self) -> dict[str, Any]:
        """What was decided at run time, for the run's metadata."""
        return {} if self.state.storage is None else {"ema_storage_used": self.state.storage}

    # -- windows -------------------------------------------------------------------------------------
    def windows(self, ctx: StepContext) -> tuple[bool, bool]:
        """Whether this step feeds the EMA, and whether it replaces."""
        return self.cfg.ema_window.contains(ctx), self.cfg.apply_window.contains(ctx)

    def active(self, ctx: StepContext) -> bool:
        if self.cfg.combination == "additive":
            return True  # outside the windows u_e = u: the reference's u + (w + w_e)(c - u)
        if self.protocol.always_active(self):
            return True
        if self.cfg.explicit_attention:
            return True  # the reference's explicit attention at the candidate blocks, at every step
        ema, apply = self.windows(ctx)
        return ema or apply

    def needs_uncond(self, ctx: StepContext) -> bool:
        if self.cfg.combination == "additive":
            return True
        return self.protocol.needs_uncond(self, *self.windows(ctx))

    def attention_layers(self) -> set[int]:
        return set(self.cfg.layers)

    @property
    def queries_only(self) -> bool:
        return self.cfg.variant == "q"

    def branch_key(self) -> str:
        return "emag"

    # -- the step's decisions --------------------------------------------------------------------------
    def decide(self, stage: int, ctx: StepContext, outputs: dict[str, Tensor]) -> None:
        """The block choice, before the passes of the protocol's stage (the previous step's scores before
        stage 0, or the current step's after the normal passes fed the EMA, before stage 1)."""
        if stage == 0:
            self.chosen = {}
        if stage != self.protocol.choice_stage:
            return
        ema, apply = self.windows(ctx)
        if ema or apply:
            self.chosen = self.state.choose() if apply else {}
            self.trace.append(StepRecord(ctx.index, ema, apply, sorted(self.chosen), self.state.scores()))

    def first_chosen(self) -> int | None:
        """The first block whose input differs from the normal pass (the first chosen block), or None."""
        return min(self.chosen) if self.chosen else None

    # -- edits ---------------------------------------------------------------------------------------
    def feed(self, layer: int, ema_rows: slice, repeats: int = 1) -> EMAGFeed:
        return EMAGFeed(self.state, layer, ema_rows, repeats)

    def edits(self, which: str, feed: bool, from_block: int = 0, fed_until: int = -1) -> dict:
        """The perturbed rows' edits from ``from_block`` on: EMA feeds (when ``feed``) at the candidates
        after ``fed_until`` (those up to it were fed by the normal pass) and the replacements."""
        rows = self.rows[which]
        edits: dict[int, list] = {}
        for layer in self.cfg.layers:
            if layer < from_block:
                continue
            lst = []
            if self.cfg.explicit_attention:
                lst.append(ExplicitAttention())
            if feed and layer > fed_until:
                lst.append(EMAGFeed(self.state, layer, rows))
            if layer in self.chosen:
                lst.append(EMAGReplace(self.state, layer, rows, self.chosen[layer]))
            if lst:
                edits[layer] = lst
        return edits

    def branches(self, ctx: StepContext, stage: int):
        return self.protocol.branches(self, ctx, stage)

    def capture_blocks(self, ctx: StepContext) -> set[int]:
        return self.protocol.capture_blocks(self, ctx)

    def shared_edits(self, ctx: StepContext, branch: str):
        att = self.protocol.shared_feeds(self, ctx, branch)
        if self.cfg.explicit_attention:  # the reference's processor at the candidate blocks, every pass
            att = {l: [ExplicitAttention(), *att.get(l, [])] for l in self.cfg.layers}
        return att, {}

    # -- combination ----------------------------------------------------------------------------------
    def refine(self, c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> Tensor:
        """``c' = c_e + w_e (c - c_e)`` (paper Eq. 14, evaluated as written)."""
        c_e = p.get("emag:cond")
        if c_e is None:  # outside the replacement window the perturbed pass equals the normal one
            return c
        return emag_only(c, c_e, self.cfg.scale)

    def delta(self, c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> Tensor:
        """Additive reference mode: ``w_e (c - u_e)``, with ``u_e = u`` outside the replacement window."""
        u_e = p.get("emag:uncond", p["uncond"])
        return self.cfg.scale * (c - u_e)

    # -- (scale, diff) forms, for APG target="pert" ----------------------------------------------------
    def refine_parts(self, c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> tuple[float, Tensor]:
        """``refine(c) = c + (w_e - 1)(c - c_e)``; the difference is zero outside the replacement window."""
        c_e = p.get("emag:cond")
        return self.cfg.scale - 1.0, (torch.zeros_like(c) if c_e is None else c - c_e)

    def delta_parts(self, c: Tensor, p: dict[str, Tensor], ctx: StepContext) -> tuple[float, Tensor]:
        """``delta(c) = w_e (c - u_e)`` (additive reference mode)."""
        return self.cfg.scale, c - p.get("emag:uncond", p["uncond"])

    def describe(self) -> dict:
        return {"method": "emag", **self.cfg.to_dict()}
