"""The conditioning of one branch, by kind: text embeddings or class ids."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass
class TextCondition:
    """Text conditioning of one branch: sequence and pooled text embeddings, ``[B, T, D]`` and ``[B, P]``
    (None where the model takes none: PixArt, Sana), and the text tokens' attention mask ``[B, T]`` (1 =
    a token, 0 = padding) where the model's cross-attention uses one."""

    embeds: Tensor
    pooled: Tensor | None = None
    mask: Tensor | None = None


@dataclass
class ClassCondition:
    """Class conditioning of one branch: class ids ``[B]``; ``embedding`` optionally rewrites the label
    embedding vectors of these rows (CADS noises the embedding, not the integer label)."""

    labels: Tensor
    embedding: Callable[[Tensor], Tensor] | None = None

    @property
    def rows(self) -> int:
        return int(self.labels.shape[0])
