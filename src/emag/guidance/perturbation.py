"""Shared machinery of the perturbation methods: ``D += s (c - p)`` with ``p`` a weakened conditional.

A perturbation term owns one extra branch on the conditional input whose rows carry the term's
edits (attention or whole-block); its combination is the canonical additive term (docs/guidance.md
section 3.3). Layers default to the model family's (:mod:`emag.families`) when not given.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from ..layers import format_layers, parse_layers
from ..plumbing.edits import AttentionEdit, BlockEdit
from ..windows import StepContext
from .base import Branch, Setup, TermRuntime, check_scale


def resolve_layers(layers: Any, setup: Setup, method: str, what: str) -> tuple[int, ...]:
    """The block positions of ``layers`` (parsed), or the model family's default for ``method`` (a fixed
    selection, or a band of the block count), checked against the model."""
    if layers is None:
        return setup.family.default_layer_positions(method, setup.counts, what)
    return setup.family.resolve_layers(parse_layers(layers), setup.counts)


class PerturbationRuntime(TermRuntime):
    """An additive term with one perturbed conditional branch: ``delta = s (c - p)``."""

    kind = "additive"

    def __init__(self, config: Any, window, layers: tuple[int, ...], name: str) -> None:
        super().__init__(config, window)
        self.layers = layers
        self.name = name
        self.branch_name = f"{name}:{format_layers(layers)}"

    def active(self, ctx: StepContext) -> bool:
        return self.config.scale != 0 and self.window.contains(ctx)

    def attention_edits(self, ctx: StepContext) -> dict[int, list[AttentionEdit]]:
        return {}

    def block_edits(self, ctx: StepContext) -> dict[int, list[BlockEdit]]:
        return {}

    def branches(self, ctx: StepContext, stage: int) -> list[Branch]:
        if stage != 0:
            return []
        return [Branch(self.branch_name, "cond", attention=self.attention_edits(ctx), blocks=self.block_edits(ctx))]

    def delta(self, c: Tensor, p, ctx: StepContext) -> Tensor:
        return self.config.scale * (c - p[self.branch_name])

    def describe(self) -> dict:
        d = super().describe()
        d["layers"] = format_layers(self.layers)
        return d


class IdentityAttention(AttentionEdit):
    """PAG's perturbation: image queries attend only to themselves among image keys.

    On MMDiT joint attention (SD3, image tokens first) the image->image block becomes the identity while
    image queries still see every text key and text queries are untouched, as diffusers' SD3 PAG
    pipeline does; on plain self-attention (DiT, PixArt, Wan) the output is exactly ``V``, which is what
    it returns there (no ``N x N`` mask: 2 GB at Wan's 32,760 video tokens). On joint attention it is an
    additive ``-inf`` mask on the fused attention, after any QK-norm (SD3.5) and RoPE (Flux).
    """

    uses_mask = True
    edits_output = True  # plain self-attention: the output is V itself (no N x N mask at video sizes)

    @staticmethod
    def _self_only(q: Tensor, k: Tensor, info) -> bool:
        return q.shape[2] == k.shape[2] == info.num_image_tokens

    def mask(self, q: Tensor, k: Tensor, info) -> Tensor | None:
        if self._self_only(q, k, info):  # the identity map's output is V: see output()
            return None
        nq, nk, n = q.shape[2], k.shape[2], info.num_image_tokens
        m = torch.zeros(nq, nk, dtype=q.dtype, device=q.device)
        block = torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device)
        block.fill_diagonal_(0.0)
        m[:n, :n] = block
        return m[None, None]

    def replaces_output(self, q: Tensor, k: Tensor, info) -> bool:
        return self._self_only(q, k, info)

    def output(self, out: Tensor, q: Tensor, k: Tensor, v: Tensor, info, rows, sdpa) -> Tensor:
        """Plain self-attention: the identity map gives exactly ``V`` (each row's one weight is exp(0) / exp(0)
        = 1); joint attention keeps the masked call's output."""
        return v.to(out.dtype).clone() if self._self_only(q, k, info) else out


class SkipBlock(BlockEdit):
    """Skip a whole transformer block for these rows: both streams leave it as they entered."""

    def after(self, hidden_in, encoder_in, hidden_out, encoder_out, rows):
        return hidden_in, (encoder_in if encoder_out is not None else None)


class SkipBlockRows(BlockEdit):
    """Skip a whole block for SOME rows of the group: row ``r`` with ``skip[r]`` leaves the block as it
    entered (both streams), the other rows keep the block's output (S²'s per-sample sub-networks)."""

    def __init__(self, skip: Tensor) -> None:
        self.skip = skip  # [b] bool, one entry per row of the group

    def after(self, hidden_in, encoder_in, hidden_out, encoder_out, rows):
        if self.skip.shape[0] != hidden_out.shape[0]:
            raise RuntimeError(f"SkipBlockRows has a mask for {self.skip.shape[0]} rows but its branch has "
                               f"{hidden_out.shape[0]}.")
        m = self.skip.to(hidden_out.device).view(-1, *([1] * (hidden_out.dim() - 1)))
        hidden = torch.where(m, hidden_in, hidden_out)
        encoder = None if encoder_out is None else torch.where(m, encoder_in, encoder_out)
        return hidden, encoder


# -- reproducible randomness ---------------------------------------------------------------------------

def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys, e.g. ``(seed, step, sample)``.

    The same keys give the same stream on every machine and for every batch layout (docs/guidance.md
    section 3.6: separate RNG streams for S² masks and TPG permutations, independent of the latent noise). The
    keys are mixed with blake2b, because Python's ``hash`` is not a stable contract across versions.
    """
    digest = hashlib.blake2b(",".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`seed` must be an int, got {value!r}.")
    return value


# -- weak-prediction guidance (ERG, autoguidance) ---------------------------------------------------------

def check_weak_scale(value: Any) -> float | None:
    """``None`` (replace the unconditional prediction of the call's CFG-like term) or ``w >= 0``."""
    return None if value is None else check_scale("scale", value)


class WeakGuidanceRuntime(TermRuntime):
    """A weak prediction ``D_w`` of one extra branch, used in one of two roles (docs/guidance.md section 3.4):

    - ``config.scale = w`` (kind ``"refine"``): the term is a guidance rule of its own,
      ``c' = D_w + w (c - D_w)``, written ``c + (w - 1)(c - D_w)`` so that ``w = 1`` and ``D_w == c``
      both return ``c`` bit for bit. Alone it is the whole guidance, ``D = c'``, with no unconditional
      pass (NFE 2; also for models without a negative condition). With a CFG-like term as well, that term
      is applied on top of ``c'`` (``u + w_cfg (c' - u)``), as EMAG's nested combination is.
    - ``config.scale = None`` (kind ``"uncond"``): ``D_w`` replaces the unconditional prediction of the
      call's CFG-like base term (CFG, APG, CFG-Zero*), whose scale then applies: ``u + w (c - u)`` with
      ``u = D_w``.

    Subclasses implement :meth:`make_branch`.
    """

    def __init__(self, config: Any, window, name: str, branch_name: str, setup: Setup) -> None:
        super().__init__(config, window)
        self.name = name
        self.branch_name = branch_name
        self.kind = "uncond" if config.scale is None else "refine"
        if self.kind == "uncond" and not setup.uses_uncond:
            cls = type(config).__name__
            raise ValueError(
                f"{cls}(scale=None) replaces the unconditional prediction of a CFG-like term, but this call has "
                f"none: add one (e.g. guidance=[emag.CFG(7.0), emag.{cls}(...)]) or give {cls} its own `scale`."
            )

    def active(self, ctx: StepContext) -> bool:
        return self.config.scale != 1.0 and self.window.contains(ctx)

    def make_branch(self, ctx: StepContext) -> Branch:
        raise NotImplementedError

    def branches(self, ctx: StepContext, stage: int) -> list[Branch]:
        return [self.make_branch(ctx)] if stage == 0 else []

    def refine(self, c: Tensor, p, ctx: StepContext) -> Tensor:
        return c + (self.config.scale - 1.0) * (c - p[self.branch_name])

    def refine_parts(self, c: Tensor, p, ctx: StepContext) -> tuple[float, Tensor]:
        return self.config.scale - 1.0, c - p[self.branch_name]

    def replace_uncond(self, p, ctx: StepContext) -> Tensor:
        return p[self.branch_name]
