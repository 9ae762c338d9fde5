"""The guided denoiser: evaluates the branches the active terms need and combines them.

One :class:`GuidanceEngine` serves one pipeline call. Per step it

1. asks every active term for its branches and for its edits on the shared ``cond`` / ``uncond``
   branches (the unconditional branch runs only when a term needs it);
2. runs the branches stage by stage, batching them into forward passes by the ``batching`` policy:
   ``"normal"`` (default) runs ``cond``/``uncond`` together exactly as the base pipeline does and the
   extra branches of a stage together in a second pass (the EMAG reference's layout); ``"all"``
   puts every branch of a stage in one pass; ``"none"`` runs every branch alone;
3. combines in the native output space, or in x0 space when an active term asks for it (or always,
   with ``combine_space="x0"``), in the order refine -> uncond replacement -> base -> additive ->
   post-processing (see :mod:`emag.guidance.base`); the base term may reshape the refine and additive
   terms (APG ``target="pert"``) through its ``apply_refine`` / ``apply_delta`` hooks;
4. returns the prediction for the B samples with every output channel: guided channels from the
   combination, the rest (e.g. DiT's learned variance) from the conditional branch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .combination import COMBINE_SPACES, combine
from .guidance.base import Branch, TermRuntime
from .guidance.call import step_needs_uncond
from .plumbing.edits import EditScope, ForwardPlan, RowGroup
from .plumbing.runner import RunState
from .windows import StepContext

BATCHING = ("normal", "all", "none", "auto")
# Stage 0: the normal branches and every extra branch evaluated from x_t; stage 1: branches whose input
# or edits depend on stage 0's outputs (SAG's degraded input, the DiT protocol's block choice).
STAGES = (0, 1)


@dataclass
class Step:
    """One step being evaluated: its input, time and context, the active terms, the (possibly rewritten)
    conditions, and the branch predictions and inputs gathered so far."""

    x: Tensor
    t: Tensor
    ctx: StepContext
    active: list[TermRuntime]
    conditions: dict[str, Any]
    grid: tuple[int, ...]  # the image-token grid: (H/p, W/p), or (frames, H/p, W/p) for video
    outputs: dict[str, Tensor] = field(default_factory=dict)
    inputs: dict[str, Tensor] = field(default_factory=dict)


def free_accelerator_memory() -> int | None:
    """Free bytes on the current CUDA device, or None without CUDA (``batching="auto"``)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.mem_get_info()[0]


