"""EMAG's attention edits: feed a branch's live attention (or image queries) into the EMA, or replace
the chosen block's tracked rows by it (docs/method.md, the EMA state and its update).

- :class:`EMAGFeed` (an observer: it never changes the pass's output) feeds the live tensor into ``E``.
- :class:`EMAGReplace` replaces the tracked rows (full) or image queries (q) by ``E``.

With factored storage no map is ever materialised whole: the feed computes the score by a tiled
reduction and the replacement rewrites the fused attention output with ``E V``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...math.ema import renormalize_rows
from ...plumbing.edits import AttentionEdit, AttentionInfo
from .state import EMAGState, compact, map_head_chunks


def _tracked(p: Tensor, n_img: int, rows: str) -> Tensor:
    t = p[:, :, :n_img]
    if rows == "img2img":
        return t[..., :n_img]
    if rows == "img2txt":
        if t.shape[-1] == n_img:
            raise RuntimeError("EMAG rows='img2txt' needs text keys, but this attention has none.")
        return t[..., n_img:]
    return t


class EMAGFeed(AttentionEdit):
    """Feed a group's live attention rows (or image queries) into the EMA; output unchanged."""

    modifies_output = False
    image_rows_only = True  # the tracked rows are image-query rows (docs/method.md section 3.3)

    def __init__(self, state: EMAGState, layer: int, ema_rows: slice, repeats: int = 1) -> None:
        self.state, self.layer, self.ema_rows, self.repeats = state, layer, ema_rows, repeats

    @property
    def needs_probs(self) -> bool:
        return self.state.config.variant == "full" and not self.state.factored

    def query(self, q, k, v, info: AttentionInfo, rows):
        if self.state.config.variant == "q":
            for _ in range(self.repeats):
                self.state.feed(self.layer, q[:, :, :info.num_image_tokens], self.ema_rows)
        elif self.state.factored:
            q_img, k = compact(q[:, :, :info.num_image_tokens]), compact(k)  # once: repeats share them
            for _ in range(self.repeats):
                self.state.feed_factored(self.layer, q_img, k, self.ema_rows, info)
        return q

    def head_chunks(self, shape, info: AttentionInfo):
        return map_head_chunks(self.state, shape, info) if self.repeats == 1 else None

    def begin_heads(self, shape, device, info: AttentionInfo, rows) -> None:
        self.state.begin_feed(self.layer, (shape[0], shape[1], min(shape[2], info.num_image_tokens), *shape[3:]),
                              device, self.ema_rows)

    def probs(self, p, info: AttentionInfo, rows, heads=None):
        tracked = _tracked(p, info.num_image_tokens, self.state.config.rows)
        if heads is not None:  # one chunk of heads of an update opened by begin_heads
            self.state.feed_heads(self.layer, tracked, self.ema_rows, heads)
            return p
        for _ in range(self.repeats):
            self.state.feed(self.layer, tracked, self.ema_rows)
        return p

    def end_heads(self, info: AttentionInfo, rows) -> None:
        self.state.end_feed(self.layer, self.ema_rows)

    def finish(self, info: AttentionInfo) -> None:
        self.state.finish(self.layer)


class EMAGReplace(AttentionEdit):
    """Replace a group's tracked attention rows (full) or image queries (q) by the EMA."""

    image_rows_only = True  # only image-query rows are replaced; text-query rows stay live (section 3)

    def __init__(self, state: EMAGState, layer: int, ema_rows: slice, mask: bool | Tensor = True) -> None:
        self.state, self.layer, self.ema_rows = state, layer, ema_rows
        self.row_mask = mask[ema_rows] if isinstance(mask, Tensor) else None

    @property
    def needs_probs(self) -> bool:
        return self.state.config.variant == "full" and not self.state.factored

    @property
    def edits_output(self) -> bool:
        return self.state.factored

    def output(self, out, q, k, v, info: AttentionInfo, rows, sdpa):
        """Factored storage: the image-query rows of the output become ``E V`` (text rows stay live)."""
        n = info.num_image_tokens
        live = out[:, :, :n]
        new = self.state.replacement_output(self.layer, live, v, self.ema_rows, sdpa, info.scale)
        edited = out.clone()
        edited[:, :, :n] = self._masked(new, live)
        return edited

    def _masked(self, new: Tensor, old: Tensor) -> Tensor:
        if self.row_mask is None:
            return new
        return torch.where(self.row_mask.to(new.device).view(-1, *([1] * (new.dim() - 1))), new, old)

    def query(self, q, k, v, info: AttentionInfo, rows):
        if self.state.config.variant != "q":
            return q
        n = info.num_image_tokens
        q_img = q[:, :, :n]
        new = self._masked(self.state.replacement(self.layer, q_img, self.ema_rows), q_img)
        return torch.cat([new, q[:, :, n:]], dim=2)

    def head_chunks(self, shape, info: AttentionInfo):
        return map_head_chunks(self.state, shape, info)

    def given_map(self, info: AttentionInfo) -> bool:
        cfg = self.state.config
        return (cfg.variant == "full" and not self.state.factored and self.row_mask is None and cfg.blend == 1.0
                and cfg.rows == "image_rows")

    def map_for(self, heads: slice, dtype: torch.dtype) -> Tensor:
        return self.state.ema_map(self.layer, self.ema_rows, heads).to(dtype)

    def probs(self, p, info: AttentionInfo, rows, heads=None):
        cfg, n = self.state.config, info.num_image_tokens
        heads = slice(None) if heads is None else heads
        if self.row_mask is None and cfg.blend == 1.0 and not p.requires_grad:
            # hard replacement written into the group's own map (``E.to(dtype)`` bit for bit): no second map
            self.state.replace_into(self.layer, _tracked(p, n, cfg.rows), self.ema_rows, heads)
            if cfg.rows != "image_rows":
                p[:, :, :n] = renormalize_rows(p[:, :, :n])
            return p
        new = self.state.replacement(self.layer, _tracked(p, n, cfg.rows), self.ema_rows, heads)
        if cfg.rows == "image_rows" and p.shape[2] == n:  # the map holds the image-query rows only
            return self._masked(new, p)
        edited = p.clone()
        if cfg.rows == "image_rows":
            edited[:, :, :n] = new
        else:
            keys = slice(None, n) if cfg.rows == "img2img" else slice(n, None)
            edited[:, :, :n, keys] = new
            edited[:, :, :n] = renormalize_rows(edited[:, :, :n])
        return self._masked(edited, p)
