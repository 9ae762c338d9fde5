"""EMAG's EMA state for one pipeline call, and the attention edits that feed and apply it.

The EMA of a candidate block is one tensor ``E`` whose batch rows ("EMA rows") are fixed for the
call: SD3 keeps ``[uncond ; cond]`` (the reference's doubled perturbed batch), DiT keeps the B samples
(fed by the cond, then the uncond pass). A branch's rows in a forward pass map onto EMA rows, so the
same state can be fed from one batched pass, from two groups of one pass, or from two passes.

- :class:`EMAGFeed` (an observer: it never changes the pass's output) feeds the live tensor into ``E``;
  the score ``D = mean|E - R|`` over all EMA rows is computed before (SD3) or after (DiT) the update
  and finalised once per intercepted call, exactly as one update of the whole tensor would give it.
- :class:`EMAGReplace` replaces the tracked rows (full) or image queries (q) by ``E``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import ResolvedEMAG
from ..math.ema import blend, ema_update_, renormalize_rows, row_entropy
from ..math.selection import select_layers, select_layers_per_row
from .edits import AttentionEdit, AttentionInfo


@dataclass
class LayerState:
    """Per-block EMA state. ``ema`` is ``[R, H, N_i, K]`` (full) or ``[R, H, N_i, d]`` (q), R EMA rows."""

    ema: Tensor | None = None
    filled: Tensor | None = None  # [R] bool: rows that received their first update
    score: Tensor | None = None  # scalar D, in the EMA dtype
    score_rows: Tensor | None = None  # [R], for per-sample selection
    entropy: Tensor | None = None  # [R] mean row entropy of the last observed map
    updates: int = 0
    _diff: Tensor | None = None  # |E - R| of the current call, assembled row by row
    _entropy: Tensor | None = None


@dataclass
class EMAGState:
    """The EMA of every candidate block for one call, and the per-step block choice."""

    config: ResolvedEMAG
    ema_rows: int
    score_timing: str  # "before" (SD3) or "after" (DiT)
    states: dict[int, LayerState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score_timing not in ("before", "after"):
            raise ValueError(f"score_timing must be 'before' or 'after', got {self.score_timing!r}.")
        self.states = {l: LayerState() for l in self.config.layers}
        self.need_entropy = self.config.selection in ("entropy", "entropy_adaptive")

    # -- selection ---------------------------------------------------------------------------------
    def choose(self) -> dict[int, bool | Tensor]:
        """Blocks to replace now: ``{layer: True}`` or, per sample, ``{layer: mask over EMA rows}``."""
        cfg = self.config
        if cfg.per_sample and cfg.selection != "all":
            masks = select_layers_per_row(
                cfg.layers, {l: s.score_rows for l, s in self.states.items()},
                {l: s.entropy for l, s in self.states.items()} if self.need_entropy else None,
                cfg.selection, cfg.entropy_top_k, self.ema_rows,
            )
            return {l: m for l, m in masks.items() if bool(m.any())}
        scores = {l: (None if s.score is None else float(s.score.median())) for l, s in self.states.items()}
        ents = {l: (None if s.entropy is None else float(s.entropy.median())) for l, s in self.states.items()}
        return {l: True for l in select_layers(cfg.layers, scores, ents, cfg.selection, cfg.entropy_top_k)}

    def scores(self) -> dict[int, float | None]:
        return {l: (None if s.score is None else float(s.score.median())) for l, s in self.states.items()}

    # -- feeding -------------------------------------------------------------------------------------
    def feed(self, layer: int, live: Tensor, ema_rows: slice) -> None:
        """Feed ``live`` (the rows ``ema_rows`` of the EMA) into block ``layer``'s EMA (emag.md section 3)."""
        st = self.states[layer]
        x = live.detach().to(self.config.ema_dtype)
        shape = (self.ema_rows, *x.shape[1:])
        if st.ema is None:
            st.ema = torch.zeros(shape, dtype=x.dtype, device=x.device)
            st.filled = torch.zeros(self.ema_rows, dtype=torch.bool)
        if tuple(st.ema.shape) != shape:
            raise RuntimeError(f"EMAG block {layer}: the EMA has shape {tuple(st.ema.shape)} but this pass gives "
                               f"{tuple(shape)}; the batch or resolution changed within one call.")
        if st._diff is None:
            st._diff = torch.zeros_like(st.ema)
            st._entropy = torch.zeros(self.ema_rows, dtype=x.dtype, device=x.device) if self.need_entropy else None
        e = st.ema[ema_rows]
        idx = torch.arange(self.ema_rows)[ema_rows]
        if not bool(st.filled[idx].all()):
            if bool(st.filled[idx].any()):
                raise RuntimeError(f"EMAG block {layer}: a feed covers partly initialised EMA rows.")
            e.copy_(x)  # first update: E := R, D := 0
            st._diff[ema_rows] = 0
            st.filled[idx] = True
        else:
            if self.score_timing == "before":
                st._diff[ema_rows] = (e - x).abs()
            ema_update_(e, x, self.config.beta)
            if self.score_timing == "after":
                st._diff[ema_rows] = (e - x).abs()
        if self.need_entropy:
            st._entropy[ema_rows] = row_entropy(x)

    def finish(self, layer: int) -> None:
        """Close one intercepted call: the score over ALL EMA rows, as one whole-tensor update gives it."""
        st = self.states[layer]
        if st._diff is None:
            return
        st.score = st._diff.mean()
        if self.config.per_sample:
            st.score_rows = st._diff.flatten(1).mean(dim=1)
        if self.need_entropy:
            st.entropy = st._entropy
        st.updates += 1
        st._diff = st._entropy = None

    def replacement(self, layer: int, live: Tensor, ema_rows: slice) -> Tensor:
        st = self.states[layer]
        if st.ema is None or not bool(st.filled[torch.arange(self.ema_rows)[ema_rows]].all()):
            raise RuntimeError(f"EMAG block {layer} was chosen for replacement before its EMA was fed; "
                               "the replacement window must not start before the EMA window.")
        return blend(st.ema[ema_rows], live, self.config.blend)


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

    def __init__(self, state: EMAGState, layer: int, ema_rows: slice, repeats: int = 1) -> None:
        self.state, self.layer, self.ema_rows, self.repeats = state, layer, ema_rows, repeats
        self.needs_probs = state.config.variant == "full"

    def query(self, q, k, v, info: AttentionInfo, rows):
        if self.state.config.variant == "q":
            for _ in range(self.repeats):
                self.state.feed(self.layer, q[:, :, :info.num_image_tokens], self.ema_rows)
        return q

    def probs(self, p, info: AttentionInfo, rows):
        for _ in range(self.repeats):
            self.state.feed(self.layer, _tracked(p, info.num_image_tokens, self.state.config.rows), self.ema_rows)
        return p

    def finish(self, info: AttentionInfo) -> None:
        self.state.finish(self.layer)


class EMAGReplace(AttentionEdit):
    """Replace a group's tracked attention rows (full) or image queries (q) by the EMA."""

    def __init__(self, state: EMAGState, layer: int, ema_rows: slice, mask: bool | Tensor = True) -> None:
        self.state, self.layer, self.ema_rows = state, layer, ema_rows
        self.row_mask = mask[ema_rows] if isinstance(mask, Tensor) else None
        self.needs_probs = state.config.variant == "full"

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

    def probs(self, p, info: AttentionInfo, rows):
        cfg, n = self.state.config, info.num_image_tokens
        edited = p.clone()
        new = self.state.replacement(self.layer, _tracked(p, n, cfg.rows), self.ema_rows)
        if cfg.rows == "image_rows":
            edited[:, :, :n] = new
        else:
            keys = slice(None, n) if cfg.rows == "img2img" else slice(n, None)
            edited[:, :, :n, keys] = new
            edited[:, :, :n] = renormalize_rows(edited[:, :, :n])
        return self._masked(edited, p)
