"""The EMA of attention (or of queries) and the statistics EMAG selects layers by.

Paper: Yadav, Huy, Liu, "EMAG: Self-Rectifying Diffusion Sampling with Exponential Moving Average
Guidance", arXiv 2512.17303. Section references below are to docs/method.md.
"""

from __future__ import annotations

import torch
from torch import Tensor


def k2idx(k: float, num_steps: int, k_base: float = 250.0) -> int:
    """Map a window argument given in units of a ``k_base``-step schedule to a step index.

    ``k2idx(k, N) = clamp(round(k * (N - 1) / k_base), 0, N - 1)`` (docs/method.md section 6.2). ``round`` is
    Python's round-half-to-even, as in the reference code.
    """
    return max(0, min(num_steps - 1, int(round(k * (num_steps - 1) / float(k_base)))))


def ema_update_(ema: Tensor, live: Tensor, beta: float) -> Tensor:
    """In-place EMA update ``E := beta * E + (1 - beta) * R`` (docs/method.md section 3), in ``ema``'s dtype.

    Written as ``E.mul_(beta).add_(R, alpha=1 - beta)`` because that is the exact floating-point
    sequence the published numbers were made with (bit-exact in float16).
    """
    return ema.mul_(beta).add_(live.to(ema.dtype), alpha=1.0 - beta)


def ema_score(ema: Tensor, live: Tensor) -> Tensor:
    """Layer score ``D = mean(|E - R|)`` over every element, one scalar in ``ema``'s dtype (section 3)."""
    return (ema - live.to(ema.dtype)).abs().mean()


def ema_deviation_sums(ema: Tensor, live: Tensor) -> Tensor:
    """``sum |E - R|`` per batch row ``[B]``, with ``|E - R|`` rounded to ``ema``'s dtype first.

    The score of section 3 is these sums over all rows divided by the element count: the elementwise
    difference is evaluated in the EMA dtype (float16 on SD3, as the reference), the reduction in
    float32 (float64 for a float64 EMA), as a whole-tensor ``mean`` accumulates, without holding
    ``|E - R|`` for every row.
    """
    acc = torch.float64 if ema.dtype == torch.float64 else torch.float32
    return (ema - live.to(ema.dtype)).abs_().flatten(1).sum(dim=1, dtype=acc)


def head_chunks(shape: torch.Size | tuple[int, ...], max_elements: int = 1 << 22) -> list[slice]:
    """Slices of dim 1 (heads) of a ``[B, H, ...]`` tensor, each spanning at most ``max_elements``
    elements (at least one head): the EMA is fed chunk by chunk so that no map-sized temporary is held.

    The update of section 3 is elementwise, so feeding by chunks gives the same EMA bit for bit; the
    score's sum is then the sum of per-chunk float32 sums (added in float64), a different but equally
    accurate order than one float32 reduction (the reference's float16 ``mean`` has its own order).
    """
    per_head = 1
    for n in (shape[0], *shape[2:]):
        per_head *= int(n)
    step = max(1, max_elements // max(per_head, 1))
    return [slice(h, min(h + step, shape[1])) for h in range(0, shape[1], step)]


def ema_score_per_row(ema: Tensor, live: Tensor) -> Tensor:
    """``mean(|E - R|)`` per batch row, shape ``[B]``: the statistic of the opt-in per-sample selection."""
    return (ema - live.to(ema.dtype)).abs().flatten(1).mean(dim=1)


def blend(ema: Tensor, live: Tensor, lam: float) -> Tensor:
    """Apply rule ``R := lambda * E + (1 - lambda) * R`` in the live tensor's dtype (section 3).

    The published runs use ``lambda = 1`` (hard replacement): then the result is ``E`` cast to the
    live dtype, which is what the literal expression gives for finite ``R`` (``1 * E + 0 * R``), without
    evaluating it.
    """
    if lam == 1.0:
        return ema.to(live.dtype, copy=True)  # never the EMA itself: callers may edit the result
    return lam * ema.to(live.dtype) + (1.0 - lam) * live


def attention_probs(
    query: Tensor,
    key: Tensor,
    scale: float,
    scale_queries_first: bool,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Explicit ``P = softmax(Q K^T * scale)``, shape ``[B, H, Nq, Nk]``, in the query dtype.

    The two reference codes differ in rounding order: SD3 applies the scale after the matmul
    (``(Q K^T) * d^-0.5``), DiT scales the queries first (``(Q * d^-0.5) K^T``). ``scale_queries_first``
    selects the DiT order.
    """
    if scale_queries_first:
        logits = (query * scale) @ key.transpose(-2, -1)
    else:
        logits = (query @ key.transpose(-2, -1)).mul_(scale)
    # the map is the largest tensor EMAG builds: mask and softmax in place where that gives the same values
    in_place = not (torch.is_grad_enabled() and logits.requires_grad)
    if attn_mask is not None:
        fits = in_place and torch.broadcast_shapes(logits.shape, attn_mask.shape) == logits.shape
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill_(~attn_mask, float("-inf")) if fits else logits.masked_fill(~attn_mask, float("-inf"))
        elif fits and attn_mask.dtype == logits.dtype:
            logits = logits.add_(attn_mask)
        else:
            logits = logits + attn_mask
    return torch.softmax(logits, dim=-1, out=logits) if in_place else logits.softmax(dim=-1)


def renormalize_rows(rows: Tensor) -> Tensor:
    """Divide each attention row by its sum (clamped at 1e-12): used after a partial-row replacement.

    Applies to the ``img2img`` / ``img2txt`` tracked-row options, where only part of each image-query
    row is replaced by its EMA and the row no longer sums to one (docs/method.md section 3).
    """
    return rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def row_entropy(probs: Tensor) -> Tensor:
    """Mean row entropy per sample, shape ``[B]``: ``mean_{h,q} -sum_k P log P`` (section 4, modes 1 and 3).

    ``probs`` is ``[B, H, Q, K]``; probabilities are clamped at 1e-12 inside the log.
    """
    row = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)  # [B, H, Q]
    return row.mean(dim=-2).mean(dim=-1)
