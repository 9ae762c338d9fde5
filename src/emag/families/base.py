"""What the package needs to know about one model family, stated once.

A :class:`ModelFamily` is a frozen record: where the transformer blocks and their attention modules
are, how the attention's tokens are laid out, what the model predicts, how it is conditioned, the
normal branch order of its pipeline, how one batched pass (or a suffix of blocks) runs (its
``backbone``), and the per-method defaults its reference models were published with. Each family is
one module of :mod:`emag.families`; nothing else in the package names a family.
"""

from __future__ import annotations

import importlib
from contextlib import nullcontext
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..layers import BlockRef, parse_layers

# A method's default blocks: a fixed tuple (the reference model's), or a band computed from the block
# count (kept inside the model on shallow ones).
LayerDefault = tuple[int, ...] | Callable[[int], tuple[int, ...]]

# how a block's attention sequence holds the image tokens: ``image_first_joint`` ``[image ; text]`` (SD3),
# ``text_first_joint`` ``[text ; image]`` (Flux's double and single blocks), ``image_only`` (self-attention
# over the image tokens: DiT, PixArt, video DiTs)
TOKEN_LAYOUTS = ("image_first_joint", "text_first_joint", "image_only")
PREDICTIONS = ("flow", "epsilon")
CONDITIONINGS = ("text", "class")


