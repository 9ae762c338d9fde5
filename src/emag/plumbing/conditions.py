"""The conditioning of one branch, by kind: text embeddings or class ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TextCondition:
    """Text conditioning of one branch: sequence and pooled text embeddings, ``[B, T, D]`` and ``[B, P]``
    (None where the model takes none: PixArt, Sana), and the text tokens' attention mask ``[B, T]`` (1 =
    a token, 0 = padding) where the model's cross-attention uses one."""

    embeds: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None

    @staticmethod
    def joined(conds: Sequence["TextCondition"]) -> "TextCondition":
        """The conditions of several branches as one batch (rows in the order given)."""
        if len(conds) == 1:
            return conds[0]

        def cat(name: str) -> Tensor | None:
            parts = [getattr(c, name) for c in conds]
            if all(t is None for t in parts):
                return None
            if any(t is None for t in parts):
                raise ValueError(f"Some branches have a text `{name}` and others not.")
            return torch.cat(parts)

        return TextCondition(cat("embeds"), cat("pooled"), cat("mask"))


def joined_latents(xs: Sequence[Tensor]) -> Tensor:
    """The inputs of several branches as one batch."""
    return torch.cat(list(xs)) if len(xs) > 1 else xs[0]


@dataclass
class ClassCondition:
    """Class conditioning of one branch: class ids ``[B]``; ``embedding`` optionally rewrites the label
    embedding vectors of these rows (CADS noises the embedding, not the integer label)."""

    labels: Tensor
    embedding: Callable[[Tensor], Tensor] | None = None

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])
