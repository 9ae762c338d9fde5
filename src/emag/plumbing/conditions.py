"""The conditioning of one branch, by kind: text embeddings or class ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass
class TextCondition:
    """Text conditioning of one branch: sequence and pooled text embeddings, ``[B, T, D]`` and ``[B, P]``."""

    embeds: Tensor
    pooled: Tensor


@dataclass
class ClassCondition:
    """Class conditioning of one branch: class ids ``[B]``; ``embedding`` optionally rewrites the label
    embedding vectors of these rows (CADS noises the embedding, not the integer label)."""

    labels: Tensor
    embedding: Callable[[Tensor], Tensor] | None = None

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])
