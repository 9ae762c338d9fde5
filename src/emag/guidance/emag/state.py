"""EMAG's per-call state: the EMA of every candidate block, its score, the block choice, the storage.

The EMA of a candidate block is one tensor ``E`` whose batch rows ("EMA rows") are fixed for the call
(see :mod:`.protocols`). A branch's rows in a forward pass map onto EMA rows, so the same state can be
fed from one batched pass, from two groups of one pass, or from two passes. Each update feeds the live
tensor into ``E``; the score ``D = mean|E - R|`` over all EMA rows is computed before or after the
update (by protocol) and finalised once every EMA row of the update was fed, exactly as one update of
the whole tensor gives it (docs/method.md, the EMA state and its update).

The full-map EMA is held dense (``[R, H, N_i, N_k]``, as the reference) or factored (the past queries and
keys, see :mod:`emag.math.factored_ema`); the choice is made once per call, before its first pass
(:meth:`EMAGState.choose_storage`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...families.base import AttentionGeometry
from ...math.ema import blend, ema_deviation_sums, ema_update_, head_chunks, row_entropy
from ...math.factored_ema import (
    StoredUpdate,
    decay_and_append,
    factored_output,
    factored_statistics,
)
from ...math.selection import select_layers, select_layers_per_row
from ...plumbing.edits import AttentionInfo
from .settings import ResolvedEMAG

# the EMA is fed by chunks of heads of at most this many elements (the temporaries of one chunk)
FEED_CHUNK_ELEMENTS = 1 << 22


@dataclass
class LayerState:
    """Per-block EMA state. ``ema`` is ``[R, H, N_i, K]`` (full) or ``[R, H, N_i, d]`` (q), R EMA rows."""

    ema: Tensor | None = None
    filled: list[bool] | None = None  # per EMA row: it received its first update
    score: Tensor | None = None  # scalar D, in the EMA dtype
    score_rows: Tensor | None = None  # [R], for per-sample selection
    entropy: Tensor | None = None  # [R] mean row entropy of the last observed map
    updates: int = 0
    stored: list[StoredUpdate] = field(default_factory=list)  # factored storage: the past Q, K and weights
    elements_per_row: int = 0  # factored storage: H * N_i * N_k
    _diff_sum: Tensor | None = None  # sum |E - R| per EMA row in the current update, float64
    _entropy: Tensor | None = None
    _round: list[bool] | None = None  # per EMA row: fed in the current update (it may span several passes)
    _first: bool = False  # the open update is the first one of its rows (E := R)
    _sums: Tensor | None = None  # sum |E - R| per fed row in the open update, float64
    _next_head: int = 0  # the open update has fed the heads before this one

    @property
    def nbytes(self) -> int:
        dense = 0 if self.ema is None else self.ema.numel() * self.ema.element_size()
        seen: dict[int, int] = {}  # repeated updates (DiT's emag_only null passes) share one stored tensor
        for u in self.stored:
            for t in (u.query, u.key):  # keyed by storage (data pointers are all 0 on the meta device)
                seen[id(t.untyped_storage())] = t.numel() * t.element_size()
        return dense + sum(seen.values())


def dense_budget_bytes(device: torch.device) -> int:
    """The most memory ``ema_storage="auto"`` lets dense full-map EMAs take: half of what is free.

    CUDA: half of ``torch.cuda.mem_get_info``'s free memory at the first feed of the call; other devices:
    half of the available physical memory. Dense storage is the reference's numerics, so it is kept
    whenever it fits with room to spare: beyond the EMA the fast path holds about what CFG holds (the
    map is built by chunks of heads), and the weights are already allocated when this is asked.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def compact(t: Tensor) -> Tensor:
    """``t`` itself, or a copy when it is a view that would keep a larger tensor alive."""
    t = t.detach()
    if not t.is_contiguous() or t.untyped_storage().nbytes() > t.numel() * t.element_size():
        return t.contiguous() if not t.is_contiguous() else t.clone()
    return t


