"""Per-branch model edits inside one batched forward pass.

A forward pass evaluates several branches at once: its batch rows are split into :class:`RowGroup`s,
one per branch, each with the edits (perturbations or observers) that apply to its rows only. The
attention edits act inside the fused attention call of chosen blocks (intercepted with
:func:`route_attention`); block edits act on whole transformer blocks (forward hooks). Rows without
edits keep the model's own fused attention, bit for bit.

Every edit in a plan must be reached exactly once per forward pass; otherwise the pass raises, so a
perturbation can never silently do nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..families.base import ModelFamily
from ..math.ema import attention_probs
from .hooks import CallHooks
from .intercept import AttentionCall, bind_sdpa, route_attention


@dataclass(frozen=True)
class AttentionInfo:
    """What an attention edit may need to know about the intercepted call."""

    layer: int
    num_image_tokens: int  # the image tokens lead the sequence an edit sees (text-first calls are rotated)
    grid: tuple[int, ...] | None  # (H/p, W/p) image-token grid, row-major; (frames, H/p, W/p) for video
    family: ModelFamily
    scale: float


class AttentionEdit:
    """Base class: override the hooks you need. ``rows`` is the (start, stop) of the group's rows."""

    needs_probs: bool = False
    uses_mask: bool = False  # True when ``mask`` may return an attention mask
    modifies_output: bool = True  # False for observers (e.g. an EMA fed by a normal pass)
    edits_output: bool = False  # True when ``output`` rewrites the group's attention output
    # True when ``probs`` reads and rewrites only the image-query rows ``p[:, :, :num_image_tokens]``: a
    # group whose map-editing edits all say so gets the map of its image-query rows only, and the
    # output of its other query rows (SD3's text tokens) comes from fused attention.
    image_rows_only: bool = False

    def prepare(self, q: Tensor, k: Tensor, info: AttentionInfo, rows: tuple[int, int]) -> None:
        """Called before anything else in an intercepted call (e.g. to choose a storage by size)."""

    def query(self, q: Tensor, k: Tensor, v: Tensor, info: AttentionInfo, rows: tuple[int, int]) -> Tensor:
        return q

    def mask(self, q: Tensor, k: Tensor, info: AttentionInfo) -> Tensor | None:
        """An additive attention mask ``[1 or B, 1 or H, Nq, Nk]`` (e.g. PAG's identity map)."""
        return None

    def probs(self, p: Tensor, info: AttentionInfo, rows: tuple[int, int], heads: slice | None = None) -> Tensor:
        """Observe or rewrite the group's explicit map ``p``. ``p`` belongs to this group's call alone and
        may be rewritten in place; an edit must not keep a reference to it beyond the call. ``heads``: when
        the map is built by chunks of heads (see :meth:`head_chunks`), the heads ``p`` holds."""
        return p

    def head_chunks(self, shape: tuple[int, ...], info: AttentionInfo) -> list[slice] | None:
        """The chunks of heads this edit can take the map ``shape`` by (``probs`` is then called once per
        chunk, in order, between :meth:`begin_heads` and :meth:`end_heads`), or None for the whole map. A
        group's map is built by chunks only when all its map-reading edits ask for the same chunks."""
        return None

    def begin_heads(self, shape: tuple[int, ...], device: torch.device, info: AttentionInfo,
                    rows: tuple[int, int]) -> None:
        """Before the first chunk of heads of a map of ``shape``."""

    def end_heads(self, info: AttentionInfo, rows: tuple[int, int]) -> None:
        """After the last chunk of heads."""

    def given_map(self, info: AttentionInfo) -> bool:
        """True when ``probs`` would overwrite the whole map it is given without reading it (a hard
        replacement): the live map need not be computed, :meth:`map_for` supplies it."""
        return False

    def map_for(self, heads: slice, dtype: torch.dtype) -> Tensor:
        """The map ``probs`` would write, for the heads ``heads``, in ``dtype`` (see :meth:`given_map`)."""
        raise NotImplementedError

    def output(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, info: AttentionInfo, rows: tuple[int, int],
               sdpa) -> Tensor:
        """Rewrite the group's attention output ``[b, H, N, d]`` (``sdpa``: the fused attention function)."""
        return out

    def replaces_output(self, q: Tensor, k: Tensor, info: AttentionInfo) -> bool:
        """True when :meth:`output` ignores the attention it is given (it computes the whole output itself):
        the fused call is then not made."""
        return False

    def finish(self, info: AttentionInfo) -> None:
        """Called once per intercepted call after every group was processed."""


