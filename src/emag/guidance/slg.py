"""Skip-layer guidance (Stability AI, SD3.5 reference) and spatiotemporal skip guidance, STG
(Hyung et al., arXiv 2411.18664): the weak branch skips whole blocks (STG-R) or the attention map of
blocks (STG-A)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..layers import LayerSpec, parse_layers
from ..windows import StrictWindow
from .base import GuidanceConfig, Setup, TermRuntime, check_scale, window_of
from .perturbation import (
    IdentityAttention,
    PerturbationRuntime,
    SkipBlock,
    resolve_layers,
)


@dataclass(frozen=True)
class SLG(GuidanceConfig):
    """``D += s (c - c_skip)`` where ``c_skip`` skips whole blocks (both streams on MMDiT).

    Defaults follow the SD3.5 reference and diffusers' SD3 pipeline: scale 2.8, blocks 7-9, and their
    window ``N * 0.01 < i < N * 0.2``, strict on both sides (:class:`~emag.StrictWindow`; steps 1-5 of 28,
    2-19 of 100). A plain ``(start, stop)`` pair is the library's half-open ``start <= i/N < stop``.
    """

    scale: float = 2.8
    layers: LayerSpec | None = None
    window: Any = StrictWindow(0.01, 0.2)

    def __post_init__(self) -> None:
        check_scale("scale", self.scale)
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        return SkipRuntime(self, window_of(self.window), resolve_layers(self.layers, setup, "slg", "SLG"),
                           "slg", "residual")


@dataclass(frozen=True)
class STG(GuidanceConfig):
    """Spatiotemporal skip guidance: ``mode="residual"`` (STG-R) skips whole blocks, ``"attention"``
    (STG-A) replaces their self-attention map by the identity. Default scale 1.0 over all steps.

    STG-A uses PAG's identity edit: on DiT the attention output becomes ``V``; on SD3's joint attention the
    image->image block becomes the identity while image queries still see the text keys and text rows are
    untouched (docs/guidance.md section 7.2). diffusers' ``skip_attention_scores`` (``V`` for every row, text
    included) is a different perturbation; the STG paper's exact MMDiT mapping is [unverified]."""

    scale: float = 1.0
    layers: LayerSpec | None = None
    mode: str = "residual"
    window: Any = None

    def __post_init__(self) -> None:
        check_scale("scale", self.scale)
        if self.mode not in ("residual", "attention"):
            raise ValueError(f"STG mode must be 'residual' or 'attention', got {self.mode!r}.")
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        return SkipRuntime(self, window_of(self.window), resolve_layers(self.layers, setup, "stg", "STG"),
                           "stg", self.mode)


class SkipRuntime(PerturbationRuntime):
    def __init__(self, config, window, layers, name, mode) -> None:
        super().__init__(config, window, layers, name)
        self.mode = mode

    def attention_layers(self) -> set[int]:
        return set(self.layers) if self.mode == "attention" else set()

    def block_layers(self) -> set[int]:
        return set(self.layers) if self.mode == "residual" else set()

    def attention_edits(self, ctx):
        return {l: [IdentityAttention()] for l in self.layers} if self.mode == "attention" else {}

    def block_edits(self, ctx):
        return {l: [SkipBlock()] for l in self.layers} if self.mode == "residual" else {}
