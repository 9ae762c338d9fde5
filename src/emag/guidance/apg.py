"""APG, Adaptive Projected Guidance (Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416).

Paper Algorithm 1, per step, on the denoised (x0) predictions of the conditional and unconditional
branches (docs/guidance.md section 5.1):

1. ``diff = D_c - D_u``;
2. reverse momentum ``M <- diff + beta M`` (beta < 0; ``M = 0`` at the start of every call; the buffer
   stores the UNclamped diffs), then ``diff <- M``;
3. norm clamp ``diff <- diff * min(1, r / ||diff||)``, per sample over all non-batch dims (``r = 0``: off);
4. projection onto the conditional prediction, in float64: ``diff_par = <diff, c_hat> c_hat`` with
   ``c_hat = D_c / ||D_c||``, ``diff_orth = diff - diff_par``;
5. ``update = diff_orth + eta diff_par``;
6. output ``D = D_c + (w - 1) update`` (the PAPER convention: ``w = 1`` is off).

The pure functions below implement one step each; :class:`APG` is the composable term.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..families import ModelFamily, family_named
from ..math.combine import cfg
from ..windows import StepContext
from .base import GuidanceConfig, Setup, TermRuntime, check_scale, window_of
from .cfg import RescaleRuntime, check_rescale
from .perturbation import PerturbationRuntime

TARGETS = ("cfg", "pert", "both")
THRESHOLD_MODES = ("absolute", "rms")
SPACES = ("x0", "native")

# Per-family defaults (``None`` fields of :class:`APG`) are the model family's (:mod:`emag.families`,
# where each number's source is given: the EMAG reference's SD3 and DiT APG settings).
# Checked (2026-11, secondary sources quoting the paper; its Table 10 was not reachable offline): eta = 0
# is the paper's recommendation; SDXL uses r = 15 and beta = -0.5 (diffusers PR 9626), EDM2-XL r = 2.5;
# whether the paper has SD3 or DiT-XL/2 rows, and their values, was not found [unverified].
# The RMS thresholds are the absolute ones divided by sqrt(numel) of the reference latent, i.e. the same
# clamp at the reference resolution.


#----------------------------------------------------------------------------
# Pure functions, one per step of Algorithm 1.

def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a ``[B]`` vector to broadcast over ``like``'s non-batch dims."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def apg_momentum(diff: Tensor, buffer: Tensor | None, momentum: float) -> Tensor:
    """Reverse momentum (Algorithm 1): ``M <- diff + beta M``; ``buffer=None`` is the zero start."""
    return diff if buffer is None else diff + momentum * buffer


def apg_clamp(diff: Tensor, norm_threshold: float, threshold_mode: str = "absolute") -> Tensor:
    """Norm clamp ``diff * min(1, r / ||diff||)`` per sample over all non-batch dims; ``r = 0`` is off.

    ``threshold_mode="rms"`` compares ``r`` with the root-mean-square ``||diff|| / sqrt(numel)``
    instead, which does not grow with the latent size (docs/guidance.md section 5.4).
    """
    if norm_threshold <= 0:
        return diff
    norm = diff.flatten(1).norm(dim=1)
    if threshold_mode == "rms":
        norm = norm / math.sqrt(diff[0].numel())
    factor = torch.clamp(norm_threshold / norm.clamp_min(torch.finfo(norm.dtype).tiny), max=1.0)
    return diff * _per_sample(factor, diff)


def apg_project(diff: Tensor, pred_cond: Tensor) -> tuple[Tensor, Tensor]:
    """``(parallel, orthogonal)`` parts of ``diff`` with respect to ``pred_cond``, per sample, in float64."""
    d = diff.double()
    unit = torch.nn.functional.normalize(pred_cond.double().flatten(1), dim=1).view_as(d)
    parallel = _per_sample((d * unit).flatten(1).sum(dim=1), d) * unit
    return parallel, d - parallel


def apg_update(diff: Tensor, pred_cond: Tensor, eta: float, norm_threshold: float,
               threshold_mode: str = "absolute") -> Tensor:
    """Steps 3-5 of Algorithm 1: clamp, project onto ``pred_cond``, ``orth + eta par`` (float64)."""
    parallel, orthogonal = apg_project(apg_clamp(diff.double(), norm_threshold, threshold_mode), pred_cond)
    return orthogonal + eta * parallel


#----------------------------------------------------------------------------
# The composable term.

@dataclass(frozen=True)
class APG(GuidanceConfig):
    """Adaptive Projected Guidance (Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416), a CFG replacement.

    ``D = c + (w - 1) APG(c - u)`` with ``APG(diff)`` = reverse momentum, per-sample norm clamp, and
    projection onto ``c`` keeping ``orth + eta * par`` (see the module docstring for the steps).

    Convention: ``scale`` is the PAPER's ``w``, ``D = c + (w - 1) update``, so ``w = 1`` is off and
    ``eta = 1, momentum = 0, norm_threshold = 0`` is exactly CFG with the same ``w``. diffusers'
    ``AdaptiveProjectedGuidance`` by default returns ``u + w update`` instead, which is not ``c`` at
    ``w = 1``; the paper's formula is diffusers' ``use_original_formulation=True`` with
    ``guidance_scale = w - 1`` (docs/guidance.md section 5.3). ComfyUI's node uses ``w_paper = w_ui + 1``.

    Args:
        scale: ``w`` (paper convention, ``>= 0``; 1 is off). Default per backbone: SD3 12 (the EMAG
            reference SD3 APG runs); DiT 1.5 (the DiT preset's CFG scale; the reference DiT APG scale
            is not recorded [unverified]).
        eta: weight (``>= 0``) of the component parallel to ``c`` (paper default 0; 1 = no projection).
        momentum: ``beta`` of the momentum buffer; the paper's reverse momentum is negative
            (-0.5, paper Table 10 for SDXL per diffusers PR #9626); 0 disables it. Negative values
            are honoured (ComfyUI once clamped them to >= 0, PR #8100). Must be in (-1, 1).
        norm_threshold: ``r``, the clamp radius (``>= 0``; 0 disables the clamp). Default per
            backbone: SD3 7.5 (EMAG reference SD3 APG), DiT 5 (EMAG reference DiT APG). The
            paper uses 2.5 to 15 depending on the model; ``r`` depends on the latent size, so
            re-tune it per model and resolution (docs/guidance.md section 5.4).
        target: which guidance directions APG shapes (docs/guidance.md section 5.5):
            ``"cfg"`` (default): only the CFG term, ``D = c' + (w - 1) APG(c' - u) + sum_k s_k (c - p_k)``,
            perturbation terms stay linear; ``c'`` is the refined conditional (EMAG nested:
            ``c' = c + (w_e - 1)(c - c_e)``, the paper's EMAG + APG).
            ``"pert"``: the CFG part is plain CFG ``u + w (c' - u)`` and each perturbation direction
            gets APG with ITS OWN momentum buffer and the same ``r``/``eta``/``momentum``: additive
            terms become ``s_k APG_k(c - p_k)``, EMAG's nested refinement becomes
            ``c + (w_e - 1) APG_e(c - c_e)`` (the raw difference is clamped, then scaled).
            ``"both"``: both at once, every direction with its own buffer.
        space: ``"x0"`` (default; the APG paper's recommendation, and what ComfyUI does) or
            ``"native"``: the raw model output (epsilon for DiT, velocity for SD3), which is what
            diffusers' guider does. The result depends on the space (projection and clamp are not
            affine), so APG is always computed in the space given here, converted from and back to
            the space the other terms are combined in (x0 when an x0 term such as this one or SAG is
            active; the affine terms (CFG, PAG, EMAG, ...) give the same result in either space).
        threshold_mode: ``"absolute"`` (paper: ``r`` against ``||diff||``) or ``"rms"``: ``r`` against
            ``||diff|| / sqrt(numel per sample)``, independent of the resolution. The default RMS
            ``r`` is the backbone's absolute default divided by ``sqrt(numel)`` of its reference
            latent (SD3 1024 px: 16x128x128, r = 7.5 / 512; DiT 256 px: 4x32x32, r = 5 / 64).
        window: step window of the term (fractions ``(start, stop)``, half-open) or a sigma interval;
            outside it APG is off entirely (no CFG; perturbation terms linear; buffers not updated).
        rescale, rescale_space: CFG rescale after APG, as :class:`~emag.CFG`'s (diffusers applies it after
            APG too); default off.

    State: one momentum buffer per guidance direction, created empty for every pipeline call and
    never shared between directions or calls; a direction's buffer is updated only at the steps where
    its term is active (a perturbation term outside its own window contributes nothing, not a
    momentum residue). Statistics (norms, projection) are per sample over all the model's
    noise/velocity channels (not DiT's learned-variance channels), even when a term restricts the
    guided channels (DiT's 3-of-4 convention).
    """

    is_base = True

    scale: float | None = None
    eta: float = 0.0
    momentum: float = -0.5
    norm_threshold: float | None = None
    target: str = "cfg"
    space: str = "x0"
    threshold_mode: str = "absolute"
    window: Any = None
    rescale: float = 0.0
    rescale_space: str = "native"

    def __post_init__(self) -> None:
        if self.scale is not None:
            check_scale("scale", self.scale)
        check_scale("eta", self.eta)
        check_scale("momentum", self.momentum, minimum=None)
        if not -1.0 < self.momentum < 1.0:
            raise ValueError(f"`momentum` must be in (-1, 1) (the paper uses -0.5), got {self.momentum}.")
        if self.norm_threshold is not None:
            check_scale("norm_threshold", self.norm_threshold)
        for name, allowed in (("target", TARGETS), ("space", SPACES), ("threshold_mode", THRESHOLD_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Unknown APG {name} {getattr(self, name)!r}; expected one of {allowed}.")
        window_of(self.window)
        check_rescale(self.rescale, self.rescale_space)

    def uses_uncond(self, family: ModelFamily, guidance_scale: float) -> bool:
        """Whether the unconditional prediction can be needed (the CFG part is off at ``scale == 1``)."""
        return self.scale is None or self.scale != 1.0

    def resolved(self, family: ModelFamily | str) -> dict[str, float]:
        """``scale`` and ``norm_threshold`` with the model family's (or its name's) defaults filled in."""
        family = family_named(family)
        d = family.defaults.get("apg")
        if d is None and (self.scale is None or self.norm_threshold is None):
            raise ValueError(f"APG has no defaults for {family.label} models; pass `scale` and `norm_threshold`.")
        scale = self.scale if self.scale is not None else d["scale"]
        if self.norm_threshold is not None:
            r = self.norm_threshold
        else:
            r = d["rms_threshold"] if self.threshold_mode == "rms" else d["norm_threshold"]
        return {"scale": float(scale), "norm_threshold": float(r)}

    def with_defaults(self, family: ModelFamily, guidance_scale: float | None = None) -> "APG":
        """This config with the model family's defaults written into ``scale`` and ``norm_threshold`` (what
        the run's metadata records)."""
        return dataclasses.replace(self, **self.resolved(family))

    def runtime(self, setup: Setup) -> TermRuntime:
        return APGRuntime(self, window_of(self.window), **self.resolved(setup.family))


class APGRuntime(RescaleRuntime):
    """Per-call APG state: ``buffers`` maps a guidance direction (``"cfg"`` or a term's runtime) to its
    momentum buffer (float64, unclamped)."""

    kind = "base"
    name = "apg"

    def __init__(self, config: APG, window, scale: float, norm_threshold: float) -> None:
        super().__init__(config, window)
        self.scale, self.norm_threshold = scale, norm_threshold
        self.space = config.space
        self.space_sensitive = True  # projection and norm clamp are not affine
        self.on_cfg = config.target in ("cfg", "both")
        self.on_pert = config.target in ("pert", "both")
        self.buffers: dict[Any, Tensor] = {}

    def active(self, ctx: StepContext) -> bool:
        return (self.scale != 1.0 or self.on_pert) and self.window.contains(ctx)

    def base_needs_uncond(self, ctx: StepContext) -> bool:
        return self.scale != 1.0

    def guide(self, key: Any, diff: Tensor, pred_cond: Tensor) -> Tensor:
        """Momentum (buffer ``key``), clamp and projection of ``diff``; returned in ``pred_cond``'s dtype."""
        prev = self.buffers.get(key)
        if prev is not None and prev.shape != diff.shape:
            raise ValueError(f"APG momentum buffer has shape {tuple(prev.shape)} but the step's difference has "
                             f"{tuple(diff.shape)}: one APG runtime serves one pipeline call.")
        m = apg_momentum(diff.double(), prev, self.config.momentum)
        self.buffers[key] = m
        upd = apg_update(m, pred_cond, self.config.eta, self.norm_threshold, self.config.threshold_mode)
        return upd.to(pred_cond.dtype)

    # -- combination ----------------------------------------------------------------------------------
    def combine(self, c: Tensor, u: Tensor | None, p, ctx: StepContext) -> Tensor:
        if self.scale == 1.0:
            return c
        if not self.on_cfg:
            return cfg(u, c, self.scale)
        return c + (self.scale - 1.0) * self.guide("cfg", c - u, c)

    def apply_refine(self, term: TermRuntime, c: Tensor, p, ctx: StepContext) -> Tensor:
        if not self.on_pert:
            return term.refine(c, p, ctx)
        parts = term.refine_parts(c, p, ctx)
        if parts is None:
            raise ValueError(f"APG target={self.config.target!r} cannot shape the refinement of {term.name!r}: it "
                             "has no (scale, diff) form (TermRuntime.refine_parts). Use target='cfg'.")
        scale, diff = parts
        return c + scale * self.guide(term, diff, c)

    def apply_delta(self, term: TermRuntime, c: Tensor, p, ctx: StepContext) -> Tensor:
        if not self.on_pert:
            return term.delta(c, p, ctx)
        scale, diff = additive_parts(term, c, p, ctx, self.config.target)
        return scale * self.guide(term, diff, c)

    def describe(self) -> dict:
        d = super().describe()
        d.update(method="apg", scale=self.scale, norm_threshold=self.norm_threshold)
        return d


def additive_parts(term: TermRuntime, c: Tensor, p, ctx: StepContext, target: str) -> tuple[float, Tensor]:
    """``(s, c - p)`` of an additive term: its own ``delta_parts``, or the canonical perturbation form."""
    parts = term.delta_parts(c, p, ctx)
    if parts is None and isinstance(term, PerturbationRuntime) and type(term).delta is PerturbationRuntime.delta:
        parts = (term.config.scale, c - p[term.branch_name])
    if parts is None:
        raise ValueError(f"APG target={target!r} cannot shape the additive term {term.name!r}: its delta has no "
                         "(scale, diff) form (TermRuntime.delta_parts). Use target='cfg'.")
    return parts


__all__ = ["APG", "APGRuntime", "apg_clamp", "apg_momentum", "apg_project", "apg_update"]
