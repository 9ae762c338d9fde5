"""TPG, Token Perturbation Guidance (Rajabi, Mehraban, Sadat, Taati; NeurIPS 2025, arXiv 2506.10036).

The weak branch randomly permutes the INPUT tokens of selected transformer blocks along the token axis:
one permutation per block and forward call, shared by every row of the branch, and NOT undone afterwards
[src: TaatiTeam/Token-Perturbation-Guidance ``pipeline_sdxl_tpg.py``, docs/guidance.md section 14]. Only
the image tokens are permuted (SD3's text stream is untouched). Additive:

    D = u + w (c - u) + s (c - c_TPG)

Note for these backbones: SD3 and DiT add their (absolute) position embedding once, at the input, and
every block is permutation-equivariant over the image tokens (per-token MLPs, attention without positions,
per-sample adaLN). Permuting a block's input and never undoing it therefore yields the conditional
prediction with its patches shuffled, ``c_TPG = shuffle(c)`` up to rounding, whichever blocks are chosen
(several blocks compose into one permutation). In SDXL's UNet, where TPG was designed, the convolutions
and the residual around each transformer make the result depend on the block. The per-step seeded
permutations follow the same stream design as S²'s masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..layers import LayerSpec, parse_layers
from ..plumbing.edits import BlockEdit
from ..windows import StepContext
from .base import GuidanceConfig, Setup, TermRuntime, check_scale, window_of
from .perturbation import (
    PerturbationRuntime,
    check_seed,
    resolve_layers,
    seeded_generator,
)

# The middle block. The official SDXL setting perturbs its down blocks 6-23; on SD3 / DiT the choice only
# changes rounding (see the module docstring).


def tpg_permutation(seed: int, step: int, layer: int, num_tokens: int) -> Tensor:
    """The token permutation of block ``layer`` at step ``step``: ``randperm`` from ``(seed, step, layer)``."""
    return torch.randperm(num_tokens, generator=seeded_generator(seed, step, layer))


class PermuteTokens(BlockEdit):
    """Permute the image tokens entering a block (``hidden[:, perm]``), the same permutation for every row."""

    def __init__(self, seed: int, step: int, layer: int) -> None:
        self.seed, self.step, self.layer = seed, step, layer
        self.perm: Tensor | None = None  # drawn at the first call, when the token count is known

    def before(self, hidden: Tensor, encoder: Tensor | None, rows) -> tuple[Tensor, Tensor | None]:
        if self.perm is None or self.perm.numel() != hidden.shape[1]:
            self.perm = tpg_permutation(self.seed, self.step, self.layer, hidden.shape[1])
        return hidden[:, self.perm.to(hidden.device)], encoder


@dataclass(frozen=True)
class TPG(GuidanceConfig):
    """``D += s (c - c_TPG)``: the weak branch shuffles the image tokens entering ``layers``.

    Args:
        scale: ``s`` (>= 0; 0 is off). Default 3.0 [src: TPG official SDXL pipeline].
        layers: blocks whose input tokens are permuted. Default: the middle block (see the module note).
        seed: seed of the permutation stream; block ``l`` at step ``i`` uses ``(seed, i, l)``.
        window: step window, default every step.
    """

    scale: float = 3.0
    layers: LayerSpec | None = None
    seed: int = 0
    window: Any = None

    def __post_init__(self) -> None:
        check_scale("scale", self.scale)
        check_seed(self.seed)
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        layers = resolve_layers(self.layers, setup, "tpg", "TPG")
        return TPGRuntime(self, window_of(self.window), layers, "tpg")


class TPGRuntime(PerturbationRuntime):
    def block_layers(self) -> set[int]:
        return set(self.layers)

    def block_edits(self, ctx: StepContext):
        return {l: [PermuteTokens(self.config.seed, ctx.index, l)] for l in self.layers}
