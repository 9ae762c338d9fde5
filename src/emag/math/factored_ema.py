"""The full-map EMA without storing the map: a weighted sum of past attention maps (docs/speed-and-memory.md section 4).

The EMA of attention maps after ``n`` updates ``R_1 .. R_n`` (``E := R_1``, then
``E := beta E + (1 - beta) R``, docs/method.md section 3) is, exactly,

    E_n = beta^(n-1) R_1 + sum_{j=2..n} (1 - beta) beta^(n-j) R_j,   R_j = softmax(Q_j K_j^T * s).

So the state can be the past ``(Q_j, K_j)`` and one weight per update and row (``O(updates x N x d)``
memory instead of ``O(N^2)``):

- the replaced block output is ``E V = sum_j w_j softmax(Q_j K_j^T s) V``: one fused attention call per
  stored update, with the LIVE values ``V`` (:func:`factored_output`);
- the layer score ``mean |E - R|`` and the row entropy of the live map are tiled reductions that never
  hold more than a few query rows of a map at a time (:func:`factored_statistics`).

Both are evaluated in float32 (or the EMA dtype if wider); they equal the dense path with a float32
EMA up to summation order, not the reference's float16 in-place updates bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .ema import attention_probs

# The largest map tile (elements) the tiled reductions materialise at once: 64 MiB in float32 on the CPU,
# 256 MiB on an accelerator (fewer, larger kernels).
DEFAULT_TILE_ELEMENTS = {"cpu": 1 << 24}
ACCELERATOR_TILE_ELEMENTS = 1 << 26


def tile_elements_for(device: torch.device) -> int:
    return DEFAULT_TILE_ELEMENTS.get(device.type, ACCELERATOR_TILE_ELEMENTS)


@dataclass
class StoredUpdate:
    """One EMA update of rows ``rows`` (of the EMA's R rows): the live queries/keys it was computed from.

    ``weight`` is ``[R]`` float64, the update's current coefficient in ``E`` per EMA row (0 outside
    ``rows``); :func:`decay_and_append` keeps it current.
    """

    rows: slice
    query: Tensor  # [r, H, Nq, d] (the tracked queries: image queries for SD3, all for DiT)
    key: Tensor  # [r, H, Nk, d]
    weight: Tensor  # [R] float64

    @property
    def nbytes(self) -> int:
        return self.query.numel() * self.query.element_size() + self.key.numel() * self.key.element_size()


def decay_and_append(updates: list[StoredUpdate], rows: slice, query: Tensor, key: Tensor, beta: float,
                     first: bool, num_rows: int) -> None:
    """Record one EMA update of ``rows``: ``E := beta E + (1 - beta) R`` (or ``E := R`` when ``first``)."""
    idx = torch.arange(num_rows)[rows]
    for u in updates:
        u.weight[idx] *= beta
    w = torch.zeros(num_rows, dtype=torch.float64)
    w[idx] = 1.0 if first else 1.0 - beta
    updates.append(StoredUpdate(rows, query.detach(), key.detach(), w))


def _overlap(a: slice, b: slice) -> slice | None:
    lo, hi = max(a.start, b.start), min(a.stop, b.stop)
    return slice(lo, hi) if lo < hi else None


def _shift(s: slice, by: int) -> slice:
    return slice(s.start - by, s.stop - by)


def _weights(u: StoredUpdate, ov: slice, dtype: torch.dtype, device) -> Tensor:
    return u.weight[ov].to(device=device, dtype=dtype).view(-1, 1, 1, 1)


def factored_output(updates: Sequence[StoredUpdate], rows: slice, value: Tensor,
                    sdpa: Callable[..., Tensor], scale: float) -> Tensor:
    """``E V`` for EMA rows ``rows`` (``value`` holds exactly those rows): ``sum_j w_j sdpa(Q_j, K_j, V)``.

    ``sdpa`` is the fused attention function; it is called once per stored update. Accumulates in
    float32; returns ``[r, H, Nq, d_v]`` in float32.
    """
    acc = None
    for u in updates:
        ov = _overlap(rows, u.rows)
        if ov is None:
            continue
        loc, own = _shift(ov, rows.start), _shift(ov, u.rows.start)
        part = sdpa(u.query[own], u.key[own], value[loc], scale=scale).float() * _weights(u, ov, torch.float32,
                                                                                           value.device)
        if acc is None:
            shape = (rows.stop - rows.start, *part.shape[1:])
            acc = torch.zeros(shape, dtype=torch.float32, device=value.device)
        acc[loc] += part
    if acc is None:
        raise RuntimeError("The factored EMA has no update for these rows yet.")
    return acc


def factored_statistics(updates: Sequence[StoredUpdate], rows: slice, query: Tensor, key: Tensor, scale: float,
                        scale_queries_first: bool, want_deviation: bool, want_entropy: bool,
                        acc_dtype: torch.dtype = torch.float32,
                        tile_elements: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Per EMA row of ``rows``: ``sum |E - R|`` over (head, query, key) and the mean row entropy of ``R``.

    ``R = softmax(query key^T s)`` is the live map of those rows (computed in the query dtype, as the
    dense path does), ``E`` the EMA held by ``updates``. The maps are built ``T`` query rows at a time,
    ``T`` chosen so that one tile holds at most ``tile_elements`` elements (default: by device, see
    :func:`tile_elements_for`). Returns float64 ``[r]`` tensors (or None when not wanted).
    """
    r, h, nq, _ = query.shape
    nk = key.shape[2]
    dev = query.device
    tile = max(1, (tile_elements or tile_elements_for(dev)) // max(1, r * h * nk))
    terms = []  # (rows in this call, rows in the update, weights on the device, update), built once
    for u in updates if want_deviation else ():
        ov = _overlap(rows, u.rows)
        if ov is not None:
            terms.append((_shift(ov, rows.start), _shift(ov, u.rows.start), _weights(u, ov, acc_dtype, dev), u))
    dev_sum = torch.zeros(r, dtype=torch.float64, device=dev) if want_deviation else None
    ent_sum = torch.zeros(r, dtype=torch.float64, device=dev) if want_entropy else None
    for t0 in range(0, nq, tile):
        tq = slice(t0, min(nq, t0 + tile))
        live = attention_probs(query[:, :, tq], key, scale, scale_queries_first).to(acc_dtype)
        if want_entropy:
            ent_sum += (-(live * live.clamp_min(1e-12).log()).sum(dim=-1)).sum(dim=(1, 2)).double()
        if not want_deviation:
            continue
        ema = torch.zeros_like(live)
        for loc, own, w, u in terms:
            past = attention_probs(u.query[own][:, :, tq], u.key[own], scale, scale_queries_first)
            ema[loc] += w * past.to(acc_dtype)
        dev_sum += (ema - live).abs().sum(dim=(1, 2, 3)).double()
    return dev_sum, (None if ent_sum is None else ent_sum / (h * nq))
