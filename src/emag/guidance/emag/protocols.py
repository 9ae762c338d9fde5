"""EMAG's two update protocols, as the published numbers were made (docs/method.md, the per-backbone
protocols). A model family names the one its reference code used (``ModelFamily.emag_protocol``).

- :class:`PerturbedPassProtocol` (the reference SD3 pipeline): each step the normal pass on
  ``[uncond ; cond]``, then a perturbed pass on the same doubled batch in which every candidate block
  feeds its EMA (score BEFORE the update, so the block chosen at step ``i`` uses step ``i - 1``'s scores)
  and the chosen block replaces its rows. EMA rows ``[uncond ; cond]`` (``[cond]`` without CFG).
- :class:`NormalPassProtocol` (the reference DiT sampler): the normal conditional, then unconditional
  pass feed the EMA (two updates per step; score AFTER the update), the block is chosen from the current
  step's scores, then the perturbed conditional pass replaces it. EMA rows: the B samples (``[cond ;
  uncond]`` in the additive mode, fed by one update of the normal doubled pass).

A protocol holds no state: it decides, from the runtime's settings and per-call state, what the runtime
does at each point of a step. With ``fast`` (default) it applies the exact savings (docs/speed-and-memory.md,
the fast exact path): no perturbed pass where it would equal the normal one, perturbed rows resumed at
the first chosen block from the normal pass's hidden states, observer rows only while they are needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...families import ModelFamily
from ...windows import StepContext
from ..base import Branch

if TYPE_CHECKING:  # the runtime passes itself to its protocol
    from .runtime import EMAGRuntime


class Protocol:
    name = ""
    score_timing = "before"  # when the score is computed relative to the EMA update
    entropy_selection = False  # the entropy-based selection modes are defined for this protocol
    choice_stage = 0  # the stage before whose passes the block is chosen

    def ema_rows(self, combination: str, batch: int, with_uncond: bool, cond_only: bool) -> dict[str, slice]:
        raise NotImplementedError

    def with_uncond(self, combination: str, uses_uncond: bool, cond_only: bool) -> bool:
        """Whether the unconditional rows take part in the EMA (fed or scored)."""
        raise NotImplementedError

    cfg_any_scale = False  # the reference applies u + w (c' - u) for every w (not only w > 1)

    def uncond_in_ema(self, combination: str, guidance_scale: float) -> bool:
        """Whether the unconditional rows enter the EMA (fed or scored) in ``combination`` (not additive)."""
        raise NotImplementedError

    def check_cond_only(self, combination: str) -> None:
        if combination == "additive":
            raise ValueError("cond_only_score applies to the nested combination (and SD3's emag_only); the "
                             "additive mode needs the perturbed unconditional prediction anyway.")

    def updates_per_step(self, rt: "EMAGRuntime") -> int:
        """Distinct live maps stored per EMA row and EMA step."""
        return 1

    def always_active(self, rt: "EMAGRuntime") -> bool:
        """Whether the term runs outside its windows too (beyond the additive mode's ``u_e = u``)."""
        return False

    def needs_uncond(self, rt: "EMAGRuntime", ema: bool, apply: bool) -> bool:
        raise NotImplementedError

    def branches(self, rt: "EMAGRuntime", ctx: StepContext, stage: int) -> list[Branch]:
        raise NotImplementedError

    def capture_blocks(self, rt: "EMAGRuntime", ctx: StepContext) -> set[int]:
        raise NotImplementedError

    def shared_feeds(self, rt: "EMAGRuntime", ctx: StepContext, branch: str) -> dict:
        raise NotImplementedError


class PerturbedPassProtocol(Protocol):
    """The reference SD3 pipeline's protocol (see the module docstring)."""

    name = "perturbed-pass"
    score_timing = "before"
    choice_stage = 0  # from the previous step's scores: before any pass of the step

    def ema_rows(self, combination: str, batch: int, with_uncond: bool, cond_only: bool) -> dict[str, slice]:
        b = batch
        if cond_only:
            # Opt-in, NOT the reference: the score D averages the conditional rows only, so the perturbed
            # unconditional rows are never run.
            return {"cond": slice(0, b)}
        # the reference's perturbed batch: [uncond ; cond], or [cond] alone
        return {"uncond": slice(0, b), "cond": slice(b, 2 * b)} if with_uncond else {"cond": slice(0, b)}

    def with_uncond(self, combination: str, uses_uncond: bool, cond_only: bool) -> bool:
        # "Only_EMAG" too keeps the unconditional rows for the score when the call prepared them
        return uses_uncond

    def uncond_in_ema(self, combination: str, guidance_scale: float) -> bool:
        # "Only_EMAG" keeps the reference's doubled batch while its CFG flag is on: the unconditional rows
        # enter the batch-global score though their output is unused (nested: the CFG term brings them)
        return combination == "emag_only" and guidance_scale > 1

    def always_active(self, rt: "EMAGRuntime") -> bool:
        # straightforward: the reference's normal call on [uncond ; cond] at every step
        return not rt.fast and "uncond" in rt.rows

    def needs_uncond(self, rt: "EMAGRuntime", ema: bool, apply: bool) -> bool:
        if "uncond" not in rt.rows:
            return False
        # straightforward path: the reference's normal call on [uncond ; cond] at every step (emag_only
        # with the CFG flag on has no CFG term asking for it); fast path: only where the normal
        # unconditional rows feed the EMA or are resumed from
        return not rt.fast or ema or apply

    def branches(self, rt: "EMAGRuntime", ctx: StepContext, stage: int) -> list[Branch]:
        ema, apply = rt.windows(ctx)
        if stage != 0 or not (ema or apply):
            return []
        if not rt.fast:  # straightforward: a full perturbed pass on the reference's doubled batch
            return [Branch(f"emag:{w}", w, attention=rt.edits(w, ema)) for w in rt.rows]
        # Fast, exact: without a replacement the perturbed pass IS the normal pass (the normal branches
        # feed the EMA instead); with one, the perturbed rows resume at the first chosen block k from the
        # normal pass's hidden states. Block k's input is the normal pass's too, so the normal pass feeds
        # it (as every candidate before it) and the perturbed rows only replace there. Unconditional rows
        # whose output is unused (nested mode) only feed the candidates after k: they leave the pass after
        # the last candidate block, and are not run at all when k is the last one.
        k = rt.first_chosen()
        if k is None:
            return []
        last = max(rt.cfg.layers)
        out = []
        for w in rt.rows:
            observe_only = w == "uncond" and rt.cfg.combination != "additive"
            if observe_only and not (ema and last > k):
                continue
            out.append(Branch(f"emag:{w}", w, start_block=k, source=w, keep_until=last if observe_only else None,
                              attention=rt.edits(w, ema, from_block=k, fed_until=k)))
        return out

    def capture_blocks(self, rt: "EMAGRuntime", ctx: StepContext) -> set[int]:
        if not rt.fast or not rt.windows(ctx)[1]:
            return set()
        k = rt.first_chosen()
        return {k} if k else set()  # None: no replacement; 0: the perturbed pass runs from the input

    def shared_feeds(self, rt: "EMAGRuntime", ctx: StepContext, branch: str) -> dict:
        """Fast path: the blocks up to the first chosen one (all, without a replacement) see the normal
        pass's activations, so the normal rows feed their EMA (same EMA rows, same order, the same batch
        as the reference's perturbed call)."""
        ema, _ = rt.windows(ctx)
        if not (rt.fast and ema and branch in rt.rows):
            return {}
        k = rt.first_chosen()
        layers = [l for l in rt.cfg.layers if k is None or l <= k]
        return {l: [rt.feed(l, rt.rows[branch])] for l in layers}


class NormalPassProtocol(Protocol):
    """The reference DiT sampler's protocol (see the module docstring)."""

    name = "normal-pass"
    score_timing = "after"
    entropy_selection = True
    choice_stage = 1  # from the current step's scores: after the normal passes fed the EMA

    def ema_rows(self, combination: str, batch: int, with_uncond: bool, cond_only: bool) -> dict[str, slice]:
        b = batch
        if combination == "additive":
            return {"cond": slice(0, b), "uncond": slice(b, 2 * b)}
        return {"cond": slice(0, b)}

    cfg_any_scale = True

    def with_uncond(self, combination: str, uses_uncond: bool, cond_only: bool) -> bool:
        # cond_only_score (opt-in, NOT the reference): the EMA is fed by the conditional pass only
        return uses_uncond and combination != "emag_only" and not cond_only

    def uncond_in_ema(self, combination: str, guidance_scale: float) -> bool:
        # the unconditional pass feeds the EMA at every EMA step, also at CFG scale 1 (nested)
        return combination == "nested"

    def check_cond_only(self, combination: str) -> None:
        if combination != "nested":
            super().check_cond_only("additive")

    def updates_per_step(self, rt: "EMAGRuntime") -> int:
        # the nested mode feeds cond, then uncond: two distinct maps per step
        return 2 if rt.cfg.combination == "nested" and rt.with_uncond else 1

    def needs_uncond(self, rt: "EMAGRuntime", ema: bool, apply: bool) -> bool:
        return rt.with_uncond and ema

    def branches(self, rt: "EMAGRuntime", ctx: StepContext, stage: int) -> list[Branch]:
        if stage != 1 or not rt.windows(ctx)[1]:
            return []
        names = ["cond", "uncond"] if rt.cfg.combination == "additive" else ["cond"]
        if not rt.fast:
            return [Branch(f"emag:{w}", w, attention=rt.edits(w, False)) for w in names]
        k = rt.first_chosen() or 0
        return [Branch(f"emag:{w}", w, start_block=k, source=w, attention=rt.edits(w, False, from_block=k))
                for w in names]

    def capture_blocks(self, rt: "EMAGRuntime", ctx: StepContext) -> set[int]:
        if not rt.fast or not rt.windows(ctx)[1]:
            return set()
        return set(rt.cfg.layers)  # chosen after the normal pass: any candidate may be the start

    def shared_feeds(self, rt: "EMAGRuntime", ctx: StepContext, branch: str) -> dict:
        if not rt.windows(ctx)[0] or branch not in rt.rows and not (branch == "uncond" and rt.with_uncond):
            return {}
        ema_rows = rt.rows.get(branch, rt.rows["cond"])  # nested: cond and uncond both feed all rows
        repeats = 2 if rt.cfg.combination == "emag_only" else 1  # the reference's two identical null passes
        return {l: [rt.feed(l, ema_rows, repeats)] for l in rt.cfg.layers}


PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PerturbedPassProtocol(), NormalPassProtocol())}


def protocol_of(family: ModelFamily) -> Protocol:
    return PROTOCOLS[family.emag_protocol]
