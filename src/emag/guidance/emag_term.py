"""EMAG as a guidance term, with the per-step protocols of the published numbers (emag.md section 5).

SD3 protocol (score before the update, choice from the previous step's scores): inside the windows
two perturbed branches ``emag:uncond`` and ``emag:cond`` (EMA rows ``[uncond ; cond]``, the reference's
doubled perturbed batch) feed every candidate's EMA and replace the chosen block. They need no result
of this step, so they may share a forward pass with the normal branches.

DiT protocol (score after the update, choice from the current step's scores): the normal ``cond`` then
``uncond`` branches feed the EMA (observers), then, in a second stage, the perturbed ``emag:cond``
branch replaces the chosen block. The additive reference mode feeds one update over EMA rows
``[cond ; uncond]`` and perturbs both halves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._warnings import warn as _warn
from ..config import EMAG, ResolvedEMAG, resolve
from ..math.combine import emag_only
from ..plumbing.edits import ExplicitAttention
from ..plumbing.emag_attention import EMAGFeed, EMAGReplace, EMAGState
from ..windows import RemainingStepsWindow, StepContext, window_steps
from .base import Branch, Setup, TermRuntime


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
                "sampler, emag.md 5.2) and never open at 50 steps or fewer: sample with num_inference_steps=250 "
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
    updates come first (SD3: the perturbed pass feeds, then replaces; DiT: the normal passes feed, then
    the perturbed one replaces), so the EMA differs from the live map only once it holds a second map: an
    earlier step's, or (DiT nested, ``updates_per_step = 2``) the same step's unconditional one. At a
    replacement step after the EMA window any earlier update differs from the live map.
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
    _warn(f"EMAG can never act in this {num_steps}-step schedule: {reason}, so its perturbed prediction "
          "equals the normal one at every step (the result is the other terms' guidance up to rounding). "
          "Use more steps or windows whose replacement starts after the EMA's first step.")


class EMAGRuntime(TermRuntime):
    name = "emag"

    def __init__(self, config: EMAG, setup: Setup) -> None:
        cfg: ResolvedEMAG = resolve(config, setup.family, setup.num_blocks, setup.arch.class_name)
        super().__init__(config, cfg.ema_window)
        self.cfg = cfg
        self.setup = setup
        self.kind = "additive" if cfg.combination == "additive" else "refine"
        self.protocol = "sd3" if setup.family == "sd3" else "dit"
        b = setup.batch_size
        if cfg.combination == "additive" and not setup.uses_uncond:
            raise ValueError("EMAG combination 'additive' uses the unconditional branch: enable CFG (scale > 1).")
        # SD3's "Only_EMAG" keeps the unconditional rows for the score when the pipeline prepared them
        self.with_uncond = setup.uses_uncond and (cfg.combination != "emag_only" or self.protocol == "sd3")
        self.fast = setup.fast
        if config.cond_only_score:
            if cfg.combination == "additive" or (self.protocol == "dit" and cfg.combination != "nested"):
                raise ValueError("cond_only_score applies to the nested combination (and SD3's emag_only); the "
                                 "additive mode needs the perturbed unconditional prediction anyway.")
            if self.protocol == "dit":
                self.with_uncond = False  # opt-in, NOT the reference: the EMA is fed by the cond pass only
        if self.protocol == "sd3" and config.cond_only_score:
            # Opt-in, NOT the reference: the score D averages the conditional rows only, so the
            # perturbed unconditional rows are never run.
            self.rows = {"cond": slice(0, b)}
            n_rows = b
        elif self.protocol == "sd3":
            # EMA rows follow the reference's perturbed batch: [uncond ; cond], or [cond] alone.
            self.rows = {"uncond": slice(0, b), "cond": slice(b, 2 * b)} if self.with_uncond else {"cond": slice(0, b)}
            n_rows = 2 * b if self.with_uncond else b
        elif cfg.combination == "additive":
            self.rows = {"cond": slice(0, b), "uncond": slice(b, 2 * b)}
            n_rows = 2 * b
        else:
            self.rows = {"cond": slice(0, b)}
            n_rows = b
        self.state = EMAGState(cfg, n_rows, "before" if self.protocol == "sd3" else "after")
        ema_steps, apply_steps = check_windows(cfg, setup.num_steps)
        # distinct live maps stored per EMA row and step: the DiT nested mode feeds cond, then uncond
        per_step = 2 if self.protocol == "dit" and cfg.combination == "nested" and self.with_uncond else 1
        self.state.stored_updates = len(ema_steps) * per_step
        warn_if_inert(cfg, setup.num_steps, ema_steps, apply_steps, per_step)
        self.trace: list[StepRecord] = []
        self._chosen: dict | None = None
        self._step = -1

    # -- windows -------------------------------------------------------------------------------------
    def _windows(self, ctx: StepContext) -> tuple[bool, bool]:
        return self.cfg.ema_window.contains(ctx), self.cfg.apply_window.contains(ctx)

    def active(self, ctx: StepContext) -> bool:
        if self.cfg.combination == "additive":
            return True  # outside the windows u_e = u: the reference's u + (w + w_e)(c - u)
        if self.protocol == "sd3" and not self.fast and "uncond" in self.rows:
            return True  # straightforward: the reference's normal call on [uncond ; cond] at every step
        if self.cfg.explicit_attention:
            return True  # the reference's explicit attention at the candidate blocks, at every step
        ema, apply = self._windows(ctx)
        return ema or apply

    def needs_uncond(self, ctx: StepContext) -> bool:
        if self.cfg.combination == "additive":
            return True
        if self.protocol == "dit":
            return self.with_uncond and self._windows(ctx)[0]
        if "uncond" not in self.rows:
            return False
        # straightforward path: the reference's normal call on [uncond ; cond] at every step (emag_only
        # with the CFG flag on has no CFG term asking for it); fast path: only where the normal
        # unconditional rows feed the EMA or are resumed from
        return not self.fast or any(self._windows(ctx))

    def attention_layers(self) -> set[int]:
        return set(self.cfg.layers)

    # -- per-step planning -----------------------------------------------------------------------------
    def _begin(self, ctx: StepContext) -> None:
        if self._step != ctx.index:
            self._step, self._chosen = ctx.index, None

    def _choose(self, ctx: StepContext) -> dict:
        self._begin(ctx)
        if self._chosen is None:
            ema, apply = self._windows(ctx)
            self._chosen = self.state.choose() if apply else {}
            self.trace.append(StepRecord(ctx.index, ema, apply, sorted(self._chosen), self.state.scores()))
        return self._chosen

    def _start(self, ctx: StepContext) -> int | None:
        """The first block whose input differs from the normal pass (the first chosen block), or None."""
        chosen = self._choose(ctx)
        return min(chosen) if chosen else None

    def _edits(self, ctx: StepContext, which: str, feed: bool, from_block: int = 0, fed_until: int = -1) -> dict:
        """The perturbed rows' edits from ``from_block`` on: EMA feeds (when ``feed``) at the candidates
        after ``fed_until`` (those up to it were fed by the normal pass) and the replacements."""
        chosen = self._choose(ctx)
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
            if layer in chosen:
                lst.append(EMAGReplace(self.state, layer, rows, chosen[layer]))
            if lst:
                edits[layer] = lst
        return edits

    def branches(self, ctx: StepContext) -> list[Branch]:
        ema, apply = self._windows(ctx)
        if self.protocol == "sd3":
            if not (ema or apply):
                return []
            if not self.fast:  # straightforward: a full perturbed pass on the reference's doubled batch
                return [Branch(f"emag:{w}", w, stage=0, attention=(lambda w=w: self._edits(ctx, w, ema)))
                        for w in self.rows]
            # Fast, exact: without a replacement the perturbed pass IS the normal pass (the normal branches
            # feed the EMA instead); with one, the perturbed rows resume at the first chosen block k from
            # the normal pass's hidden states. Block k's input is the normal pass's too, so the normal
            # pass feeds it (as every candidate before it) and the perturbed rows only replace there.
            # Unconditional rows whose output is unused (nested mode) only feed the candidates after k:
            # they leave the pass after the last candidate block, and are not run at all when k is the
            # last one.
            k = self._start(ctx)
            if k is None:
                return []
            out = []
            for w in self.rows:
                observe_only = w == "uncond" and self.cfg.combination != "additive"
                if observe_only and not (ema and max(self.cfg.layers) > k):
                    continue
                out.append(Branch(f"emag:{w}", w, stage=0, start_block=k, source=w,
                                  keep_until=max(self.cfg.layers) if observe_only else None,
                                  attention=(lambda w=w, k=k: self._edits(ctx, w, ema, from_block=k, fed_until=k))))
            return out
        if not apply:
            return []
        names = ["cond", "uncond"] if self.cfg.combination == "additive" else ["cond"]
        if not self.fast:
            return [Branch(f"emag:{w}", w, stage=1, attention=(lambda w=w: self._edits(ctx, w, False)))
                    for w in names]
        return [Branch(f"emag:{w}", w, stage=1, start_block=(lambda: self._start(ctx) or 0), source=w,
                       attention=(lambda w=w: self._edits(ctx, w, False, from_block=self._start(ctx) or 0)))
                for w in names]

    def capture_blocks(self, ctx: StepContext) -> set[int]:
        if not self.fast or not self._windows(ctx)[1]:
            return set()
        if self.protocol == "sd3":
            k = self._start(ctx)
            return {k} if k else set()  # None: no replacement; 0: the perturbed pass runs from the input
        return set(self.cfg.layers)  # DiT chooses after the normal pass: any candidate may be the start

    def shared_edits(self, ctx: StepContext, branch: str):
        att, blk = self._shared_feeds(ctx, branch)
        if self.cfg.explicit_attention:  # the reference's processor at the candidate blocks, every pass
            att = {l: [ExplicitAttention(), *att.get(l, [])] for l in self.cfg.layers}
        return att, blk

    def _shared_feeds(self, ctx: StepContext, branch: str):
        if self.protocol == "sd3":
            return self._sd3_shared_feeds(ctx, branch)
        if not self._windows(ctx)[0] or branch not in self.rows and not (
                branch == "uncond" and self.with_uncond):
            return {}, {}
        ema_rows = self.rows.get(branch, self.rows["cond"])  # nested: cond and uncond both feed all rows
        repeats = 2 if self.cfg.combination == "emag_only" else 1  # reference's two identical null passes
        return {l: [EMAGFeed(self.state, l, ema_rows, repeats)] for l in self.cfg.layers}, {}

    def _sd3_shared_feeds(self, ctx: StepContext, branch: str):
        """Fast SD3 path: the blocks up to the first chosen one (all, without a replacement) see the
        normal pass's activations, so the normal rows feed their EMA (same EMA rows, same order, the
        same batch as the reference's perturbed call)."""
        ema, _ = self._windows(ctx)
        if not (self.fast and ema and branch in self.rows):
            return {}, {}
        k = self._start(ctx)
        layers = [l for l in self.cfg.layers if k is None or l <= k]
        return {l: [EMAGFeed(self.state, l, self.rows[branch])] for l in layers}, {}

    def before_stage(self, stage: int, ctx: StepContext, outputs) -> None:
        if self.protocol == "dit" and stage == 1 and any(self._windows(ctx)):
            self._choose(ctx)  # after the normal passes fed the EMA: current-step scores

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

