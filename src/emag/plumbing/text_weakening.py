"""Weakened text conditions: text encoders with temperature-scaled self-attention (ERG's C-ERG).

A term asks for an extra condition by returning :class:`TextWeakening` specs from
``text_conditions()``; the text pipeline encodes the prompt once more with the query projections of a
band of each text encoder's layers scaled by ``tau`` (attention logits ``tau Q K^T``: temperature
``1 / tau``), and the term's branch uses that condition by name.

The layer band is a half-open fraction of each encoder's depth, ``start <= i / n < stop`` (the same
convention as step windows), so one setting applies to CLIP-L (12 layers), CLIP-G (32) and T5-XXL (24).
Forward hooks are used, and removed afterwards also on error.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from ..windows import Window, window_steps
from .hooks import CallHooks

# The SD3 pipelines' text encoders, by the names C-ERG selects them with (``text_encoder``,
# ``text_encoder_2``, ``text_encoder_3``).
TEXT_ENCODERS = ("clip_l", "clip_g", "t5")

# Query projections of self-attention in transformers' text encoders: CLIP (``self_attn.q_proj``, also
# Llama-style models) and T5 / UMT5 (``SelfAttention.q``).
QUERY_SUFFIXES = ("self_attn.q_proj", "SelfAttention.q")


@dataclass(frozen=True)
class TextWeakening:
    """Encode the ``source`` prompt ("cond" or "uncond") with queries scaled by ``tau`` in ``depth`` of
    the text encoders named in ``encoders`` (of :data:`TEXT_ENCODERS`; None: every loaded one)."""

    source: str
    tau: float
    depth: tuple[float, float]
    encoders: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.source not in ("cond", "uncond"):
            raise ValueError(f"TextWeakening source must be 'cond' or 'uncond', got {self.source!r}.")
        if self.encoders is not None and (isinstance(self.encoders, str) or not isinstance(self.encoders, tuple)
                                          or not self.encoders
                                          or any(e not in TEXT_ENCODERS for e in self.encoders)
                                          or len(set(self.encoders)) != len(self.encoders)):
            raise ValueError(f"C-ERG `text_encoders` must be a non-empty tuple of distinct names from "
                             f"{TEXT_ENCODERS}, got {self.encoders!r}.")
        if not (isinstance(self.depth, tuple) and len(self.depth) == 2):
            raise ValueError(f"C-ERG `depth` must be a (start, stop) pair of fractions, got {self.depth!r}.")
        Window(*self.depth)  # validates 0 <= start <= stop <= 1
        if not self.depth[0] < self.depth[1]:
            raise ValueError(f"C-ERG `depth` {self.depth} is empty: need start < stop.")

    @property
    def name(self) -> str:
        which = "" if self.encoders is None else "[" + ",".join(self.encoders) + "]"
        return f"{self.source}:text-tau={self.tau:g}@{self.depth[0]:g}-{self.depth[1]:g}{which}"


def query_projections(encoder: nn.Module) -> list[nn.Module]:
    """The self-attention query projections of ``encoder``, one per layer, in layer order."""
    found = [m for name, m in encoder.named_modules() if name.endswith(QUERY_SUFFIXES)]
    if not found:
        raise ValueError(f"{type(encoder).__name__} has no self-attention query projection named like "
                         f"{QUERY_SUFFIXES}; C-ERG supports CLIP and T5 text encoders.")
    return found


def depth_layers(num_layers: int, depth: tuple[float, float]) -> list[int]:
    """Layer indices ``i`` with ``start <= i / num_layers < stop``."""
    return window_steps(Window(*depth), num_layers)


@contextmanager
def scaled_queries(encoders: Sequence[nn.Module | None], tau: float, depth: tuple[float, float]) -> Iterator[None]:
    """While active, the chosen layers' query projections of every encoder output ``tau`` times their value."""
    def hook(module, args, output):
        return output * tau

    hooks = CallHooks()  # act in this thread only; removed whatever raises
    try:
        for enc in encoders:
            if enc is None:
                continue
            projections = query_projections(enc)
            layers = depth_layers(len(projections), depth)
            if not layers:
                raise ValueError(f"C-ERG depth {depth} selects no layer of {type(enc).__name__} "
                                 f"({len(projections)} layers).")
            for i in layers:
                hooks.post(projections[i], hook)
        yield
    finally:
        hooks.remove()
