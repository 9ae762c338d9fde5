"""EMAG's attention edit on the candidate blocks, and the EMA state of one pipeline call.

The pipeline decides, per forward pass, what each candidate block does (:class:`LayerAction`):
feed its EMA with this pass's live tensor (``update``) and/or replace the tracked rows by the EMA
(``replace``). Observation never changes a pass's output (the output is then the model's own fused
attention); only a replacement does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import ResolvedEMAG
from ..math.ema import attention_probs, blend, ema_score, ema_score_per_row, ema_update_, renormalize_rows, row_entropy
from ..math.selection import select_layers, select_layers_per_row
from .architectures import Architecture, attention_modules
from .intercept import AttentionCall, bind_sdpa, route_attention


@dataclass
class LayerAction:
    """What one candidate block does in one forward pass.

    ``update`` says how this pass's live tensor feeds the EMA: False/0 never, True/1 once, an int n
    n times, or a sequence of row slices fed one after the other (e.g. the cond half, then the uncond
    half of a batched ``[cond ; uncond]`` pass, which is DiT's cond-then-uncond update order).
    ``replace`` is False, True (every batch row of the pass) or a bool mask over the pass's rows.
    """

    update: int | bool | tuple[slice, ...] = False
    replace: bool | Tensor = False

    @property
    def feeds(self) -> tuple[slice, ...]:
        if isinstance(self.update, (tuple, list)):
            return tuple(self.update)
        return (slice(None),) * int(self.update)

    @property
    def active(self) -> bool:
        return bool(self.feeds) or self.replace is not False


@dataclass
class LayerState:
    """Per-block EMA state. ``ema`` is ``[B, H, N_i, K]`` (full) or ``[B, H, N_i, d]`` (q)."""

    ema: Tensor | None = None
    score: Tensor | None = None  # scalar D = mean|E - R|, in the EMA dtype
    score_rows: Tensor | None = None  # [B], only for per-sample selection
    entropy: Tensor | None = None  # [B] mean row entropy of the last observed map
    updates: int = 0


@dataclass
class EMAGAttention:
    """The EMA state and attention edit of one EMAG run (one pipeline call).

    ``score_timing`` is the backbone's reference order: ``"before"`` (SD3: D is computed before the
    EMA update, on the live tensor) or ``"after"`` (DiT: D = mean|E_new - R|).
    """

    transformer: nn.Module
    arch: Architecture
    config: ResolvedEMAG
    score_timing: str
    states: dict[int, LayerState] = field(default_factory=dict)
    _actions: dict[int, LayerAction] = field(default_factory=dict)
    _calls: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.score_timing not in ("before", "after"):
            raise ValueError(f"score_timing must be 'before' or 'after', got {self.score_timing!r}.")
        self.states = {l: LayerState() for l in self.config.layers}
        self._need_entropy = self.config.selection in ("entropy", "entropy_adaptive")

    # -- scope -------------------------------------------------------------------------------------
    @contextmanager
    def installed(self) -> Iterator["EMAGAttention"]:
        """Install the interception on the candidate blocks for the duration of a pipeline call."""
        modules = attention_modules(self.transformer, self.arch, self.config.layers)
        with route_attention(modules, self._handle):
            yield self

    @contextmanager
    def forward_pass(self, actions: dict[int, LayerAction]) -> Iterator[None]:
        """Run one forward pass with ``actions``; afterwards check every active block was reached once."""
        self._actions = {l: a for l, a in actions.items() if a.active}
        self._calls = {l: 0 for l in self.config.layers}
        try:
            yield
        finally:
            actions_done, self._actions = self._actions, {}
        for layer in actions_done:
            n = self._calls[layer]
            if n != 1:
                raise RuntimeError(
                    f"EMAG block {layer} was selected but its attention ran {n} times in this forward pass "
                    "(expected exactly once). EMAG intercepts torch's scaled_dot_product_attention inside "
                    f"`{self.arch.blocks_attr}[{layer}].{self.arch.attention_attr}`; a non-native attention "
                    "backend, a custom processor or an adapter can bypass or repeat it."
                )

    # -- selection ---------------------------------------------------------------------------------
    def choose(self, batch_size: int) -> dict[int, bool | Tensor]:
        """The blocks to replace this step: ``{layer: True}`` or, per sample, ``{layer: row mask}``."""
        cfg = self.config
        if cfg.per_sample and cfg.selection != "all":
            masks = select_layers_per_row(
                cfg.layers,
                {l: s.score_rows for l, s in self.states.items()},
                {l: s.entropy for l, s in self.states.items()} if self._need_entropy else None,
                cfg.selection, cfg.entropy_top_k, batch_size,
            )
            return {l: m for l, m in masks.items() if bool(m.any())}
        scores = {l: (None if s.score is None else float(s.score.median())) for l, s in self.states.items()}
        entropies = {l: (None if s.entropy is None else float(s.entropy.median())) for l, s in self.states.items()}
        return {l: True for l in select_layers(cfg.layers, scores, entropies, cfg.selection, cfg.entropy_top_k)}

    # -- the edit ----------------------------------------------------------------------------------
    def _observe(self, layer: int, live: Tensor) -> None:
        """Feed one live tensor into the EMA of ``layer`` (emag.md section 3, with the backbone's order)."""
        st = self.states[layer]
        x = live.detach().to(self.config.ema_dtype)
        if st.ema is None:
            st.ema = x.clone()
            st.score = torch.zeros((), dtype=x.dtype, device=x.device)
            st.score_rows = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        else:
            if st.ema.shape != x.shape:
                raise RuntimeError(
                    f"EMAG block {layer}: the EMA has shape {tuple(st.ema.shape)} but this pass gives "
                    f"{tuple(x.shape)}; the batch or resolution changed within one call."
                )
            if self.score_timing == "before":
                self._score(st, x)
            ema_update_(st.ema, x, self.config.beta)
            if self.score_timing == "after":
                self._score(st, x)
        if self._need_entropy:
            st.entropy = row_entropy(x)
        st.updates += 1

    def _score(self, st: LayerState, x: Tensor) -> None:
        st.score = ema_score(st.ema, x)
        if self.config.per_sample:
            st.score_rows = ema_score_per_row(st.ema, x)

    def _replacement(self, layer: int, live: Tensor, rows: bool | Tensor) -> Tensor:
        st = self.states[layer]
        if st.ema is None:
            raise RuntimeError(
                f"EMAG block {layer} was chosen for replacement before its EMA was ever fed; "
                "the replacement window must not start before the EMA window."
            )
        new = blend(st.ema, live, self.config.blend)
        if isinstance(rows, Tensor):
            mask = rows.to(live.device).view(-1, *([1] * (live.dim() - 1)))
            new = torch.where(mask, new, live)
        return new

    def _handle(self, call: AttentionCall, sdpa, args: tuple, kwargs: dict) -> Tensor:
        self._calls[call.layer] = self._calls.get(call.layer, 0) + 1
        action = self._actions.get(call.layer)
        if action is None:
            return sdpa(*args, **kwargs)
        a = bind_sdpa(args, kwargs)
        if a["dropout_p"] or a["is_causal"]:
            raise RuntimeError("EMAG does not support attention dropout or causal masks.")
        q, k, v = a["query"], a["key"], a["value"]
        n_img = q.shape[2] if self.arch.token_layout == "image_only" else call.num_image_tokens
        if self.config.variant == "q":
            return self._query_variant(call.layer, action, sdpa, a, q, k, v, n_img)
        return self._map_variant(call.layer, action, sdpa, args, kwargs, a, q, k, v, n_img)

    def _query_variant(self, layer, action, sdpa, a, q, k, v, n_img) -> Tensor:
        """EMAG-Q: EMA of the image query vectors; keys/values stay live; fused attention."""
        q_img = q[:, :, :n_img]
        for part in action.feeds:
            self._observe(layer, q_img[part])
        if action.replace is not False:
            q = torch.cat([self._replacement(layer, q_img, action.replace), q[:, :, n_img:]], dim=2)
        rest = {key: a[key] for key in ("attn_mask", "dropout_p", "is_causal", "scale") if key in a}
        return sdpa(q, k, v, **rest)

    def _map_variant(self, layer, action, sdpa, args, kwargs, a, q, k, v, n_img) -> Tensor:
        """Full EMAG: explicit softmax map, EMA of the tracked rows, replacement, then ``P V``."""
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        probs = attention_probs(q, k, scale, self.arch.scale_queries_first, a["attn_mask"])
        rows = self.config.rows
        tracked = probs[:, :, :n_img]  # image-query rows over all keys
        if rows == "img2img":
            tracked = tracked[..., :n_img]
        elif rows == "img2txt":
            tracked = tracked[..., n_img:]
            if tracked.shape[-1] == 0:
                raise RuntimeError("EMAG rows='img2txt' needs text keys, but this attention has none.")
        for part in action.feeds:
            self._observe(layer, tracked[part])
        if action.replace is False:
            return sdpa(*args, **kwargs)
        edited = probs.clone()
        new = self._replacement(layer, tracked, True)
        if rows == "image_rows":
            edited[:, :, :n_img] = new
        else:
            keys = slice(None, n_img) if rows == "img2img" else slice(n_img, None)
            edited[:, :, :n_img, keys] = new
            edited[:, :, :n_img] = renormalize_rows(edited[:, :, :n_img])
        if isinstance(action.replace, Tensor):
            edited = torch.where(action.replace.to(probs.device).view(-1, 1, 1, 1), edited, probs)
        return (edited @ v).to(q.dtype)
