"""The EMAG configuration object: a small validated dataclass, resolved per backbone at call time.

``EMAG(...)`` holds what the user asked for; fields left as ``None`` take the backbone's reference
value (emag.md sections 3-5) when the pipeline resolves it into a :class:`ResolvedEMAG`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .layers import LayerSpec, check_layers_in_range, format_layers, parse_layers
from .math.selection import SELECTION_MODES
from .windows import RemainingStepsWindow, SD3ReferenceWindow, StepWindow, Window, as_window

VARIANTS = ("full", "q")
TRACKED_ROWS = ("image_rows", "img2img", "img2txt")
COMBINATIONS = ("nested", "additive", "emag_only")
EMA_STORAGES = ("auto", "dense", "factored")
_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_dtype(value: Any) -> torch.dtype | None:
    """``ema_dtype``: None, a name from ``_DTYPES`` or one of the floating torch dtypes they name."""
    if value is None:
        return value
    if isinstance(value, torch.dtype):
        if value not in _DTYPES.values():
            raise ValueError(f"`ema_dtype` must be a floating dtype (torch.float16, torch.bfloat16, torch.float32 or "
                             f"torch.float64), got {value}: the EMA is a weighted average of attention maps.")
        return value
    if isinstance(value, str) and value.lower() in _DTYPES:
        return _DTYPES[value.lower()]
    raise ValueError(f"Unknown `ema_dtype` {value!r}; expected one of {sorted(set(_DTYPES))} or a floating torch.dtype.")


def _check_scale(name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {value!r}.")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")


@dataclass(frozen=True)
class EMAG:
    """Exponential Moving Average Guidance (Yadav, Huy, Liu, arXiv 2512.17303).

    Args:
        scale: EMAG scale ``w_e`` (>= 0). Neutral value: 1 for ``nested``/``emag_only``, 0 for
            ``additive``. Default: 1.5 on SD3, 3.0 on DiT (the paper's settings).
        layers: candidate blocks, e.g. ``[6, 7, 8]`` or ``"12-15"``. Default: SD3 6-8, DiT 12-15.
        beta: EMA decay in [0, 1). Default 0.988.
        blend: lambda in [0, 1]: ``R := lambda E + (1 - lambda) R`` at the chosen block. Default 1.
        variant: ``"full"`` (EMA of attention maps) or ``"q"`` (EMA of image queries, fused attention).
        rows: tracked attention rows for ``full``: ``"image_rows"`` (default: image->image and
            image->text), ``"img2img"`` or ``"img2txt"`` (replaced block, then row renormalisation).
        selection: ``"adaptive"`` (largest EMA deviation), ``"all"``, ``"entropy"``, ``"entropy_adaptive"``.
        per_sample: opt-in: every batch row chooses its own block (default: one choice per step).
        entropy_top_k: the pool size of ``entropy_adaptive`` (reference: 5).
        ema_window / apply_window: when the EMA is fed / when the replacement happens. ``Window(start,
            stop)`` fractions or a ``(start, stop)`` pair; default: the backbone's reference mapping.
        combination: ``"nested"`` (the paper: ``c' = c_e + w_e (c - c_e)``, then CFG on ``c'``),
            ``"additive"`` (reference "CFG" mode: ``u + w (c - u) + w_e (c - u_e)``) or
            ``"emag_only"`` (``c_e + w_e (c - c_e)``, no CFG).
        ema_dtype: EMA storage dtype. Default: float16 on SD3, float32 on DiT (the references).
        ema_storage: how the full-map EMA is held: ``"dense"`` (the ``[rows, H, N_i, N_k]`` tensor, as
            the reference), ``"factored"`` (the past queries/keys and one weight per update: ``E V`` as a
            weighted sum of fused attention calls, the score as a tiled reduction; memory
            ``O(updates x N x d)``, float32 arithmetic, more compute) or ``"auto"`` (default: dense
            unless the dense maps of all candidate blocks would exceed half of the free memory of
            the device, see :func:`emag.plumbing.emag_attention.dense_budget_bytes`). Full variant,
            ``rows="image_rows"`` only.
        guided_channels: DiT only: guide only the first N latent channels, the rest from the conditional
            prediction. Default ``None``: 3 on 4-channel DiT latents (the original DiT sampler's convention,
            with which the paper's DiT numbers were made, emag.md 5.2), all channels otherwise; 4 gives
            diffusers' DiT pipeline convention.
        cond_only_score: opt-in, NOT the reference (nested): on SD3 the layer score averages the
            conditional rows only, so the perturbed unconditional rows are never run (cheaper); on DiT the
            EMA is fed by the conditional pass only (the reference feeds it again from the unconditional
            pass, which therefore runs every EMA step even at CFG scale 1).
        explicit_attention: opt-in (full variant): at the candidate blocks, every pass computes the
            attention of every query row explicitly, ``softmax((Q K^T) s) V``, as the reference code does
            (its processor at those blocks), instead of fused attention for the rows EMAG does not edit.
            The same numbers in exact arithmetic; in float16 the fused kernels round differently (~1e-3 of
            the output range), so with ``fast=False`` this reproduces the reference's arithmetic layout.
            Slower and needs the whole map of a block (dense EMA storage).
    """

    scale: float | None = None
    layers: LayerSpec | None = None
    beta: float = 0.988
    blend: float = 1.0
    variant: str = "full"
    rows: str = "image_rows"
    selection: str = "adaptive"
    per_sample: bool = False
    entropy_top_k: int = 5
    ema_window: Any = None
    apply_window: Any = None
    combination: str = "nested"
    ema_dtype: Any = None
    ema_storage: str = "auto"
    guided_channels: int | None = None
    cond_only_score: bool = False
    explicit_attention: bool = False
    preset_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _check_scale("scale", self.scale)
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (0.0 <= self.beta < 1.0):
            raise ValueError(f"`beta` (EMA decay) must be in [0, 1), got {self.beta!r}.")
        if isinstance(self.blend, bool) or not isinstance(self.blend, (int, float)) or not (0.0 <= self.blend <= 1.0):
            raise ValueError(f"`blend` (lambda) must be in [0, 1], got {self.blend!r}.")
        for name, allowed in (("variant", VARIANTS), ("rows", TRACKED_ROWS), ("selection", SELECTION_MODES),
                              ("combination", COMBINATIONS), ("ema_storage", EMA_STORAGES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown EMAG {name} {getattr(self, name)!r}; expected one of {allowed}.")
        if self.variant == "q" and self.rows != "image_rows":
            raise ValueError("The 'q' variant replaces whole image-query vectors: `rows` must be 'image_rows'.")
        if self.ema_storage == "factored" and (self.variant != "full" or self.rows != "image_rows"):
            raise ValueError("ema_storage='factored' holds full attention maps of whole image-query rows: it needs "
                             "variant='full' and rows='image_rows' (the q variant's state is already small).")
        if self.variant == "q" and self.selection in ("entropy", "entropy_adaptive"):
            raise ValueError("Entropy-based selection needs attention maps: use variant='full'.")
        if isinstance(self.entropy_top_k, bool) or not isinstance(self.entropy_top_k, int) or self.entropy_top_k < 1:
            raise ValueError(f"`entropy_top_k` must be a positive int, got {self.entropy_top_k!r}.")
        if not isinstance(self.cond_only_score, bool):
            raise TypeError(f"`cond_only_score` must be a bool, got {self.cond_only_score!r}.")
        if not isinstance(self.per_sample, bool):
            raise TypeError(f"`per_sample` must be a bool, got {self.per_sample!r}.")
        if not isinstance(self.explicit_attention, bool):
            raise TypeError(f"`explicit_attention` must be a bool, got {self.explicit_attention!r}.")
        if self.explicit_attention and self.variant != "full":
            raise ValueError("explicit_attention applies to the full variant (the q variant's reference uses fused "
                             "attention).")
        if self.explicit_attention and self.ema_storage == "factored":
            raise ValueError("explicit_attention builds whole maps: it needs the dense EMA (ema_storage='dense' "
                             "or 'auto').")
        for name in ("ema_window", "apply_window"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, as_window(getattr(self, name), name))
        object.__setattr__(self, "ema_dtype", parse_dtype(self.ema_dtype))
        if self.guided_channels is not None and (isinstance(self.guided_channels, bool)
                                                 or not isinstance(self.guided_channels, int) or self.guided_channels < 1):
            raise ValueError(f"`guided_channels` must be a positive int or None, got {self.guided_channels!r}.")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "EMAG":
        """The EMAG settings of a named preset (see :mod:`emag.presets`), with optional overrides."""
        from .presets import get_preset

        return replace(get_preset(name).emag, **overrides)

    def replace(self, **changes: Any) -> "EMAG":
        return replace(self, **changes)

    def runtime(self, setup):
        """The per-call EMAG term (see :mod:`emag.guidance.emag_term`)."""
        from .guidance.emag_term import EMAGRuntime

        return EMAGRuntime(self, setup)


# Reference values per backbone family (emag.md sections 3 and 5).
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd3": dict(
        scale=1.5, layers=(6, 7, 8), ema_dtype=torch.float16,
        ema_window=SD3ReferenceWindow(250, 50, 0), apply_window=SD3ReferenceWindow(250, 50, 50),
    ),
    "dit": dict(
        scale=3.0, layers=(12, 13, 14, 15), ema_dtype=torch.float32,
        ema_window=RemainingStepsWindow(50, 150), apply_window=RemainingStepsWindow(50, 100),
        additive_apply_window=RemainingStepsWindow(0, 100),
    ),
}


@dataclass(frozen=True)
class ResolvedEMAG:
    """An :class:`EMAG` with every default filled in for one backbone and one model."""

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

    @property
    def is_neutral(self) -> bool:
        """True when the scale makes EMAG a no-op on the output (1 nested/emag_only, 0 additive)."""
        return self.scale == (0.0 if self.combination == "additive" else 1.0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = format_layers(self.layers)
        d["ema_window"] = self.ema_window.describe()
        d["apply_window"] = self.apply_window.describe()
        d["ema_dtype"] = str(self.ema_dtype).replace("torch.", "")
        return d


def resolve(emag: EMAG, family: str, num_blocks: int, model_name: str) -> ResolvedEMAG:
    """Fill an EMAG config's defaults for ``family`` and check it against the model."""
    if family not in BACKBONE_DEFAULTS:
        raise ValueError(f"EMAG has no reference settings for model family {family!r}.")
    if emag.preset_name is not None:
        from .presets import PRESETS

        preset = PRESETS.get(emag.preset_name)
        if preset is not None and preset.family != family:
            fitting = ", ".join(name for name, p in PRESETS.items() if p.family == family)
            shown = {"sd3": "SD3", "dit": "DiT"}
            raise ValueError(f"EMAG.preset({emag.preset_name!r}) is a preset for {shown[preset.family]} models, but "
                             f"this is a {shown.get(family, family)} model ({model_name}): use one of its presets "
                             f"({fitting}) or an EMAG(...) without a preset.")
    d = BACKBONE_DEFAULTS[family]
    layers = emag.layers if emag.layers is not None else d["layers"]
    check_layers_in_range(layers, num_blocks, model_name)
    if family == "dit" and emag.rows != "image_rows":
        raise ValueError("DiT has no text tokens: EMAG `rows` must be 'image_rows' on DiT.")
    if family != "dit" and emag.selection in ("entropy", "entropy_adaptive"):
        raise ValueError("Entropy-based selection modes are defined for DiT only (as in the reference).")
    if family != "dit" and emag.guided_channels is not None:
        raise ValueError("`guided_channels` is a DiT option (the original DiT 3-of-4-channel convention).")
    apply_default = d["apply_window"]
    if family == "dit" and emag.combination == "additive":
        apply_default = d["additive_apply_window"]
    return ResolvedEMAG(
        family=family,
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
    )
