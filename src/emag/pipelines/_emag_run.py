"""Pieces shared by the EMAG pipelines: resolving the config, checking windows, the step trace."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import EMAG, ResolvedEMAG, resolve
from ..plumbing.architectures import Architecture, architecture_of, num_blocks
from ..windows import StepContext, window_steps


def resolve_for(transformer: nn.Module, emag: EMAG) -> tuple[Architecture, ResolvedEMAG]:
    """Check ``emag`` against ``transformer`` (family, layer range) before any expensive work."""
    if not isinstance(emag, EMAG):
        raise TypeError(f"`emag` must be an emag.EMAG instance or None, got {type(emag).__name__}.")
    arch = architecture_of(transformer)
    cfg = resolve(emag, arch.family, num_blocks(transformer, arch), type(transformer).__name__)
    return arch, cfg


def check_windows(cfg: ResolvedEMAG, num_steps: int) -> tuple[list[int], list[int]]:
    """The EMA and replacement steps of this schedule; the replacement may not precede the EMA."""
    ema_steps = window_steps(cfg.ema_window, num_steps)
    apply_steps = window_steps(cfg.apply_window, num_steps)
    if apply_steps and (not ema_steps or apply_steps[0] < ema_steps[0]):
        raise ValueError(
            f"EMAG replacement window ({cfg.apply_window.describe()}) starts at step {apply_steps[0]} of "
            f"{num_steps}, before the EMA window ({cfg.ema_window.describe()}) has fed any EMA "
            f"(first EMA step: {ema_steps[0] if ema_steps else 'none'})."
        )
    return ema_steps, apply_steps


@dataclass
class StepRecord:
    """What EMAG did at one step: windows, chosen blocks, and the scores the choice was made from."""

    index: int
    ema: bool
    apply: bool
    chosen: list[int] = field(default_factory=list)
    scores: dict[int, float | None] = field(default_factory=dict)


def record_step(ctx: StepContext, ema: bool, apply: bool, chosen: dict, runtime) -> StepRecord:
    scores = {l: (None if s.score is None else float(s.score.median())) for l, s in runtime.states.items()}
    return StepRecord(ctx.index, ema, apply, sorted(chosen), scores)
