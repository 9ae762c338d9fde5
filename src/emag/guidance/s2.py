"""S²-Guidance, stochastic self-guidance (Chen et al., ICLR 2026, arXiv 2508.12880).

The weak model is a random SUB-NETWORK of the model itself: a random subset of transformer blocks is
dropped (identity on both streams), with a new random subset at every step, on the conditional input
(docs/guidance.md section 11). Two combine forms circulate:

- ``"contrastive"`` (default): ``D += omega (c - c_sub)``, coefficients sum to one, so the result is the
  same in every parametrisation; omega 1.0 [3rd-party: ComfyUI-BerniniR]. Checked (2026-11, via a paper
  note of arXiv 2508.12880; the paper's PDF body was not reachable offline): this IS the paper's
  practical equation ``D = D_u + lambda (D_c - D_u) - omega (D_sub(c, m_t) - D_c)``, one new random mask
  ``m_t`` per step on the conditional input; its "naive" form averages ``N`` masks per step. The note
  reports about 10 % of blocks dropped (the first block excluded) and use over roughly the middle 80 % of
  noise levels; the paper's default omega was not found [unverified]. The official repository
  (AMAP-ML/S2-Guidance) has no code.
- ``"literal"``: ``D += -omega c_sub`` [3rd-party: forge / Fooocus ``make_s2_modifier``, omega 0.25; it
  drops the ``+ omega D_c`` of the paper's equation, so it is NOT the paper's form]. Its
  coefficients sum to ``1 - omega``, so it shrinks the prediction and depends on the space it is applied
  in (``space="native"``: eps for DiT, velocity for SD3; or ``"x0"``).

Masks: each SAMPLE gets its own subset, drawn from a generator seeded with ``(seed, step index, sample
index)``, so runs are reproducible and a sample's masks do not depend on the batch size or on the other
samples; rows of the weak branch skip their own blocks. The number of dropped blocks is
``max(1, round(drop_ratio * candidates))`` (SD3-Medium: 2 of 24, DiT-XL/2: 3 of 28); forge floors
``int(n * ratio)`` and drops nothing when that is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..layers import LayerSpec, parse_layers
from ..windows import StepContext
from .base import GuidanceConfig, Setup, TermRuntime, check_scale, window_of
from .perturbation import (
    PerturbationRuntime,
    SkipBlockRows,
    check_seed,
    resolve_layers,
    seeded_generator,
)

FORMS = {"contrastive": 1.0, "literal": 0.25}  # form -> default omega
SPACES = ("native", "x0")


def s2_num_dropped(num_candidates: int, drop_ratio: float) -> int:
    """Blocks dropped per step: ``max(1, round(drop_ratio * n))`` (half up), at most ``n``."""
    if drop_ratio <= 0:
        return 0
    return min(num_candidates, max(1, math.floor(drop_ratio * num_candidates + 0.5)))


def s2_dropped_blocks(seed: int, step: int, sample: int, candidates: tuple[int, ...],
                      drop_ratio: float) -> tuple[int, ...]:
    """The blocks sample ``sample`` drops at step ``step``: a uniform random subset of ``candidates``."""
    k = s2_num_dropped(len(candidates), drop_ratio)
    order = torch.randperm(len(candidates), generator=seeded_generator(seed, step, sample))
    return tuple(sorted(candidates[i] for i in order[:k].tolist()))


@dataclass(frozen=True)
class S2(GuidanceConfig):
    """Stochastic sub-network guidance: ``D += omega (c - c_sub)`` (contrastive) or ``D += -omega c_sub`` (literal).

    Args:
        scale: ``omega`` (>= 0; 0 is off). Default: 1.0 for ``"contrastive"``, 0.25 for ``"literal"`` [3rd-party].
        drop_ratio: fraction of the candidate blocks dropped per step and sample, in [0, 1). Default 0.1.
        form: ``"contrastive"`` (default) or ``"literal"``.
        layers: the candidate blocks that may be dropped. Default: every block.
        exclude_first: never drop block 0. Default False (every block a candidate, the spec's reading);
            the paper note quoted above and one third-party implementation exclude block 0 [unverified].
        seed: seed of the mask stream; sample ``k`` at step ``i`` uses ``(seed, i, k)``. Generating one
            image per call? Pass that image's seed here, or every image gets the same mask sequence.
        window: step window, default every step (the paper note's "middle ~80 % of noise levels" is
            [unverified]; give e.g. ``window=(0.1, 0.9)`` for it).
        space: where the literal form is applied, ``"native"`` (default) or ``"x0"``.
    """

    scale: float | None = None
    drop_ratio: float = 0.1
    form: str = "contrastive"
    layers: LayerSpec | None = None
    exclude_first: bool = False
    seed: int = 0
    window: Any = None
    space: str = "native"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"S2 `form` must be one of {tuple(FORMS)}, got {self.form!r}.")
        if self.scale is not None:
            check_scale("scale", self.scale)
        check_scale("drop_ratio", self.drop_ratio)
        if self.drop_ratio >= 1:
            raise ValueError(f"`drop_ratio` must be in [0, 1), got {self.drop_ratio}.")
        if self.space not in SPACES:
            raise ValueError(f"S2 `space` must be one of {SPACES}, got {self.space!r}.")
        check_seed(self.seed)
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
            if self.exclude_first and 0 in self.layers:
                raise ValueError("S2: `layers` contains block 0 but `exclude_first=True`; give one or the other.")
        window_of(self.window)

    @property
    def omega(self) -> float:
        return FORMS[self.form] if self.scale is None else self.scale

    def runtime(self, setup: Setup) -> TermRuntime:
        candidates = resolve_layers(self.layers, setup, "s2", "S2")
        if self.exclude_first:
            candidates = tuple(l for l in candidates if l != 0)
        if not candidates:
            raise ValueError("S2 has no candidate blocks to drop.")
        return S2Runtime(self, window_of(self.window), candidates, setup)


class S2Runtime(PerturbationRuntime):
    def __init__(self, config: S2, window, candidates: tuple[int, ...], setup: Setup) -> None:
        super().__init__(config, window, candidates, "s2")
        self.branch_name = "s2"
        self.space = config.space if config.form == "literal" else "native"
        self.space_sensitive = config.form == "literal"  # its branch weights do not sum to one
        self.batch_size = setup.batch_size
        self.trace: list[tuple[int, list[tuple[int, ...]]]] = []  # (step, dropped blocks per sample)

    def active(self, ctx: StepContext) -> bool:
        return self.config.omega != 0 and self.config.drop_ratio > 0 and self.window.contains(ctx)

    def block_layers(self) -> set[int]:
        return set(self.layers)

    def dropped(self, ctx: StepContext) -> list[tuple[int, ...]]:
        c = self.config
        return [s2_dropped_blocks(c.seed, ctx.index, k, self.layers, c.drop_ratio) for k in range(self.batch_size)]

    def block_edits(self, ctx: StepContext):
        per_sample = self.dropped(ctx)
        self.trace.append((ctx.index, per_sample))
        edits = {}
        for layer in sorted({l for d in per_sample for l in d}):
            edits[layer] = [SkipBlockRows(torch.tensor([layer in d for d in per_sample]))]
        return edits

    def delta(self, c: Tensor, p, ctx: StepContext) -> Tensor:
        sub = p[self.branch_name]
        if self.config.form == "literal":
            return -self.config.omega * sub
        return self.config.omega * (c - sub)

    def delta_parts(self, c: Tensor, p, ctx: StepContext) -> tuple[float, Tensor] | None:
        """The contrastive form is ``omega (c - c_sub)``; the literal one is not a difference of predictions."""
        return (self.config.omega, c - p[self.branch_name]) if self.config.form == "contrastive" else None

    def describe(self) -> dict:
        d = super().describe()
        d["candidates"] = d.pop("layers")
        d["omega"] = self.config.omega
        return d