@dataclass
class EMAGState:
    """The EMA of every candidate block for one call, and the per-step block choice."""

    config: ResolvedEMAG
    ema_rows: int
    score_timing: str  # "before" (SD3) or "after" (DiT)
    states: dict[int, LayerState] = field(default_factory=dict)
    storage: str | None = None  # "dense" or "factored": decided by :meth:`choose_storage` before the call
    stored_updates: int | None = None  # distinct (Q, K) updates per EMA row the call will store, if known

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

    # -- storage -------------------------------------------------------------------------------------
    def choose_storage(self, geometry: AttentionGeometry, model_dtype: torch.dtype, device: torch.device) -> str:
        """Decide, once per call before its first pass, how the full-map EMA is held (``ema_storage``).

        ``"auto"`` chooses factored storage only when the dense maps of all candidate blocks exceed
        :func:`dense_budget_bytes` AND the factored state of the whole call (``stored_updates`` past
        queries and keys per row, in the model's dtype) is smaller than the dense one: it pays for large
        maps and few steps (e.g. SD3 at 1024 px and above), not for long DiT schedules.
        """
        cfg = self.config
        if cfg.variant != "full":
            self.storage = "dense"
        elif cfg.ema_storage != "auto":
            self.storage = cfg.ema_storage
        elif cfg.rows != "image_rows":
            self.storage = "dense"
        else:
            g = geometry
            itemsize = torch.empty((), dtype=cfg.ema_dtype).element_size()
            dense = self.ema_rows * g.heads * g.image_tokens * g.key_tokens * itemsize * len(cfg.layers)
            factored = 0
            if self.stored_updates is not None:
                per_update = g.heads * (g.image_tokens + g.key_tokens) * g.head_dim * \
                    torch.empty((), dtype=model_dtype).element_size()
                factored = self.stored_updates * self.ema_rows * per_update * len(cfg.layers)
            pays = factored < dense
            self.storage = "factored" if pays and dense > dense_budget_bytes(device) else "dense"
        return self.storage

    @property
    def factored(self) -> bool:
        return self.storage == "factored"

    @property
    def nbytes(self) -> int:
        """Bytes held by the EMA state now (dense maps or stored queries/keys)."""
        return sum(s.nbytes for s in self.states.values())

    # -- feeding -------------------------------------------------------------------------------------
    def _first_rows(self, st: LayerState, layer: int, ema_rows: slice) -> bool:
        rows = st.filled[ema_rows]
        if all(rows):
            return False
        if any(rows):
            raise RuntimeError(f"EMAG block {layer}: a feed covers partly initialised EMA rows.")
        st.filled[ema_rows] = [True] * len(rows)
        return True

    def feed_factored(self, layer: int, query: Tensor, key: Tensor, ema_rows: slice, info: AttentionInfo) -> None:
        """:meth:`feed` for factored storage: record the live ``(Q, K)``; the score by a tiled reduction."""
        st = self.states[layer]
        if st.filled is None:
            st.filled = [False] * self.ema_rows
            st.elements_per_row = query.shape[1] * query.shape[2] * key.shape[2]
        if query.shape[1] * query.shape[2] * key.shape[2] != st.elements_per_row:
            raise RuntimeError(f"EMAG block {layer}: the attention map changed size within one call.")
        if st._diff_sum is None:
            st._diff_sum = torch.zeros(self.ema_rows, dtype=torch.float64)
            st._entropy = torch.zeros(self.ema_rows, dtype=torch.float64) if self.need_entropy else None
        self._mark_round(st, layer, ema_rows)
        first = self._first_rows(st, layer, ema_rows)
        acc = torch.float64 if self.config.ema_dtype == torch.float64 else torch.float32
        stats = dict(scale=info.scale, scale_queries_first=info.family.scale_queries_first, acc_dtype=acc)
        query, key = compact(query), compact(key)
        dev = ent = None
        if self.score_timing == "before" or first:
            dev, ent = factored_statistics(st.stored, ema_rows, query, key, want_deviation=not first,
                                           want_entropy=self.need_entropy, **stats)
        decay_and_append(st.stored, ema_rows, query, key, self.config.beta, first, self.ema_rows)
        if self.score_timing == "after" and not first:
            dev, ent = factored_statistics(st.stored, ema_rows, query, key, want_deviation=True,
                                           want_entropy=self.need_entropy, **stats)
        st._diff_sum[ema_rows] = 0.0 if dev is None else dev.cpu()
        if self.need_entropy:
            st._entropy[ema_rows] = ent.cpu()

    def feed(self, layer: int, live: Tensor, ema_rows: slice) -> None:
        """Feed ``live`` (the rows ``ema_rows`` of the EMA) into block ``layer``'s EMA (docs/method.md section 3)."""
        live = live.detach()
        self.begin_feed(layer, live.shape, live.device, ema_rows)
        self.feed_heads(layer, live, ema_rows)
        self.end_feed(layer, ema_rows, live)

    def begin_feed(self, layer: int, shape: torch.Size, device: torch.device, ema_rows: slice) -> None:
        """Open one update of the rows ``ema_rows`` by a live tensor of ``shape``; then :meth:`feed_heads`
        over all heads (at once or by chunks of heads, in order) and :meth:`end_feed`."""
        st = self.states[layer]
        dtype = self.config.ema_dtype
        shape = (self.ema_rows, *shape[1:])
        if st.ema is None:
            st.ema = torch.zeros(shape, dtype=dtype, device=device)
            st.filled = [False] * self.ema_rows
        if tuple(st.ema.shape) != shape:
            raise RuntimeError(f"EMAG block {layer}: the EMA has shape {tuple(st.ema.shape)} but this pass gives "
                               f"{tuple(shape)}; the batch or resolution changed within one call.")
        if st._diff_sum is None:
            st.elements_per_row = st.ema[0].numel()
            st._diff_sum = torch.zeros(self.ema_rows, dtype=torch.float64, device=device)
            st._entropy = torch.zeros(self.ema_rows, dtype=dtype, device=device) if self.need_entropy else None
        self._mark_round(st, layer, ema_rows)
        st._first = self._first_rows(st, layer, ema_rows)
        st._sums = torch.zeros(st.ema[ema_rows].shape[0], dtype=torch.float64, device=device)
        st._next_head = 0

    def feed_heads(self, layer: int, live: Tensor, ema_rows: slice, heads: slice = slice(None)) -> None:
        """Feed the heads ``heads`` of the live tensor (``live`` holds those heads only) into the EMA.

        The update is elementwise, so any split into chunks of heads gives the same EMA bit for bit; the
        score's sums are taken over :func:`head_chunks` of what is fed, so feeding by the same chunks
        gives the same score bit for bit.
        """
        st = self.states[layer]
        e = st.ema[ema_rows][:, heads]
        start = range(st.ema.shape[1])[heads].start
        if start != st._next_head or tuple(live.shape) != tuple(e.shape):
            raise RuntimeError(f"EMAG block {layer}: heads fed out of order or with the wrong shape "
                               f"({tuple(live.shape)} for heads from {start}, expected {tuple(e.shape)} from "
                               f"{st._next_head}).")
        st._next_head = start + e.shape[1]
        dtype, beta = self.config.ema_dtype, self.config.beta
        for h in head_chunks(e.shape, FEED_CHUNK_ELEMENTS):  # elementwise update: by chunks of heads, no map-sized temporaries
            x, eh = live[:, h].to(dtype), e[:, h]
            if st._first:
                eh.copy_(x)  # first update: E := R, D := 0
                continue
            if self.score_timing == "before":
                st._sums += ema_deviation_sums(eh, x)
            ema_update_(eh, x, beta)
            if self.score_timing == "after":
                st._sums += ema_deviation_sums(eh, x)

    def end_feed(self, layer: int, ema_rows: slice, live: Tensor | None = None) -> None:
        """Close the update opened by :meth:`begin_feed` (``live``: the whole live tensor, for the entropy)."""
        st = self.states[layer]
        if st._next_head != st.ema.shape[1]:
            raise RuntimeError(f"EMAG block {layer}: an update fed {st._next_head} of {st.ema.shape[1]} heads.")
        st._diff_sum[ema_rows] = st._sums
        st._sums = None
        if self.need_entropy:
            if live is None:
                raise RuntimeError("EMAG's entropy selection needs the whole live map of an update.")
            st._entropy[ema_rows] = row_entropy(live.to(self.config.ema_dtype))

    def _mark_round(self, st: LayerState, layer: int, ema_rows: slice) -> None:
        if st._round is None or all(st._round):
            # a new update (DiT's normal pass feeds cond then uncond into the same rows in ONE call:
            # two updates, the score of the second one stands)
            st._round = [False] * self.ema_rows
        rows = st._round[ema_rows]
        if any(rows):
            raise RuntimeError(f"EMAG block {layer}: EMA rows fed twice within one update (rows "
                               f"{ema_rows.start}-{ema_rows.stop - 1} of {self.ema_rows}).")
        st._round[ema_rows] = [True] * len(rows)

    def finish(self, layer: int) -> None:
        """Close one intercepted call. Once every EMA row has been fed (in this call or, when the rows run
        in separate passes, over several), the score over ALL EMA rows, as one whole-tensor update
        gives it."""
        st = self.states[layer]
        if st._diff_sum is None or not all(st._round):
            return
        st._round = None
        # dense storage: the mean in the EMA dtype, as one whole-tensor ``mean`` gives it (float16 on SD3)
        dtype = st.ema.dtype if st.ema is not None else torch.float64
        st.score = (st._diff_sum.sum() / (self.ema_rows * st.elements_per_row)).to(dtype)
        if self.config.per_sample:
            st.score_rows = (st._diff_sum / st.elements_per_row).to(dtype)
        if self.need_entropy:
            st.entropy = st._entropy
        st.updates += 1
        st._diff_sum = st._entropy = None

    def _check_fed(self, layer: int, ema_rows: slice) -> LayerState:
        st = self.states[layer]
        if st.filled is None or not all(st.filled[ema_rows]):
            raise RuntimeError(f"EMAG block {layer} was chosen for replacement before its EMA was fed; "
                               "the replacement window must not start before the EMA window.")
        return st

    def replacement(self, layer: int, live: Tensor, ema_rows: slice, heads: slice = slice(None)) -> Tensor:
        """``lambda E + (1 - lambda) R`` for the rows ``ema_rows`` and heads ``heads`` (``live`` holds them)."""
        st = self._check_fed(layer, ema_rows)
        return blend(st.ema[ema_rows][:, heads], live, self.config.blend)

    def replace_into(self, layer: int, live: Tensor, ema_rows: slice, heads: slice = slice(None)) -> None:
        """Hard replacement (``lambda = 1``) written into ``live`` in place: the same values as
        :meth:`replacement` without a second map-sized tensor."""
        live.copy_(self._check_fed(layer, ema_rows).ema[ema_rows][:, heads])

    def ema_map(self, layer: int, ema_rows: slice, heads: slice = slice(None)) -> Tensor:
        """The dense EMA of the rows ``ema_rows`` and heads ``heads`` (a view, storage dtype)."""
        return self._check_fed(layer, ema_rows).ema[ema_rows][:, heads]

    def replacement_output(self, layer: int, live_out: Tensor, value: Tensor, ema_rows: slice, sdpa,
                           scale: float) -> Tensor:
        """Factored storage: the tracked rows' output ``lambda E V + (1 - lambda) R V`` in ``live_out``'s dtype."""
        st = self._check_fed(layer, ema_rows)
        ev = factored_output(st.stored, ema_rows, value, sdpa, scale)
        lam = self.config.blend
        return (lam * ev + (1.0 - lam) * live_out.float()).to(live_out.dtype) if lam != 1.0 else ev.to(live_out.dtype)


def map_head_chunks(state: EMAGState, shape: tuple[int, ...], info: AttentionInfo) -> list[slice] | None:
    """The chunks of heads a dense full-map EMA takes its live map by: those :meth:`EMAGState.feed_heads`
    sums the score over, so the map built chunk by chunk gives the same EMA and score bit for bit.
    None (the whole map) for the options whose statistics span heads or whose tracked block is part of a
    row (entropy selection, ``img2img`` / ``img2txt``)."""
    cfg = state.config
    if cfg.variant != "full" or state.factored or cfg.rows != "image_rows" or state.need_entropy:
        return None
    return head_chunks((shape[0], shape[1], min(shape[2], info.num_image_tokens), *shape[3:]), FEED_CHUNK_ELEMENTS)
