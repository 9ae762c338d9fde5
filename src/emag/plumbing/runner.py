"""Activations between transformer blocks, for block-level execution (embed -> blocks[i:j] -> head).

Block-level execution lets a perturbed branch START at block ``k`` from the hidden states the normal
pass had there (the blocks before ``k`` see identical inputs in both passes) and lets rows leave a
pass early. Each family's backbone (:mod:`emag.families`) embeds, runs one block and applies the
head; over all blocks that is the model's own ``forward``, bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class RunState:
    """Activations between blocks: image tokens ``hidden`` [B, N, D], text tokens ``encoder`` (joint or
    cross-attention), the conditioning vector ``temb``, the raw ``timestep``/``labels`` (class-conditional
    models) or the embedded timestep the head needs (PixArt), the latent size, the text tokens' attention
    bias ``mask`` (cross-attention over padded text)."""

    hidden: Tensor
    encoder: Tensor | None
    temb: Tensor | None
    timestep: Tensor | None
    labels: Tensor | None
    size: tuple[int, ...]
    mask: Tensor | None = None

    def rows(self, index: slice | Tensor) -> "RunState":
        pick = (lambda t: None if t is None else t[index])
        return replace(self, hidden=self.hidden[index], encoder=pick(self.encoder), temb=pick(self.temb),
                       timestep=pick(self.timestep), labels=pick(self.labels), mask=pick(self.mask))

    @staticmethod
    def cat(states: list["RunState"]) -> "RunState":
        def c(name):
            vals = [getattr(s, name) for s in states]
            return None if vals[0] is None else torch.cat(vals)

        return RunState(c("hidden"), c("encoder"), c("temb"), c("timestep"), c("labels"), states[0].size, c("mask"))