def middle(width: int, within: str | None = None) -> Callable[[int], tuple[int, ...]]:
    """The ``width`` blocks around the middle of an ``n``-block model (1: ``n // 2``; 3: ``n//2 - 1 .. n//2 + 1``);
    ``within``: of the named block list (models with several lists), else of all blocks."""
    lo = width // 2

    def band(n: int) -> tuple[int, ...]:
        return tuple(range(n // 2 - lo, n // 2 - lo + width))

    band.__name__ = f"middle_{width}" + (f"_of_{within}" if within else "")
    band.within = within
    return band


def every_block(n: int) -> tuple[int, ...]:
    return tuple(range(n))


@dataclass(frozen=True)
class BlockList:
    """One list of transformer blocks: its name in layer addresses (``double`` in ``"double:10-12"``),
    the transformer's attribute holding it, each block's attention module and its token layout."""

    name: str
    attr: str
    attention_attr: str
    token_layout: str
    count_key: str = "num_layers"  # the transformer config's entry giving the list's length
    # the block's other attention modules, which edits never touch (cross-attention; SD3.5's attn2)
    untouched: tuple[str, ...] = ()
    # "softmax": the module calls torch's fused attention (edits intercept it); "linear": a kernelised
    # linear attention with no attention map (Sana): only edits of the queries are defined
    attention: str = "softmax"

    def __post_init__(self) -> None:
        if self.token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"{self.name}: unknown token layout {self.token_layout!r}")
        if self.attention not in ("softmax", "linear"):
            raise ValueError(f"{self.name}: unknown attention kind {self.attention!r}")




@dataclass(frozen=True)
class AttentionGeometry:
    """The shape of one block's attention in a pass: ``heads`` x (``image_tokens`` + other query tokens)
    queries over ``key_tokens`` keys, ``head_dim`` wide (what an attention-map EMA's size depends on)."""

    heads: int
    head_dim: int
    image_tokens: int
    key_tokens: int


def _import(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class ModelFamily:
    """One transformer family (see the module docstring).

    ``block_lists``: the model's block lists in execution order (one for most families; Flux has a
    ``double`` and a ``single`` list); a layer is a block's position in their concatenation, written by
    the user as ``list:index`` where there is more than one list (:meth:`resolve_layers`).
    ``scale_queries_first``: the rounding order of the reference's explicit attention (scale Q before
    the matmul, or the logits after it). ``normal_order``: the rows of the pipeline's batched
    cond/uncond pass. ``emag_protocol``: which of EMAG's update protocols its published numbers used
    (see :mod:`emag.guidance.emag.protocols`). ``defaults``: per method name, the parameter values
    the family's reference models use (``layers`` may be a band of the block count).
    """

    name: str  # the key in presets, metadata and the command line
    label: str  # for messages
    transformer_class: str
    pipeline_classes: tuple[str, ...]  # the diffusers pipelines in model_index.json
    pipeline: str  # "module:Class" of this package's pipeline
    backbone: str  # "module:Class" running one batched pass / a suffix of blocks
    block_lists: tuple[BlockList, ...]
    scale_queries_first: bool
    prediction: str
    conditioning: str
    normal_order: tuple[str, str]
    reference_blocks: int | tuple[int, ...]  # per block list, the reference model's (fixed defaults' model)
    emag_protocol: str
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # the hub models of the family emag knows by name: hub id -> gated (the licence must be accepted on
    # the hub and the user logged in, `hf auth login`, before downloading); for download commands
    hub_models: Mapping[str, bool] = field(default_factory=dict)
    samplers: tuple[str, ...] = ()  # reference samplers a run may ask for besides the model's own scheduler
    legacy_transformer: Callable[[dict], bool] | None = None  # an old config class name diffusers remaps
    # methods not defined on this family (by config class, lower case), with the reason (Sana: no softmax map)
    undefined_methods: Mapping[str, str] = field(default_factory=dict)
    # the pipeline's ``guidance_scale`` is an embedded (distilled) guidance, not CFG (Flux.1-dev)
    distilled_guidance: bool = False
    # how positions enter attention: None for absolute (sin-cos) embeddings added to the patch tokens (they
    # bound the image size), else how (rotary on Q and K before the fused call: edits see rotated Q and K)
    positions: str | None = None
    packing: int = 1  # latent pixels per token side beyond the transformer's patch size (Flux packs 2 x 2)
    # where a QK-norm sits relative to the edits (None: the family's models have none)
    qk_norm: str | None = None
    video: bool = False  # latents [B, C, F, H, W] (frames x height x width tokens)
    # the text condition's fields in diffusers' modular pipeline's guider inputs (emag.EMAGGuider)
    guider_inputs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.block_lists:
            raise ValueError(f"{self.name}: no block list")
        if self.prediction not in PREDICTIONS or self.conditioning not in CONDITIONINGS:
            raise ValueError(f"{self.name}: unknown prediction or conditioning")

    # -- defaults ------------------------------------------------------------------------------------
    def default(self, method: str, key: str, fallback: Any = None) -> Any:
        """The family's default ``key`` of ``method`` (``fallback`` when it has none)."""
        return self.defaults.get(method, {}).get(key, fallback)

    def default_layers(self, method: str) -> LayerDefault | None:
        return self.default(method, "layers")

    def default_layer_positions(self, method: str, counts: tuple[int, ...], what: str) -> tuple[int, ...]:
        """The block positions of ``method``'s default layers in a model with ``counts`` blocks per list: a
        fixed selection (the reference model's; out of range in a smaller model is an error) or a band of
        the block count, kept inside the model on shallow ones."""
        d = self.default_layers(method)
        if d is None:
            raise ValueError(f"{what} has no default layers for {self.label}; pass `layers=`.")
        if not callable(d):
            fixed = parse_layers(d)
            try:
                return self.resolve_layers(fixed, counts)
            except ValueError:
                raise ValueError(f"{what}'s default layers {[str(x) for x in fixed]} (the full-size {self.label} "
                                 f"model's) do not exist in this model ({', '.join(self._lists_text(counts))}); "
                                 "pass `layers=`.") from None
        within = getattr(d, "within", None)
        if within is None:  # a band of all blocks, in execution order: block positions
            n = sum(counts)
            positions = tuple(i for i in d(n) if 0 <= i < n)
        else:  # a band of one named list
            n = dict(zip((b.name for b in self.block_lists), counts))[within]
            refs = tuple(BlockRef(within, i) for i in d(n) if 0 <= i < n)
            positions = self.resolve_layers(refs, counts) if refs else ()
        if not positions:
            raise ValueError(f"{what}'s default band has no block in this model ({', '.join(self._lists_text(counts))}); "
                             "pass `layers=`.")
        return positions

    # -- model mechanics -----------------------------------------------------------------------------
    @property
    def reference_counts(self) -> tuple[int, ...]:
        r = self.reference_blocks
        return (r,) if isinstance(r, int) else tuple(r)

    def block_counts(self, transformer: nn.Module) -> tuple[int, ...]:
        """The number of blocks of each block list."""
        return tuple(len(getattr(transformer, b.attr)) for b in self.block_lists)

    def config_block_counts(self, config: Mapping[str, Any]) -> tuple[int, ...]:
        """The number of blocks of each block list, from a saved transformer config (before loading)."""
        return tuple(int(config.get(b.count_key, 0)) for b in self.block_lists)

    def blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """Every block, the block lists concatenated in execution order (a layer's position)."""
        return [blk for b in self.block_lists for blk in getattr(transformer, b.attr)]

    def num_blocks(self, transformer: nn.Module) -> int:
        return sum(self.block_counts(transformer))

    def locate(self, layer: int, counts: tuple[int, ...]) -> tuple[BlockList, int]:
        """The block list holding ``layer`` and the block's index within it."""
        for b, n in zip(self.block_lists, counts):
            if layer < n:
                return b, layer
            layer -= n
        raise IndexError(f"layer {layer} beyond the model's blocks")

    def address(self, layer: int, counts: tuple[int, ...]) -> str:
        """How a user writes ``layer``: its index (one block list) or ``list:index``."""
        if len(self.block_lists) == 1:
            return str(layer)
        b, i = self.locate(layer, counts)
        return f"{b.name}:{i}"

    def attention_module(self, transformer: nn.Module, layer: int) -> nn.Module:
        b, i = self.locate(layer, self.block_counts(transformer))
        module = getattr(getattr(transformer, b.attr)[i], b.attention_attr, None)
        if module is None:
            raise ValueError(f"Block {self.address(layer, self.block_counts(transformer))} of {self.transformer_class} "
                             f"has no attention module `{b.attention_attr}`.")
        return module

    def attention_path(self, transformer: nn.Module, layer: int) -> str:
        """The attention module of ``layer`` as a module path (for messages)."""
        b, i = self.locate(layer, self.block_counts(transformer))
        return f"{b.attr}[{i}].{b.attention_attr}"

    def token_layout(self, layer: int, counts: tuple[int, ...]) -> str:
        return self.locate(layer, counts)[0].token_layout

    def attention_kind(self, layer: int, counts: tuple[int, ...]) -> str:
        return self.locate(layer, counts)[0].attention

    @property
    def linear_attention(self) -> bool:
        """Whether some block list's attention is linear (no softmax attention map exists there)."""
        return any(b.attention == "linear" for b in self.block_lists)

    @property
    def has_text_tokens(self) -> bool:
        """Whether some block's attention sequence holds text tokens besides the image tokens."""
        return any(b.token_layout != "image_only" for b in self.block_lists)

    def resolve_layers(self, layers: tuple, counts: tuple[int, ...]) -> tuple[int, ...]:
        """Block positions (sorted) of parsed ``layers`` (ints, or :class:`BlockRef` s ``list:index``),
        checked against a model with ``counts`` blocks per list. Plain indices are accepted only where the
        model has one block list: in Flux ``10`` could mean either list."""
        if any(isinstance(x, BlockRef) for x in layers):
            names = {b.name: k for k, b in enumerate(self.block_lists)}
            out = []
            for x in layers:
                if not isinstance(x, BlockRef):
                    raise ValueError(f"Mixed layer forms {[str(v) for v in layers]}: write every block as list:index.")
                if x.list not in names:
                    raise ValueError(f"{self.label} has no block list {x.list!r} (its lists: "
                                     f"{', '.join(self._lists_text(counts))}).")
                k = names[x.list]
                if x.index >= counts[k]:
                    raise ValueError(f"Layer {x} out of range: {self.label}'s {x.list!r} list has {counts[k]} blocks "
                                     f"(valid indices 0-{counts[k] - 1}).")
                out.append(sum(counts[:k]) + x.index)
            return tuple(sorted(set(out)))
        if len(self.block_lists) > 1:
            first = self.block_lists[0].name
            raise ValueError(f"{self.label} has {len(self.block_lists)} block lists ({', '.join(self._lists_text(counts))}): "
                             f"name the list of each layer, e.g. '{first}:{min(layers)}' instead of {min(layers)}.")
        total = sum(counts)
        bad = [l for l in layers if l >= total]
        if bad:
            raise ValueError(f"Layer(s) {bad} out of range: {self.transformer_class} has {total} transformer blocks "
                             f"(valid indices 0-{total - 1}).")
        return tuple(sorted(set(layers)))

    def describe(self) -> list[str]:
        """What the record says, line by line (``emag models``)."""
        lists = "; ".join(f"{b.name} = {b.attr}[i].{b.attention_attr} ({b.token_layout.replace('_', ' ')}, "
                          f"{b.attention} attention{', untouched: ' + ', '.join(b.untouched) if b.untouched else ''})"
                          for b in self.block_lists)
        named = " (layers name their list: 'list:index')" if len(self.block_lists) > 1 else ""
        return [f"{self.name} ({self.label}): {self.transformer_class}, emag.{self.pipeline.rsplit(':', 1)[1]}",
                f"    blocks: {lists}; reference model: {self.reference_blocks}{named}",
                f"    positions: {self.positions or 'absolute embeddings added to the patch tokens'}; QK-norm: "
                f"{self.qk_norm or 'none'}",
                f"    prediction: {self.prediction}; conditioning: {self.conditioning}"
                f"{' (guidance-distilled: guidance_scale is an embedding)' if self.distilled_guidance else ''}; "
                f"normal pass rows: {' ; '.join(self.normal_order)}{'; video' if self.video else ''}",
                *(f"    not defined: {m} ({why})" for m, why in self.undefined_methods.items())]

    def _lists_text(self, counts: tuple[int, ...]) -> list[str]:
        return [f"{b.name}: {n} blocks" for b, n in zip(self.block_lists, counts)]

    @property
    def text_conditioned(self) -> bool:
        return self.conditioning == "text"

    def owns_transformer_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a saved transformer config (``_class_name`` ...) is this family's transformer."""
        name = config.get("_class_name")
        return name == self.transformer_class or bool(self.legacy_transformer and self.legacy_transformer(config))

    def backbone_of(self, transformer: nn.Module, **options: Any) -> Any:
        """The family's batched-pass runner around ``transformer`` (``options``: the call's, e.g. SD3's
        ``joint_attention_kwargs``, DiT's ``scheduler``)."""
        return self.backbone_class()(transformer, **options)

    def backbone_class(self) -> type:
        return _import(self.backbone)

    def pipeline_class(self) -> type:
        """This package's diffusers pipeline for the family (imported on use: it pulls in diffusers'
        pipeline modules)."""
        return _import(self.pipeline)


class Backbone:
    """What every family's backbone shares (override where the family differs): the guided latent
    channels, the block count, the ``(H/p, W/p)`` token grid of ``[B, C, H, W]`` latents, and no per-call
    context. A family's backbone adds ``forward``, ``attention_geometry``, ``embed``, ``block`` and ``head``
    (block by block, equal to ``forward``)."""

    family: ModelFamily
    transformer: nn.Module

    @property
    def normal_order(self) -> tuple[str, str]:
        return self.family.normal_order

    @property
    def channels(self) -> int:
        """The latent channels of the sampler's prediction (the guided ones)."""
        return self.transformer.config.in_channels

    @property
    def num_blocks(self) -> int:
        return self.family.num_blocks(self.transformer)

    def token_grid(self, x) -> tuple[int, ...]:
        """The image-token grid of latents ``x`` ``[B, C, H, W]``: ``(H/p, W/p)``."""
        p = self.transformer.config.patch_size
        return (x.shape[-2] // p, x.shape[-1] // p)

    def context(self, conds, rows):
        """A context around a pass (DiT: CADS's class-embedding rewrite); none by default."""
        return nullcontext()
