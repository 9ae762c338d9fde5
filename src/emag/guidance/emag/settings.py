"""EMAG's settings resolved for one model: every default filled in from the model family's table.

``EMAG(...)`` holds what the user asked for; fields left as ``None`` take the family's reference value
(:mod:`emag.families`, ``defaults["emag"]``) when a call resolves it into a :class:`ResolvedEMAG`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ...dtypes import dtype_name
from ...families import ModelFamily, family_named
from ...layers import format_layers
from ...windows import StepWindow
from .protocols import protocol_of

VARIANTS = ("full", "q")
TRACKED_ROWS = ("image_rows", "img2img", "img2txt")
COMBINATIONS = ("nested", "additive", "emag_only")
EMA_STORAGES = ("auto", "dense", "factored")


@dataclass(frozen=True)
class ResolvedEMAG:
    """An :class:`~emag.EMAG` with every default filled in for one model family and one model."""

    family: str
    scale: float
    layers: tuple[int, ...]
    beta: float
    blend: float
    variant: str
    rows: str
    selection: str
    per_sample: bool
    entropy_top_k: int
    ema_window: StepWindow
    apply_window: StepWindow
    combination: str
    ema_dtype: torch.dtype
    guided_channels: int | None
    cond_only_score: bool = False
    ema_storage: str = "auto"
    explicit_attention: bool = False
    preset_name: str | None = None
    # how the user writes ``layers`` where the model has several block lists (``double:8``), else empty
    layer_addresses: tuple[str, ...] = ()

    @property
    def is_neutral(self) -> bool:
        """True when the scale makes EMAG a no-op on the output (1 nested/emag_only, 0 additive)."""
        return self.scale == (0.0 if self.combination == "additive" else 1.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = ",".join(self.layer_addresses) if self.layer_addresses else format_layers(self.layers)
        d.pop("layer_addresses")
        d["ema_window"] = self.ema_window.describe()
        d["apply_window"] = self.apply_window.describe()
        d["ema_dtype"] = dtype_name(self.ema_dtype)
        return d


def resolve(emag: Any, family: ModelFamily | str, num_blocks: int | tuple[int, ...]) -> ResolvedEMAG:
    """Fill an :class:`~emag.EMAG` config's defaults for ``family`` (or its name) and check it against a
    model of ``num_blocks`` blocks (or that many per block list); ``layers`` become block positions."""
    family = family_named(family)
    d = family.defaults.get("emag")
    if d is None:
        raise ValueError(f"EMAG has no reference settings for {family.label} models.")
    protocol = protocol_of(family)
    counts = (num_blocks,) if isinstance(num_blocks, int) else tuple(num_blocks)
    if emag.layers is not None:
        layers = family.resolve_layers(emag.layers, counts)
    else:
        layers = family.default_layer_positions("emag", counts, "EMAG")
    if not family.has_text_tokens and emag.rows != "image_rows":
        raise ValueError(f"{family.label} has no text tokens: EMAG `rows` must be 'image_rows' on {family.label}.")
    if emag.selection in ("entropy", "entropy_adaptive") and not protocol.entropy_selection:
        raise ValueError(f"Entropy-based selection modes are defined for DiT only (as in the reference), not "
                         f"for {family.label}.")
    if emag.guided_channels is not None and d.get("guided_channels") is None:
        raise ValueError(f"`guided_channels` is a DiT option (the original DiT 3-of-4-channel convention); "
                         f"{family.label} guides every channel.")
    apply_default = d["apply_window"]
    if emag.combination == "additive":
        apply_default = d.get("additive_apply_window", apply_default)
    return ResolvedEMAG(
        family=family.name,
        scale=float(emag.scale if emag.scale is not None else d["scale"]),
        layers=tuple(layers),
        beta=float(emag.beta),
        blend=float(emag.blend),
        variant=emag.variant,
        rows=emag.rows,
        selection=emag.selection,
        per_sample=emag.per_sample,
        entropy_top_k=emag.entropy_top_k,
        ema_window=emag.ema_window if emag.ema_window is not None else d["ema_window"],
        apply_window=emag.apply_window if emag.apply_window is not None else apply_default,
        combination=emag.combination,
        ema_dtype=emag.ema_dtype if emag.ema_dtype is not None else d["ema_dtype"],
        guided_channels=emag.guided_channels,
        cond_only_score=emag.cond_only_score,
        ema_storage="dense" if emag.explicit_attention else emag.ema_storage,
        explicit_attention=emag.explicit_attention,
        preset_name=emag.preset_name,
        layer_addresses=tuple(family.address(l, counts) for l in layers) if len(family.block_lists) > 1 else (),
    )
