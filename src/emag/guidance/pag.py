"""PAG, Perturbed-Attention Guidance (Ahn et al., ECCV 2024, arXiv 2403.17377)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..layers import LayerSpec, parse_layers
from .base import GuidanceConfig, Setup, TermRuntime, check_scale, window_of
from .perturbation import IdentityAttention, PerturbationRuntime, resolve_layers


@dataclass(frozen=True)
class PAG(GuidanceConfig):
    """``D += s (c - c_PAG)``: the weak branch replaces the self-attention map of ``layers`` by the identity.

    Args:
        scale: ``s`` (>= 0; 0 is off). The PAG paper uses 3.0 with CFG (SD1.5/SDXL), 5.0 alone.
        layers: blocks to perturb (default: SD3 block 13, as diffusers' SD3 PAG example; DiT the middle block).
        window: step window, default every step (the PAG paper applies it at all steps).
    """

    scale: float = 3.0
    layers: LayerSpec | None = None
    window: Any = None

    def __post_init__(self) -> None:
        check_scale("scale", self.scale)
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        return PAGRuntime(self, window_of(self.window), resolve_layers(self.layers, setup, "pag", "PAG"), "pag")


class PAGRuntime(PerturbationRuntime):
    def attention_layers(self) -> set[int]:
        return set(self.layers)

    def attention_edits(self, ctx):
        return {l: [IdentityAttention()] for l in self.layers}
