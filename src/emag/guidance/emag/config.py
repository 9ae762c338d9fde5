"""The EMAG configuration object, what a call's other parts learn from it, and the named presets.

``EMAG(...)`` is what the user writes (fields left ``None`` take the model family's reference values,
see :mod:`.settings`); the presets are the published settings of the reference models, built from the
families' defaults table (:mod:`emag.families`) plus the sampling settings each preset was run with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ...dtypes import parse_float_dtype
from ...families import DIT, FLUX, PIXART, SANA, SD3, WAN, ModelFamily
from ...layers import LayerSpec, parse_layers
from ...math.selection import SELECTION_MODES
from ...windows import as_window
from ..base import GuidanceConfig, Setup, check_scale
from .protocols import protocol_of
from .runtime import EMAGRuntime
from .settings import COMBINATIONS, EMA_STORAGES, TRACKED_ROWS, VARIANTS


@dataclass(frozen=True)
class EMAG(GuidanceConfig):
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
            the device, see :func:`emag.guidance.emag.state.dense_budget_bytes`). Full variant,
            ``rows="image_rows"`` only.
        guided_channels: DiT only: guide only the first N latent channels, the rest from the conditional
            prediction. Default ``None``: 3 on 4-channel DiT latents (the original DiT sampler's convention,
            with which the paper's DiT numbers were made, docs/method.md), all channels otherwise; 4 gives
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
        if self.scale is not None:
            check_scale("scale", self.scale)
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
        object.__setattr__(self, "ema_dtype", parse_float_dtype(self.ema_dtype, "ema_dtype"))
        if self.guided_channels is not None and (isinstance(self.guided_channels, bool)
                                                 or not isinstance(self.guided_channels, int) or self.guided_channels < 1):
            raise ValueError(f"`guided_channels` must be a positive int or None, got {self.guided_channels!r}.")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "EMAG":
        """The EMAG settings of a named preset (see :data:`PRESETS`), with optional overrides."""
        return replace(get_preset(name).emag, **overrides)

    def replace(self, **changes: Any) -> "EMAG":
        return replace(self, **changes)

    # -- what the call learns from the term (see emag.guidance.base.GuidanceConfig) -------------------
    def runtime(self, setup: Setup) -> EMAGRuntime:
        check_preset_family(self, setup.family)
        return EMAGRuntime(self, setup)

    def uses_uncond(self, family: ModelFamily, guidance_scale: float) -> bool:
        """The additive mode uses the perturbed unconditional prediction; the DiT reference feeds the EMA
        from the unconditional pass too (nested); SD3's "Only_EMAG" keeps the doubled batch for the score
        while its CFG flag is on (``guidance_scale > 1``). ``cond_only_score`` (opt-in) drops the last two."""
        if self.combination == "additive":
            return True
        if self.cond_only_score:
            return False
        return protocol_of(family).uncond_in_ema(self.combination, guidance_scale)

    def pairs_with_cfg(self, family: ModelFamily, guidance_scale: float) -> bool:
        """Given as ``emag=`` with the call's ``guidance_scale``, EMAG comes with ``CFG(guidance_scale)``
        (the paper's pairing) unless it is ``emag_only``: where diffusers' convention has CFG on
        (``guidance_scale > 1``), or for any ``w != 1`` where the reference applies ``u + w (eps' - u)``
        whatever ``w`` (the DiT sampler)."""
        if self.combination == "emag_only":
            return False
        return guidance_scale > 1 or (protocol_of(family).cfg_any_scale and guidance_scale != 1)

    def default_guided_channels(self, family: ModelFamily, channels: int) -> int | None:
        """The family's reference convention (DiT: the first 3 of 4 latent channels), when this is given."""
        return (family.default("emag", "guided_channels") or {}).get(channels)

    def call_defaults(self, family: ModelFamily) -> dict[str, Any]:
        """The call settings the family's published EMAG numbers used (DiT: CFG 1.5, 250 steps, the
        reference sampler)."""
        keys = ("guidance_scale", "num_inference_steps", "reference_sampler")
        return {k: family.default("emag", k) for k in keys if family.default("emag", k) is not None}

    def noise_layout(self) -> str | None:
        """The additive reference mode steps the doubled ``[x ; x]`` batch (the original DiT CFG sampler)."""
        return "doubled" if self.combination == "additive" else "samples"


@dataclass(frozen=True)
class Preset:
    """A reference model's published EMAG settings and the sampling they were run with."""

    name: str
    family: ModelFamily
    emag: EMAG
    guidance_scale: float
    num_inference_steps: int
    resolution: int
    seed: int
    sampler: str
    model_id: str
    source: str


def _reference(family: ModelFamily, name: str, **changes: Any) -> EMAG:
    """The family's EMAG defaults as an EMAG, with ``changes``."""
    d = family.defaults["emag"]
    keys = ("scale", "layers", "ema_dtype", "ema_window", "apply_window")
    fixed = {k: d[k] for k in keys}
    if d.get("guided_channels"):
        fixed["guided_channels"] = d["guided_channels"][4]
    return EMAG(**{**fixed, **changes}, preset_name=name)


def _sd3(variant: str, name: str, source: str) -> Preset:
    return Preset(
        name=name, family=SD3, emag=_reference(SD3, name, variant=variant),
        guidance_scale=7.0, num_inference_steps=28, resolution=1024, seed=8,
        sampler="FlowMatchEulerDiscrete (shift 3.0)", model_id="stabilityai/stable-diffusion-3-medium-diffusers",
        source=source,
    )


def _dit(name: str, combination: str, source: str, resolution: int = 256) -> Preset:
    changes: dict[str, Any] = {"combination": combination}
    if combination == "additive":
        changes["apply_window"] = DIT.defaults["emag"]["additive_apply_window"]
    return Preset(
        name=name, family=DIT, emag=_reference(DIT, name, **changes),
        guidance_scale=DIT.defaults["emag"]["guidance_scale"],
        num_inference_steps=DIT.defaults["emag"]["num_inference_steps"], resolution=resolution, seed=8,
        sampler="ddpm-250 (ancestral DDPM, learned-range variance, respaced like the original DiT)",
        model_id=f"facebook/DiT-XL-2-{resolution}", source=source,
    )


def _chosen(name: str, family: ModelFamily, layers: str, model_id: str, guidance_scale: float, steps: int,
            resolution: int, sampler: str, why: str, **changes: Any) -> Preset:
    """A preset of this project's choosing for a model no paper gives EMAG settings for: the family's EMAG
    defaults (SD3's scale, windows and float16 EMA) on the middle blocks of the reference model ``layers``,
    with the model's own sampling defaults."""
    return Preset(
        name=name, family=family, emag=_reference(family, name, layers=layers, **changes),
        guidance_scale=guidance_scale, num_inference_steps=steps, resolution=resolution, seed=0, sampler=sampler,
        model_id=model_id, source=f"This project's choice, not a published setting: {why}",
    )


def _digits() -> Preset:
    return Preset(
        name="digits", family=DIT,
        emag=EMAG(scale=2.0, layers=(3, 4), beta=0.988, blend=1.0, variant="full", ema_window=(0.0, 1.0),
                  apply_window=(0.2, 1.0), combination="nested", ema_dtype="float32", preset_name="digits"),
        guidance_scale=3.0, num_inference_steps=25, resolution=8, seed=0,
        sampler="the model's DDIM (trailing spacing, no clipping)", model_id="bundled",
        source="The bundled 8-block digits DiT (emag.digits): EMAG on its middle blocks 3-4 with fraction windows "
               "(the reference DiT windows are absolute and never open at 50 steps); chosen by eye, see "
               "benchmarks/quality.py for measured scales.",
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _sd3("full", "sd3-medium",
             "Paper Table 2 EMAG row (SD3-Medium, COCO, 28 steps, CFG 7, w_e 1.5, blocks 6-8, beta 0.988); "
             "windows and fp16 EMA from the reference SD3 pipeline (docs/method.md)."),
        _sd3("q", "sd3-medium-q",
             "The reference SD3 scripts' default variant EMAG-Q (paper Table 4), otherwise as sd3-medium."),
        _dit("dit-xl-2", "nested",
             "Paper DiT-XL/2 setting: 250-step DDPM, CFG 1.5, w_e 3, blocks 12-15, EMA 50<=curr<=150, "
             "replacement 50<=curr<=100, 3-of-4 channel CFG (docs/method.md)."),
        _dit("dit-xl-2-512", "nested", "As dit-xl-2 for the 512 px model.", resolution=512),
        _dit("dit-xl-2-additive", "additive",
             "Reference DiT additive variant u + w(c-u) + w_e(c-u_e), doubled [x;x] batch, "
             "replacement whenever curr <= 100 (docs/method.md)."),
        _digits(),
        _chosen("sd35-medium", SD3, "6-8", "stabilityai/stable-diffusion-3.5-medium", 4.5, 40, 1024,
                "FlowMatchEulerDiscrete (shift 3.0)",
                "SD3.5 Medium has SD3-Medium's 24 blocks: the paper's SD3 blocks 6-8 and settings; the model card's "
                "CFG 4.5 and 40 steps."),
        _chosen("sd35-large", SD3, "10-12", "stabilityai/stable-diffusion-3.5-large", 3.5, 28, 1024,
                "FlowMatchEulerDiscrete (shift 3.0)",
                "SD3-Medium's blocks 6-8 (25-33 % of the depth) mapped to SD3.5 Large's 38 blocks; the model "
                "card's CFG 3.5 and 28 steps."),
        _chosen("flux-dev", FLUX, "double:8-10", "black-forest-labs/FLUX.1-dev", 3.5, 28, 1024,
                "FlowMatchEulerDiscrete (dynamic shift)",
                "the three middle double blocks of FLUX.1-dev (19 double, 38 single); guidance-distilled, so EMAG "
                "guides the conditional prediction, c_e + w_e (c - c_e), with the embedded guidance 3.5."),
        _chosen("pixart-sigma", PIXART, "13-15", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 4.5, 20, 1024,
                "DPMSolverMultistep", "the three middle blocks of PixArt-Sigma-XL (28); the pipeline's CFG 4.5 and 20 "
                "steps."),
        _chosen("sana-1600m", SANA, "9-11", "Efficient-Large-Model/Sana_1600M_1024px_diffusers", 4.5, 20, 1024,
                "DPMSolverMultistep (flow)", "EMAG-Q (the variant defined on linear attention) on the three middle "
                "blocks of Sana 1600M (20); the pipeline's CFG 4.5 and 20 steps.", variant="q"),
        _chosen("wan2.1-1.3b", WAN, "14-16", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", 5.0, 50, 480,
                "UniPCMultistep (flow, shift 3.0)", "EMAG-Q (one query tensor per row and block; a dense map EMA "
                "is ~26 GB per row and block at 832 x 480 x 81) on the three middle blocks of Wan2.1-T2V-1.3B (30); "
                "the pipeline's CFG 5 and 50 steps.", variant="q"),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"Unknown EMAG preset {name!r}; available: {', '.join(PRESETS)}.")
    return PRESETS[name]


def check_preset_family(emag: EMAG, family: ModelFamily) -> None:
    """An EMAG built from a preset of another model family is refused (its layers and windows are that
    family's)."""
    preset = PRESETS.get(emag.preset_name) if emag.preset_name is not None else None
    if preset is not None and preset.family is not family:
        fitting = ", ".join(name for name, p in PRESETS.items() if p.family is family)
        raise ValueError(f"EMAG.preset({emag.preset_name!r}) is a preset for {preset.family.label} models, but this "
                         f"is a {family.label} model ({family.transformer_class}): use one of its presets "
                         f"({fitting}) or an EMAG(...) without a preset.")
