"""What the package needs to know about one model family, stated once.

A :class:`ModelFamily` is a frozen record: where the transformer blocks and their attention modules
are, how the attention's tokens are laid out, what the model predicts, how it is conditioned, the
normal branch order of its pipeline, how one batched pass (or a suffix of blocks) runs (its
``backbone``), and the per-method defaults its reference models were published with. Each family is
one module of :mod:`emag.families`; nothing else in the package names a family.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

# A method's default blocks: a fixed tuple (the reference model's), or a band computed from the block
# count (kept inside the model on shallow ones).
LayerDefault = tuple[int, ...] | Callable[[int], tuple[int, ...]]

TOKEN_LAYOUTS = ("image_first_joint", "image_only")
PREDICTIONS = ("flow", "epsilon")
CONDITIONINGS = ("text", "class")


def middle(width: int) -> Callable[[int], tuple[int, ...]]:
    """The ``width`` blocks around the middle of an ``n``-block model (1: ``n // 2``; 3: ``n//2 - 1 .. n//2 + 1``)."""
    lo = width // 2

    def band(n: int) -> tuple[int, ...]:
        return tuple(range(n // 2 - lo, n // 2 - lo + width))

    band.__name__ = f"middle_{width}"
    return band


def every_block(n: int) -> tuple[int, ...]:
    return tuple(range(n))


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

    ``token_layout``: ``"image_first_joint"`` for MMDiT joint attention over ``[image ; text]`` (image
    tokens first), ``"image_only"`` for self-attention over the ``(H/p) x (W/p)`` patch grid.
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
    blocks_attr: str
    attention_attr: str
    token_layout: str
    scale_queries_first: bool
    prediction: str
    conditioning: str
    normal_order: tuple[str, str]
    reference_blocks: int  # blocks of the reference model the fixed default layers were given for
    emag_protocol: str
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # the hub models of the family emag knows by name: hub id -> gated (the licence must be accepted on
    # the hub and the user logged in, `hf auth login`, before downloading); for download commands
    hub_models: Mapping[str, bool] = field(default_factory=dict)
    samplers: tuple[str, ...] = ()  # reference samplers a run may ask for besides the model's own scheduler
    legacy_transformer: Callable[[dict], bool] | None = None  # an old config class name diffusers remaps

    def __post_init__(self) -> None:
        if self.token_layout not in TOKEN_LAYOUTS:
            raise ValueError(f"{self.name}: unknown token layout {self.token_layout!r}")
        if self.prediction not in PREDICTIONS or self.conditioning not in CONDITIONINGS:
            raise ValueError(f"{self.name}: unknown prediction or conditioning")

    # -- defaults ------------------------------------------------------------------------------------
    def default(self, method: str, key: str, fallback: Any = None) -> Any:
        """The family's default ``key`` of ``method`` (``fallback`` when it has none)."""
        return self.defaults.get(method, {}).get(key, fallback)

    def default_layers(self, method: str) -> LayerDefault | None:
        return self.default(method, "layers")

    # -- model mechanics -----------------------------------------------------------------------------
    def blocks(self, transformer: nn.Module) -> nn.ModuleList:
        return getattr(transformer, self.blocks_attr)

    def num_blocks(self, transformer: nn.Module) -> int:
        return len(self.blocks(transformer))

    def attention_module(self, transformer: nn.Module, layer: int) -> nn.Module:
        module = getattr(self.blocks(transformer)[layer], self.attention_attr, None)
        if module is None:
            raise ValueError(f"Block {layer} of {self.transformer_class} has no attention module `{self.attention_attr}`.")
        return module

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
        return _import(self.backbone)(transformer, **options)

    def pipeline_class(self) -> type:
        """This package's diffusers pipeline for the family (imported on use: it pulls in diffusers'
        pipeline modules)."""
        return _import(self.pipeline)