class ExplicitAttention(AttentionEdit):
    """Compute the group's attention explicitly for every query row, ``softmax((Q K^T) s) V``, instead of
    the fused kernel: the reference EMAG code's arithmetic at its candidate blocks. Other edits of the
    group (an EMA feed, a replacement) act on the same whole map."""

    needs_probs = True


class BlockEdit:
    """Base class for whole-block edits (skip, token permutation)."""

    def before(self, hidden: Tensor, encoder: Tensor | None, rows: slice) -> tuple[Tensor, Tensor | None]:
        return hidden, encoder

    def after(self, hidden_in: Tensor, encoder_in: Tensor | None, hidden_out: Tensor, encoder_out: Tensor | None,
              rows: slice) -> tuple[Tensor, Tensor | None]:
        return hidden_out, encoder_out


@dataclass
class RowGroup:
    """Rows ``[start, stop)`` of a forward pass belong to one branch, with its edits by block index."""

    branch: str
    start: int
    stop: int
    attention: dict[int, list[AttentionEdit]] = field(default_factory=dict)
    blocks: dict[int, list[BlockEdit]] = field(default_factory=dict)

    @property
    def rows(self) -> slice:
        return slice(self.start, self.stop)


@dataclass
class ForwardPlan:
    groups: list[RowGroup]
    grid: tuple[int, ...] | None = None

    @property
    def attention_layers(self) -> set[int]:
        return {l for g in self.groups for l, e in g.attention.items() if e}

    @property
    def block_layers(self) -> set[int]:
        return {l for g in self.groups for l, e in g.blocks.items() if e}


def _query_rows(mask: Tensor | None, rows: slice) -> Tensor | None:
    """The query rows ``rows`` of an attention mask (a mask broadcast over queries stays as it is)."""
    if isinstance(mask, Tensor) and mask.dim() >= 2 and mask.shape[-2] > 1:
        return mask[..., rows, :]
    return mask


def _head_rows(mask: Tensor | None, heads: slice) -> Tensor | None:
    """The heads ``heads`` of an attention mask (a mask broadcast over heads stays as it is)."""
    if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[1] > 1:
        return mask[:, heads]
    return mask


def _agreed_head_chunks(edits, shape: tuple[int, ...], info: AttentionInfo) -> list[slice] | None:
    """The chunks of heads every map-reading edit of a group asks for, when they agree on more than one."""
    wanted = [e.head_chunks(shape, info) for e in edits if e.needs_probs]
    first = wanted[0] if wanted else None
    if first is None or len(first) < 2 or any(w != first for w in wanted[1:]):
        return None
    return first


def _split_block_io(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor | None]:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    encoder = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return hidden, encoder


