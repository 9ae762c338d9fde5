"""Shared machinery of the perturbation methods: ``D += s (c - p)`` with ``p`` a weakened conditional.

A perturbation term owns one extra branch on the conditional input whose rows carry the term's
edits (attention or whole-block); its combination is the canonical additive term (guidance-methods.md
0.5). Layers default to a per-backbone preset when not given.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..layers import check_layers_in_range, format_layers, parse_layers
from ..plumbing.edits import AttentionEdit, BlockEdit
from ..windows import StepContext
from .base import Branch, Setup, TermRuntime


def resolve_layers(layers: Any, setup: Setup, defaults: dict[str, Any], what: str) -> tuple[int, ...]:
    """Parse ``layers`` or take the backbone default (a tuple, or a callable of the block count)."""
    if layers is None:
        d = defaults.get(setup.family)
        if d is None:
            raise ValueError(f"{what} has no default layers for {setup.family}; pass `layers=`.")
        layers = d(setup.num_blocks) if callable(d) else d
    parsed = parse_layers(layers)
    check_layers_in_range(parsed, setup.num_blocks, setup.arch.class_name)
    return parsed


class PerturbationRuntime(TermRuntime):
    """An additive term with one perturbed conditional branch: ``delta = s (c - p)``."""

    kind = "additive"

    def __init__(self, config: Any, window, layers: tuple[int, ...], name: str) -> None:
        super().__init__(config, window)
        self.layers = layers
        self.name = name
        self.branch_name = f"{name}:{format_layers(layers)}"

    def active(self, ctx: StepContext) -> bool:
        return self.config.scale != 0 and self.window.contains(ctx)

    def attention_edits(self, ctx: StepContext) -> dict[int, list[AttentionEdit]]:
        return {}

    def block_edits(self, ctx: StepContext) -> dict[int, list[BlockEdit]]:
        return {}

    def branches(self, ctx: StepContext) -> list[Branch]:
        return [Branch(self.branch_name, "cond", stage=0, attention=self.attention_edits(ctx),
                       blocks=self.block_edits(ctx))]

    def delta(self, c: Tensor, p, ctx: StepContext) -> Tensor:
        return self.config.scale * (c - p[self.branch_name])

    def describe(self) -> dict:
        d = super().describe()
        d["layers"] = format_layers(self.layers)
        return d


class IdentityAttention(AttentionEdit):
    """PAG's perturbation: image queries attend only to themselves among image keys.

    On MMDiT joint attention (SD3, image tokens first) the image->image block becomes the identity while
    image queries still see every text key and text queries are untouched, as diffusers' SD3 PAG
    pipeline does; on plain self-attention (DiT) the output is exactly ``V``. Applied as an additive
    ``-inf`` mask to the fused attention, after any QK-norm (SD3.5).
    """

    uses_mask = True

    def mask(self, q: Tensor, k: Tensor, info) -> Tensor:
        nq, nk, n = q.shape[2], k.shape[2], info.num_image_tokens
        m = torch.zeros(nq, nk, dtype=q.dtype, device=q.device)
        block = torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device)
        block.fill_diagonal_(0.0)
        m[:n, :n] = block
        return m[None, None]


class SkipBlock(BlockEdit):
    """Skip a whole transformer block for these rows: both streams leave it as they entered."""

    def after(self, hidden_in, encoder_in, hidden_out, encoder_out, rows):
        return hidden_in, (encoder_in if encoder_out is not None else None)
