"""Block-level execution of a transformer forward pass: embed -> blocks[i:j] -> head.

Lets a perturbed branch START at block ``k`` from the hidden states the normal pass had there (the
blocks before ``k`` see identical inputs in both passes), and lets rows leave a pass early. With
``run`` over all blocks the result is the model's own ``forward``, bit for bit (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RunState:
    """Activations between blocks: image tokens ``hidden`` [B, N, D], text tokens ``encoder`` (SD3),
    the conditioning vector ``temb`` (SD3) or the raw ``timestep``/``labels`` (DiT), the latent size."""

    hidden: Tensor
    encoder: Tensor | None
    temb: Tensor | None
    timestep: Tensor | None
    labels: Tensor | None
    size: tuple[int, int]

    def rows(self, index: slice | Tensor) -> "RunState":
        pick = (lambda t: None if t is None else t[index])
        return replace(self, hidden=self.hidden[index], encoder=pick(self.encoder), temb=pick(self.temb),
                       timestep=pick(self.timestep), labels=pick(self.labels))

    @staticmethod
    def cat(states: list["RunState"]) -> "RunState":
        def c(name):
            vals = [getattr(s, name) for s in states]
            return None if vals[0] is None else torch.cat(vals)

        return RunState(c("hidden"), c("encoder"), c("temb"), c("timestep"), c("labels"), states[0].size)


class SD3Runner:
    def __init__(self, transformer: nn.Module, joint_attention_kwargs: dict | None = None) -> None:
        self.t = transformer
        self.jak = joint_attention_kwargs
        if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise NotImplementedError("Block-level execution does not support IP-Adapter.")

    @property
    def num_blocks(self) -> int:
        return len(self.t.transformer_blocks)

    def embed(self, x: Tensor, timestep: Tensor, embeds: Tensor, pooled: Tensor) -> RunState:
        size = tuple(x.shape[-2:])
        hidden = self.t.pos_embed(x).contiguous()
        temb = self.t.time_text_embed(timestep, pooled)
        encoder = self.t.context_embedder(embeds)
        return RunState(hidden, encoder, temb, None, None, size)

    def block(self, i: int, s: RunState) -> RunState:
        enc, hid = self.t.transformer_blocks[i](hidden_states=s.hidden, encoder_hidden_states=s.encoder, temb=s.temb,
                                               joint_attention_kwargs=self.jak)
        return replace(s, hidden=hid, encoder=enc)

    def head(self, s: RunState) -> Tensor:
        t = self.t
        hidden = t.proj_out(t.norm_out(s.hidden, s.temb))
        p = t.config.patch_size
        h, w = s.size[0] // p, s.size[1] // p
        hidden = hidden.reshape(hidden.shape[0], h, w, p, p, t.out_channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(hidden.shape[0], t.out_channels, h * p, w * p)


class DiTRunner:
    def __init__(self, transformer: nn.Module) -> None:
        self.t = transformer

    @property
    def num_blocks(self) -> int:
        return len(self.t.transformer_blocks)

    def embed(self, x: Tensor, timestep: Tensor, labels: Tensor) -> RunState:
        return RunState(self.t.pos_embed(x), None, None, timestep, labels, tuple(x.shape[-2:]))

    def block(self, i: int, s: RunState) -> RunState:
        hid = self.t.transformer_blocks[i](s.hidden, attention_mask=None, encoder_hidden_states=None,
                                          encoder_attention_mask=None, timestep=s.timestep,
                                          cross_attention_kwargs=None, class_labels=s.labels)
        return replace(s, hidden=hid)

    def head(self, s: RunState) -> Tensor:
        t = self.t
        cond = t.transformer_blocks[0].norm1.emb(s.timestep, s.labels, hidden_dtype=s.hidden.dtype)
        shift, scale = t.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        hidden = t.norm_out(s.hidden) * (1 + scale[:, None]) + shift[:, None]
        hidden = t.proj_out_2(hidden)
        p = t.patch_size
        h = w = int(hidden.shape[1] ** 0.5)
        hidden = hidden.reshape(-1, h, w, p, p, t.out_channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(-1, t.out_channels, h * p, w * p)


def run_blocks(runner: Any, s: RunState, start: int, stop: int, capture: set[int] | None = None,
               captured: dict[int, RunState] | None = None) -> RunState:
    """Run blocks ``start .. stop-1``; the state ENTERING each block in ``capture`` is stored in ``captured``."""
    for i in range(start, stop):
        if capture and i in capture and captured is not None:
            captured[i] = s
        s = runner.block(i, s)
    return s
