"""How one batched forward pass over several branches is run, per model family.

A backbone knows its normal branch order (SD3: ``[uncond ; cond]`` as diffusers' pipeline; DiT:
``[cond ; uncond]`` as diffusers' DiTPipeline and the original DiT), how to concatenate the branches'
conditions, and how to call the transformer. Rows of the output follow the order of the branches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .hooks import CallHooks
from .runner import DiTRunner, RunState, SD3Runner


@dataclass
class TextCondition:
    """SD3 conditioning of one branch: sequence and pooled text embeddings, ``[B, T, D]`` and ``[B, P]``."""

    embeds: Tensor
    pooled: Tensor


@dataclass
class ClassCondition:
    """DiT conditioning of one branch: class ids ``[B]``; ``embedding`` optionally rewrites the label
    embedding vectors of these rows (CADS noises the embedding, not the integer label)."""

    labels: Tensor
    embedding: Callable[[Tensor], Tensor] | None = None


class SD3Backbone:
    normal_order = ("uncond", "cond")

    def __init__(self, transformer: nn.Module, joint_attention_kwargs: dict | None = None) -> None:
        self.transformer = transformer
        self.joint_attention_kwargs = joint_attention_kwargs
        self.runner = SD3Runner(transformer, joint_attention_kwargs)

    def embed(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> RunState:
        x = torch.cat(list(xs)) if len(xs) > 1 else xs[0]
        embeds = torch.cat([c.embeds for c in conds]) if len(conds) > 1 else conds[0].embeds
        pooled = torch.cat([c.pooled for c in conds]) if len(conds) > 1 else conds[0].pooled
        return self.runner.embed(x, t.expand(x.shape[0]), embeds, pooled)

    def context(self, conds: Sequence[Any], rows: Sequence[int]):
        return nullcontext()

    def forward(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> Tensor:
        x = torch.cat(list(xs)) if len(xs) > 1 else xs[0]
        embeds = torch.cat([c.embeds for c in conds]) if len(conds) > 1 else conds[0].embeds
        pooled = torch.cat([c.pooled for c in conds]) if len(conds) > 1 else conds[0].pooled
        return self.transformer(
            hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=embeds,
            pooled_projections=pooled, joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False,
        )[0]


class DiTBackbone:
    normal_order = ("cond", "uncond")

    def __init__(self, transformer: nn.Module, scheduler: Any) -> None:
        self.transformer = transformer
        self.scheduler = scheduler
        self.runner = DiTRunner(transformer)

    def _label_embedders(self) -> list[nn.Module]:
        return [m for m in self.transformer.modules() if type(m).__name__ == "LabelEmbedding"]

    def _inputs(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[ClassCondition]):
        x = torch.cat(list(xs)) if len(xs) > 1 else xs[0]
        labels = torch.cat([c.labels for c in conds]) if len(conds) > 1 else conds[0].labels
        x = self.scheduler.scale_model_input(x, t)
        ts = t if torch.is_tensor(t) else torch.tensor([t], device=x.device)
        if ts.dim() == 0:
            ts = ts[None].to(x.device)
        return x, ts.expand(x.shape[0]), labels

    @contextmanager
    def context(self, conds: Sequence[ClassCondition], rows: Sequence[int]) -> Iterator[None]:
        """Rewrite the class-embedding vectors of the rows whose condition asks for it (CADS)."""
        hooks = CallHooks()  # act in this thread only; removed whatever raises
        try:
            if any(c.embedding is not None for c in conds):
                spans, start = [], 0
                for c, n in zip(conds, rows):
                    spans.append((slice(start, start + n), c.embedding))
                    start += n

                def rewrite(module, args, output):
                    output = output.clone()
                    for r, fn in spans:
                        if fn is not None:
                            output[r] = fn(output[r])
                    return output

                embedders = self._label_embedders()
                if not embedders:
                    raise RuntimeError("No LabelEmbedding found in the DiT transformer: cannot rewrite class embeddings.")
                for m in embedders:
                    hooks.post(m, rewrite)
            yield
        finally:
            hooks.remove()

    def embed(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[ClassCondition]) -> RunState:
        x, ts, labels = self._inputs(xs, t, conds)
        return self.runner.embed(x, ts, labels)

    def forward(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[ClassCondition]) -> Tensor:
        x, ts, labels = self._inputs(xs, t, conds)
        with self.context(conds, [c.labels.shape[0] for c in conds]):
            return self.transformer(x, timestep=ts, class_labels=labels).sample