@dataclass
class GuidanceEngine:
    runtimes: list[TermRuntime]
    backbones: dict[str, Any]  # "main" (and e.g. "weak")
    conditions: dict[str, Any]  # "cond" / "uncond" -> backbone condition object for the B samples
    scope: EditScope
    channels: int  # the model's noise / velocity channels (DiT: 4 of 8 outputs)
    guided_channels: int
    batching: str = "normal"
    uses_uncond: bool = True
    combine_space: str = "auto"  # "auto": x0 iff an active term asks for it; "x0": always
    observer: Callable[[Step, Tensor], None] | None = None  # sees every step's branch outputs and result
    last_passes: list[list[str]] = field(default_factory=list)
    _begun: bool = False
    _finite_before: bool = False  # the previous step's guided prediction was finite

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise ValueError(f"Unknown batching policy {self.batching!r}; expected one of {BATCHING}.")
        if self.combine_space not in COMBINE_SPACES:
            raise ValueError(f"Unknown combine_space {self.combine_space!r}; expected one of {COMBINE_SPACES} "
                             "(a term that needs x0 space always gets it).")
        bases = [r for r in self.runtimes if r.kind == "base"]
        if len(bases) > 1:
            raise ValueError(f"At most one CFG-like base term per call, got {[r.name for r in bases]}.")

    @contextmanager
    def installed(self) -> Iterator["GuidanceEngine"]:
        with self.scope.installed():
            yield self

    # -- evaluation --------------------------------------------------------------------------------
    def predict(self, x: Tensor, t: Tensor, ctx: StepContext) -> Tensor:
        """The guided prediction of one step (see the module docstring for the order of its parts)."""
        if not self._begun:  # the call's decisions that depend on its shapes (EMAG: its EMA storage)
            self._begun = True
            geometry = self.backbones["main"].attention_geometry(x, self.conditions["cond"])
            for r in self.runtimes:
                r.begin_call(geometry)
        if self._finite_before and not bool(torch.isfinite(x).all()):
            raise ValueError(f"The latents entering step {ctx.index} of {ctx.num_steps} are not finite (inf or nan) "
                             "although the previous step's guided prediction was: the sampler's update overflowed "
                             "(or a callback returned non-finite latents). The guidance drove the latents out of "
                             "range: use smaller scales.")
        active = [r for r in self.runtimes if r.active(ctx)]
        if len(active) == 1 and active[0].zero_output(ctx) and x.shape[1] == self.channels == self.guided_channels:
            # e.g. CFG-Zero*'s zero-init step alone: the output is zero whatever the model says (0 passes)
            self.last_passes = []
            return torch.zeros_like(x)
        need_uncond = step_needs_uncond(active, ctx)
        if need_uncond and not self.uses_uncond:
            raise ValueError("A guidance term needs the unconditional branch but the call has no negative condition.")
        conditions = dict(self.conditions)
        for r in active:
            if r.kind == "condition":
                conditions = r.condition(conditions, ctx)
        normal = [n for n in self.backbones["main"].normal_order if n == "cond" or (n == "uncond" and need_uncond)]
        step = Step(x, t, ctx, active, conditions, self.backbones["main"].token_grid(x))
        names = set(normal)
        self.last_passes = []
        # block -> branch -> that branch's rows of the state entering the block (from any pass this step)
        self._captured: dict[int, dict[str, RunState]] = {}
        for stage in STAGES:
            for r in active:  # the terms' decisions for this stage (EMAG: its block choice)
                r.decide(stage, ctx, step.outputs)
            if stage == 0:
                self._captures = set().union(*[r.capture_blocks(ctx) for r in active]) if active else set()
            extra: list[Branch] = [b for r in active for b in r.branches(ctx, stage)]
            for b in extra:
                if b.name in names:
                    raise ValueError(f"Two guidance terms asked for the same branch name {b.name!r}.")
                names.add(b.name)
            todo = [Branch(n, n) for n in normal] if stage == 0 else []
            for group in self._passes(todo + extra, normal, conditions):
                self._run(group, step)
        guided = combine(active, step.outputs, step.inputs, x, ctx, self.channels, self.guided_channels,
                         self.combine_space)
        finite = bool(torch.isfinite(guided).all())  # one reduction per step
        if active and not finite:
            self._non_finite(x, ctx, active, step.outputs, guided.dtype)
        self._finite_before = finite
        if self.observer is not None:
            self.observer(step, guided)
        return guided

    @staticmethod
    def _non_finite(x: Tensor, ctx: StepContext, active: list[TermRuntime], outputs: dict[str, Tensor],
                    dtype: torch.dtype) -> None:
        """A guided prediction with inf / nan from a finite input is an error, not non-finite images: the
        terms' scales overflowed the combination (e.g. ``EMAG(scale=1e30)``), or the earlier steps' guidance
        drove the latents so far that the model's own predictions overflow (one step later). A non-finite
        input (the caller's latents, a callback's) passes through unchanged, as in the base pipeline."""
        if not bool(torch.isfinite(x).all()):
            return
        labels = []
        for r in active:
            scale = getattr(getattr(r, "cfg", None), "scale", getattr(r.config, "scale", None))
            shown = f"scale={scale:g}" if isinstance(scale, (int, float)) and not isinstance(scale, bool) else ""
            labels.append(f"{type(r.config).__name__}({shown})")
        terms = ", ".join(labels)
        where = f"at step {ctx.index} of {ctx.num_steps}"
        if all(bool(torch.isfinite(o).all()) for o in outputs.values()):
            raise ValueError(f"The guided prediction {where} is not finite (inf or nan) although every branch "
                             f"prediction was: the active guidance terms {terms} overflow "
                             f"{str(dtype).replace('torch.', '')}. Use smaller scales.")
        raise ValueError(f"The model's predictions {where} are not finite (inf or nan) although its input was "
                         f"(largest |x_t| = {float(x.abs().max()):.3g}). With latents that large, the guidance of the "
                         f"earlier steps drove them out of range (active terms: {terms}): use smaller scales. With "
                         "latents of ordinary size (a few units), the model itself overflows (e.g. in float16).")

    def _passes(self, todo: list[Branch], normal: list[str], conditions: dict[str, Any] | None = None) -> list[list[Branch]]:
        by_model: dict[tuple[str, int], list[Branch]] = {}
        for b in todo:  # branches resuming from different blocks share a pass only by joining it
            by_model.setdefault((b.model, b.start_block), []).append(b)
        conditions = self.conditions if conditions is None else conditions
        # per-row embedding rewrites (DiT CADS) are laid out for a pass's initial rows: no joining then
        if self.batching in ("all", "auto") and not any(
                getattr(conditions[b.condition], "embedding", None) is not None for b in todo):
            by_model = self._joined(by_model)
        passes = []
        for (model, _), branches in by_model.items():
            policy = self._auto_policy(branches) if self.batching == "auto" else self.batching
            if policy == "none":
                passes.extend([[b] for b in branches])
            elif policy == "all" or model != "main":
                passes.append(branches)
            else:
                shared = [b for b in branches if b.name in normal]
                rest = [b for b in branches if b.name not in normal]
                passes.extend(p for p in (shared, rest) if p)
        return passes

    def _joined(self, by_model: dict[tuple[str, int], list[Branch]]) -> dict[tuple[str, int], list[Branch]]:
        """``"all"``: suffix branches (``start_block = k > 0``) whose source rows run in this stage's pass
        from the input JOIN that pass at block ``k`` (their rows are copied from the source's rows there),
        so the blocks after ``k`` run once over every row instead of in a second, smaller pass."""
        lead = by_model.get(("main", 0))
        if not lead:
            return by_model
        names = {b.name for b in lead}
        out = {key: list(v) for key, v in by_model.items()}
        for (model, start), branches in by_model.items():
            if model == "main" and start > 0 and all(b.source in names for b in branches):
                if self.batching == "auto" and self._auto_policy(lead + branches) != "all":
                    continue
                out[("main", 0)].extend(branches)
                del out[(model, start)]
        return out

    def _auto_policy(self, branches: list[Branch]) -> str:
        """``"all"`` when one pass over every branch fits in the free accelerator memory, else ``"normal"``.

        The activation memory per batch row is measured on this call's own passes (CUDA peak-memory
        statistics); until it is known, and on the CPU, the policy is ``"normal"``.
        """
        per_row = getattr(self, "_bytes_per_row", None)
        free = free_accelerator_memory() if per_row is not None else None
        if free is None:
            return "normal"
        cond = self.conditions["cond"]
        samples = (cond.labels if hasattr(cond, "labels") else cond.embeds).shape[0]
        rows = samples * len(branches)
        return "all" if per_row * rows * 1.25 < free else "normal"

    def _measure(self, device: torch.device, rows: int, before: int) -> None:
        if device.type != "cuda":
            return
        used = torch.cuda.max_memory_allocated(device) - before
        self._bytes_per_row = max(getattr(self, "_bytes_per_row", 0), used / max(rows, 1))

    def _run(self, branches: list[Branch], step: Step) -> None:
        x = step.x
        measuring = self.batching == "auto" and x.device.type == "cuda"
        if measuring:
            torch.cuda.reset_peak_memory_stats(x.device)
            before = torch.cuda.memory_allocated(x.device)
        self._run_pass(branches, step)
        if measuring:
            rows = sum(int(step.outputs[b.name].shape[0]) for b in branches if b.name in step.outputs)
            self._measure(x.device, rows, before)

    def _groups(self, branches: list[Branch], step: Step) -> tuple[list[RowGroup], list[Tensor], list[Any]]:
        """The row groups of a pass (each branch's rows and edits), the branches' inputs and conditions.
        The normal branches carry the edits the active terms attach to them (e.g. EMAG's EMA feeds)."""
        xs, conds, groups, start = [], [], [], 0
        for b in branches:
            xin = b.make_input(step.outputs, step.x) if b.make_input is not None else step.x
            n = xin.shape[0]
            if b.name in ("cond", "uncond"):
                att: dict[int, list] = {}
                blk: dict[int, list] = {}
                for r in step.active:
                    a2, b2 = r.shared_edits(step.ctx, b.name)
                    for layer, e in a2.items():
                        att.setdefault(layer, []).extend(e)
                    for layer, e in b2.items():
                        blk.setdefault(layer, []).extend(e)
            else:
                att, blk = b.attention, b.blocks
            groups.append(RowGroup(b.name, start, start + n, att, blk))
            xs.append(xin)
            conds.append(step.conditions[b.condition])
            step.inputs[b.name] = xin
            start += n
        return groups, xs, conds

    def _run_pass(self, branches: list[Branch], step: Step) -> None:
        """One forward pass over ``branches`` (those starting at a later block join it there)."""
        model = branches[0].model
        start_block = min(b.start_block for b in branches)
        joiners = [b for b in branches if b.start_block > start_block]  # see _joined
        branches = [b for b in branches if b.start_block == start_block]
        groups, xs, conds = self._groups(branches, step)
        for b in joiners:
            step.inputs[b.name] = step.x
        self.last_passes.append([b.name for b in branches + joiners])
        backbone = self.backbones[model]
        captures = self._captures and any(b.name in ("cond", "uncond") for b in branches)
        if model == "main" and (start_block > 0 or joiners or captures
                                or any(b.keep_until is not None for b in branches + joiners)):
            self._run_blocks(branches, groups, xs, conds, start_block, step, joiners)
            return
        if model == "main":
            with self.scope.forward(ForwardPlan(groups, step.grid)):
                out = backbone.forward(xs, step.t, conds)
        else:
            if any(g.attention or g.blocks for g in groups):
                raise ValueError(f"Edits on the separate model {model!r} are not supported.")
            out = backbone.forward(xs, step.t, conds)
        for g in groups:
            step.outputs[g.branch] = out[g.rows]

    def _start_state(self, branches: list[Branch], xs: list[Tensor], conds: list[Any], start: int,
                     step: Step) -> RunState:
        """The state entering block ``start``: the embedded input, or the rows the normal pass captured."""
        if start == 0:
            return self.backbones["main"].embed(xs, step.t, conds)
        if start not in self._captured:
            raise RuntimeError(f"A branch resumes from block {start} but the normal pass did not capture it.")
        cap = self._captured[start]
        missing = [b.source for b in branches if b.source not in cap]
        if missing:
            raise RuntimeError(f"Suffix branches resume from {missing}, which no captured pass ran.")
        return RunState.cat([cap[b.source] for b in branches])

    def _run_blocks(self, branches: list[Branch], groups: list[RowGroup], xs: list[Tensor], conds: list[Any],
                    start: int, step: Step, joiners: list[Branch] = ()) -> None:
        """Block-by-block execution: capture states for suffix branches, resume from them, let suffix
        branches join the pass (``joiners``), drop rows."""
        backbone = self.backbones["main"]
        state = self._start_state(branches, xs, conds, start, step)
        keep_until = {b.name: b.keep_until for b in list(branches) + list(joiners) if b.keep_until is not None}
        can_drop = not any(getattr(c, "embedding", None) is not None for c in conds)
        plan = ForwardPlan(groups, step.grid)
        joins: dict[int, list[Branch]] = {}
        for b in joiners:
            joins.setdefault(b.start_block, []).append(b)
        with self.scope.forward(plan), backbone.context(conds, [g.stop - g.start for g in groups]):
            for i in range(start, backbone.num_blocks):
                if start == 0 and i in self._captures:
                    self._captured.setdefault(i, {}).update({g.branch: state.rows(g.rows) for g in plan.groups})
                if i in joins:
                    state, plan = self._join(state, plan, joins.pop(i), step.grid)
                state = backbone.block(i, state)
                done = {n for n, j in keep_until.items() if j == i}
                if done and can_drop:
                    state, plan = self._drop(state, plan, done, step.grid)
                    if not plan.groups:
                        break
            out = backbone.head(state) if plan.groups else None
        for g in plan.groups:
            if g.branch not in keep_until:
                step.outputs[g.branch] = out[g.rows]

    def _drop(self, state: RunState, plan: ForwardPlan, done: set[str], grid) -> tuple[RunState, ForwardPlan]:
        """Remove the rows of the observed-only branches ``done`` from the pass (they leave after this block)."""
        kept = [g for g in plan.groups if g.branch not in done]
        if not kept:
            self.scope.plan = ForwardPlan([], grid)
            return state, self.scope.plan
        index = torch.cat([torch.arange(g.start, g.stop, device=state.hidden.device) for g in kept])
        regrouped, offset = [], 0
        for g in kept:
            n = g.stop - g.start
            regrouped.append(RowGroup(g.branch, offset, offset + n, g.attention, g.blocks))
            offset += n
        self.scope.plan = ForwardPlan(regrouped, grid)
        return state.rows(index), self.scope.plan

    def _join(self, state: RunState, plan: ForwardPlan, joiners: list[Branch],
              grid: tuple[int, ...]) -> tuple[RunState, ForwardPlan]:
        """Append the rows of suffix branches entering the current block: copies of their sources' rows."""
        rows = {g.branch: g.rows for g in plan.groups}
        parts, groups, offset = [state], list(plan.groups), int(state.hidden.shape[0])
        for b in joiners:
            if b.source not in rows:
                raise RuntimeError(f"Branch {b.name!r} joins from {b.source!r}, which is not in this pass.")
            att, blk = b.attention, b.blocks
            n = rows[b.source].stop - rows[b.source].start
            parts.append(state.rows(rows[b.source]))
            groups.append(RowGroup(b.name, offset, offset + n, att, blk))
            offset += n
        joined = ForwardPlan(groups, grid)
        missing = (joined.attention_layers - set(self.scope.attention_modules)) | (
            joined.block_layers - set(self.scope.block_modules))
        if missing:
            raise RuntimeError(f"Edits planned on blocks that were not installed: {sorted(missing)}")
        self.scope.plan = joined
        return RunState.cat(parts), joined

__all__ = ["BATCHING", "GuidanceEngine", "STAGES"]