class EditScope:
    """Installs the interception for one pipeline call and applies the current :class:`ForwardPlan`."""

    def __init__(self, transformer: nn.Module, family: ModelFamily, attention_layers, block_layers) -> None:
        self.transformer = transformer
        self.family = family
        blocks = family.blocks(transformer)
        counts = family.block_counts(transformer)
        self.attention_modules = {l: family.attention_module(transformer, l) for l in sorted(attention_layers)}
        self.layouts = {l: family.token_layout(l, counts) for l in self.attention_modules}
        self.kinds = {l: family.attention_kind(l, counts) for l in self.attention_modules}
        self.addresses = {l: family.address(l, counts) for l in sorted(set(attention_layers) | set(block_layers))}
        self.block_modules = {l: blocks[l] for l in sorted(block_layers)}
        self.plan: ForwardPlan | None = None
        self._att_calls: dict[int, int] = {}
        self._block_calls: dict[int, int] = {}

    # -- installation ------------------------------------------------------------------------------
    @contextmanager
    def installed(self) -> Iterator["EditScope"]:
        hooks = CallHooks()  # act in this thread only; removed whatever raises
        try:
            for layer, module in self.block_modules.items():
                hooks.pre(module, self._block_pre(layer), with_kwargs=True)
                hooks.post(module, self._block_post(layer), with_kwargs=True)
            for layer, module in self.attention_modules.items():
                if self.kinds[layer] == "linear":  # edits of its queries: at the query projection's output
                    norm_q = getattr(module, "norm_q", None)
                    query_module = norm_q if norm_q is not None else module.to_q
                    hooks.post(query_module, self._linear_queries(layer, module.heads))
            fused = {l: m for l, m in self.attention_modules.items() if self.kinds[l] == "softmax"}
            with route_attention(fused, self._attention):
                yield self
        finally:
            hooks.remove()

    @contextmanager
    def forward(self, plan: ForwardPlan) -> Iterator[None]:
        """Run one forward pass under ``plan``; afterwards check every edit was reached once."""
        missing_att = plan.attention_layers - set(self.attention_modules)
        missing_blk = plan.block_layers - set(self.block_modules)
        if missing_att or missing_blk:
            raise RuntimeError(f"Edits planned on blocks that were not installed: {sorted(missing_att | missing_blk)}")
        self.plan = plan
        self._att_calls = {l: 0 for l in self.attention_modules}
        self._block_calls = {l: 0 for l in self.block_modules}
        self._block_inputs: dict[int, tuple] = {}
        try:
            yield
        finally:
            self.plan = None
        for kind, layers, calls in (("attention", plan.attention_layers, self._att_calls),
                                    ("block", plan.block_layers, self._block_calls)):
            for layer in sorted(layers):
                if calls[layer] != 1:
                    raise RuntimeError(
                        f"A guidance edit on block {self.addresses[layer]} expected exactly one {kind} call in this "
                        f"forward pass but saw {calls[layer]}. The edits intercept torch's scaled_dot_product_attention "
                        f"inside `{self.family.attention_path(self.transformer, layer)}` and the block's forward; a "
                        "non-native attention backend, a custom processor or an adapter can bypass or repeat them."
                    )

    # -- attention ---------------------------------------------------------------------------------
    def _attention(self, call: AttentionCall, sdpa, args: tuple, kwargs: dict) -> Tensor:
        self._att_calls[call.layer] = self._att_calls.get(call.layer, 0) + 1
        plan = self.plan
        if plan is None:
            return sdpa(*args, **kwargs)
        edited = [(g, g.attention.get(call.layer, [])) for g in plan.groups]
        edited = [(g, e) for g, e in edited if e]
        if not edited:
            return sdpa(*args, **kwargs)
        a = bind_sdpa(args, kwargs)
        if a["dropout_p"] or a["is_causal"]:
            raise RuntimeError("Guidance edits do not support attention dropout or causal masks.")
        layout = self.layouts[call.layer]
        if layout == "text_first_joint":
            return self._text_first(call, sdpa, a, args, kwargs, edited, plan)
        n_img = a["query"].shape[2] if layout == "image_only" else call.num_image_tokens
        return self._edited_call(call, sdpa, a, args, kwargs, edited, plan, n_img)

    def _text_first(self, call: AttentionCall, sdpa, a: dict, args: tuple, kwargs: dict, edited, plan) -> Tensor:
        """A ``[text ; image]`` sequence (Flux): the edits see it rotated to ``[image ; text]`` (the layout
        they are written for; attention is equivariant to a permutation of its tokens applied to queries,
        keys and values alike), and their groups' outputs are rotated back. The image tokens are the last
        ``prod(grid)`` of the sequence; rows the edits leave alone keep the model's own call, bit for bit, and
        only the rows an edit modifies are computed on the rotated sequence."""
        q = a["query"]
        n = q.shape[2]
        n_img = math.prod(plan.grid) if plan.grid else 0
        if not 0 < n_img <= n:
            raise RuntimeError(f"Block {self.addresses[call.layer]}: an attention sequence of {n} tokens cannot hold "
                               f"the {n_img} image tokens of the grid {plan.grid}.")
        t = n - n_img
        perm = torch.cat([torch.arange(t, n), torch.arange(t)]).to(q.device)
        back = torch.argsort(perm)
        mask = a["attn_mask"]
        if isinstance(mask, Tensor):
            mask = mask.index_select(-1, perm) if mask.shape[-1] == n else mask
            mask = mask.index_select(-2, perm) if mask.dim() >= 2 and mask.shape[-2] == n else mask
        rotated = dict(a, query=q.index_select(2, perm), key=a["key"].index_select(2, perm),
                       value=a["value"].index_select(2, perm), attn_mask=mask)
        res = self._edited_call(call, sdpa, rotated, (), rotated, edited, plan, n_img, rest=False)
        modified = [g for g, edits in edited if any(e.modifies_output for e in edits)]
        if sum(g.stop - g.start for g in modified) == q.shape[0]:  # every row edited: no fused call needed
            return res.index_select(2, back)
        out = sdpa(*args, **kwargs)
        for g in modified:
            out[g.rows] = res[g.rows].index_select(2, back)
        return out

    def _edited_call(self, call: AttentionCall, sdpa, a: dict, args: tuple, kwargs: dict, edited, plan,
                     n_img: int, rest: bool = True) -> Tensor | None:
        """The attention output of an intercepted call whose sequence leads with ``n_img`` image tokens.
        ``rest=False``: the caller has the rows no edit modifies already; they are left uncomputed (and
        None is returned when no edit modifies any row)."""
        q, k, v = a["query"], a["key"], a["value"]
        scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
        info = AttentionInfo(call.layer, n_img, plan.grid, self.family, scale)
        for g, edits in edited:
            for e in edits:
                e.prepare(q[g.rows], k[g.rows], info, (g.start, g.stop))
        modifying = [(g, e) for g, e in edited if any(x.modifies_output for x in e)]
        seen = []
        if not any(x.needs_probs or x.uses_mask for _, e in edited for x in e):
            # Query-only edits (EMAG-Q, SEG, ERG): edit each group's queries, then ONE fused call over
            # the whole batch, exactly as the unedited model would make it.
            q_new = q.clone() if modifying else q
            for g, edits in edited:
                qg = q[g.rows]
                for e in edits:
                    qg = e.query(qg, k[g.rows], v[g.rows], info, (g.start, g.stop))
                    if e not in seen:
                        seen.append(e)
                if modifying:
                    q_new[g.rows] = qg
            if modifying:
                out = sdpa(q_new, k, v, attn_mask=a["attn_mask"], scale=a["scale"])
            else:
                out = sdpa(*args, **kwargs) if rest else None
            for g, edits in edited:
                for e in edits:
                    if e.edits_output:
                        out[g.rows] = e.output(out[g.rows], q_new[g.rows], k[g.rows], v[g.rows], info,
                                               (g.start, g.stop), sdpa)
            for e in seen:
                e.finish(info)
            return out
        covered = sum(g.stop - g.start for g, _ in modifying)
        if covered < q.shape[0] and rest:
            out = sdpa(*args, **kwargs)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        for g, edits in edited:
            rows = (g.start, g.stop)
            res = self._edited_attention(q[g.rows], k[g.rows], v[g.rows], a, edits, info, rows, sdpa)
            if res is not None:
                out[g.rows] = res
            seen.extend(e for e in edits if e not in seen)
        for e in seen:
            e.finish(info)
        return out

    def _edited_attention(self, q, k, v, a, edits, info, rows, sdpa) -> Tensor | None:
        """The attention output of one group's rows, or None when its edits only observe."""
        for e in edits:
            q = e.query(q, k, v, info, rows)
        modifies = any(e.modifies_output for e in edits)
        mask = a["attn_mask"]
        if isinstance(mask, Tensor) and mask.dim() == 4 and mask.shape[0] > 1:
            mask = mask[rows[0]:rows[1]]
        for m in (e.mask(q, k, info) for e in edits):
            if m is not None:
                mask = m if mask is None else mask + m
        if not modifies and not any(e.needs_probs for e in edits):
            return None
        if not any(e.needs_probs for e in edits):
            if any(e.replaces_output(q, k, info) for e in edits if e.edits_output):
                out = q.new_empty((*q.shape[:-1], v.shape[-1]))  # written by that edit's output()
            else:
                out = sdpa(q, k, v, attn_mask=mask, scale=a["scale"])
        else:
            n = info.num_image_tokens
            split = n < q.shape[2] and all(e.image_rows_only for e in edits if e.needs_probs)
            # split: the map of the image-query rows only; the other query rows keep fused attention
            q_map = q[:, :, :n] if split else q
            mask_map = _query_rows(mask, slice(None, n)) if split else mask
            chunks = _agreed_head_chunks(edits, (*q_map.shape[:3], k.shape[2]), info)
            users = [e for e in edits if e.needs_probs]
            if modifies and len(users) == 1 and users[0].given_map(info) and q_map.shape[2] == info.num_image_tokens:
                # a hard replacement of the whole (image-row) map: E V without the live map (the same
                # values as writing E into the map and multiplying, by the same chunks of heads)
                given = users[0]
                if chunks is None:
                    out = given.map_for(slice(None), q.dtype) @ v
                else:
                    out = q_map.new_empty((*q_map.shape[:-1], v.shape[-1]))
                    for h in chunks:
                        out[:, h] = given.map_for(h, q.dtype) @ v[:, h]
            elif chunks is None:
                p = attention_probs(q_map, k, info.scale, info.family.scale_queries_first, mask_map)
                for e in edits:
                    p = e.probs(p, info, rows)
                if not modifies:
                    return None
                out = (p @ v).to(q.dtype)
            else:
                out = self._attention_by_heads(q_map, k, v, mask_map, edits, chunks, info, rows, modifies)
                if out is None:
                    return None
            if split:
                rest = sdpa(q[:, :, n:], k, v, attn_mask=_query_rows(mask, slice(n, None)), scale=a["scale"])
                out = torch.cat([out, rest], dim=2)
        for e in edits:
            if e.edits_output:
                out = e.output(out, q, k, v, info, rows, sdpa)
        return out

    @staticmethod
    def _attention_by_heads(q, k, v, mask, edits, chunks, info, rows, modifies) -> Tensor | None:
        """The explicit map and its output built chunk by chunk of heads: the same values as the whole
        map (each head's map and ``P V`` are independent), with one chunk's map alive at a time."""
        shape = (*q.shape[:3], k.shape[2])
        users = [e for e in edits if e.needs_probs]
        for e in users:
            e.begin_heads(shape, q.device, info, rows)
        out = q.new_empty((*q.shape[:-1], v.shape[-1])) if modifies else None
        for h in chunks:
            p = attention_probs(q[:, h], k[:, h], info.scale, info.family.scale_queries_first, _head_rows(mask, h))
            for e in edits:
                p = e.probs(p, info, rows, heads=h)
            if modifies:
                out[:, h] = p @ v[:, h]
            del p
        for e in users:
            e.end_heads(info, rows)
        return out

    def _linear_queries(self, layer: int, heads: int):
        """A linear attention's queries ``[B, N, H*d]`` (after any QK-norm, before its kernel) through the
        groups' query edits, seen as ``[b, H, N, d]`` like a fused call's; nothing else is defined there."""

        def hook(module, args, output):
            self._att_calls[layer] = self._att_calls.get(layer, 0) + 1
            plan = self.plan
            edited = [] if plan is None else [(g, g.attention.get(layer, [])) for g in plan.groups]
            edited = [(g, e) for g, e in edited if e]
            if not edited:
                return None
            bad = [type(e).__name__ for _, edits in edited for e in edits if e.needs_probs or e.uses_mask or e.edits_output]
            if bad:
                raise RuntimeError(f"{', '.join(bad)} on block {self.addresses[layer]}: linear attention has no attention "
                                   "map to read, mask or replace (only query edits are defined there).")
            b, n, c = output.shape
            q = output.view(b, n, heads, c // heads).transpose(1, 2)
            info = AttentionInfo(layer, n, plan.grid, self.family, 1.0)
            modifying = any(e.modifies_output for _, edits in edited for e in edits)
            q_new = q.clone() if modifying else q
            seen = []
            for g, edits in edited:
                qg, rows = q[g.rows], (g.start, g.stop)
                for e in edits:
                    e.prepare(qg, None, info, rows)
                    qg = e.query(qg, None, None, info, rows)
                    if e not in seen:
                        seen.append(e)
                if modifying:
                    q_new[g.rows] = qg
            for e in seen:
                e.finish(info)
            return q_new.transpose(1, 2).reshape(b, n, c) if modifying else None

        return hook

    # -- blocks ------------------------------------------------------------------------------------
    def _groups_for_block(self, layer: int):
        if self.plan is None:
            return []
        return [(g, g.blocks[layer]) for g in self.plan.groups if g.blocks.get(layer)]

    def _block_pre(self, layer: int):
        def hook(module, args, kwargs):
            self._block_calls[layer] = self._block_calls.get(layer, 0) + 1
            groups = self._groups_for_block(layer)
            if not groups:
                return None
            hidden, encoder = _split_block_io(args, kwargs)
            self._block_inputs[layer] = (hidden, encoder)
            new_h, new_e = hidden, encoder
            for g, edits in groups:
                for e in edits:
                    h_rows, e_rows = e.before(new_h[g.rows], None if new_e is None else new_e[g.rows], g.rows)
                    if h_rows is not new_h[g.rows]:
                        new_h = new_h.clone() if new_h is hidden else new_h
                        new_h[g.rows] = h_rows
                    if new_e is not None and e_rows is not None and e_rows is not new_e[g.rows]:
                        new_e = new_e.clone() if new_e is encoder else new_e
                        new_e[g.rows] = e_rows
            if new_h is hidden and new_e is encoder:
                return None
            kwargs = dict(kwargs)
            args = list(args)
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = new_h
            else:
                args[0] = new_h
            if encoder is not None:
                if "encoder_hidden_states" in kwargs:
                    kwargs["encoder_hidden_states"] = new_e
                elif len(args) > 1:
                    args[1] = new_e
            return tuple(args), kwargs

        return hook

    def _block_post(self, layer: int):
        def hook(module, args, kwargs, output):
            groups = self._groups_for_block(layer)
            if not groups:
                return None
            hidden_in, encoder_in = self._block_inputs.pop(layer)
            if isinstance(output, tuple):  # SD3 joint block: (encoder_hidden_states, hidden_states)
                enc_out, hid_out = output
            else:
                enc_out, hid_out = None, output
            hid_out = hid_out.clone()
            enc_out = None if enc_out is None else enc_out.clone()
            for g, edits in groups:
                for e in edits:
                    h, en = e.after(hidden_in[g.rows], None if encoder_in is None else encoder_in[g.rows],
                                    hid_out[g.rows], None if enc_out is None else enc_out[g.rows], g.rows)
                    hid_out[g.rows] = h
                    if enc_out is not None and en is not None:
                        enc_out[g.rows] = en
            return (enc_out, hid_out) if isinstance(output, tuple) else hid_out

        return hook
