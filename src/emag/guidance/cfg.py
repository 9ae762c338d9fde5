"""Classifier-free guidance and its variants: guidance interval, CFG rescale, CFG-Zero*."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..math.combine import cfg
from ..windows import SigmaInterval, StepContext
from .base import GuidanceConfig, Setup, TermRuntime, check_scale, window_of


def rescale_cfg(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """CFG rescale (Lin et al., WACV 2024, section 3.4), per sample over all non-batch dims:
    ``D_r = D * std(c) / std(D)``, output ``phi D_r + (1 - phi) D``."""
    dims = list(range(1, guided.dim()))
    std_c = cond.std(dim=dims, keepdim=True)
    std_g = guided.std(dim=dims, keepdim=True)
    return phi * (guided * (std_c / std_g)) + (1.0 - phi) * guided


def zero_star_scale(cond: Tensor, uncond: Tensor) -> Tensor:
    """CFG-Zero*'s optimised scale per sample, ``s* = <c, u> / (||u||^2 + 1e-8)`` in float32
    (Fan et al. 2025, arXiv 2503.18886), shaped to broadcast over the sample."""
    c, u = cond.flatten(1).float(), uncond.flatten(1).float()
    s = (c * u).sum(1) / (u.pow(2).sum(1) + 1e-8)
    return s.view(-1, *([1] * (cond.dim() - 1))).to(cond.dtype)


RESCALE_SPACES = ("native", "x0")


def check_rescale(rescale: float, space: str) -> None:
    """Validate a CFG-rescale ``phi`` in [0, 1] and the space it runs in."""
    check_scale("rescale", rescale)
    if rescale > 1:
        raise ValueError(f"`rescale` must be in [0, 1], got {rescale}.")
    if space not in RESCALE_SPACES:
        raise ValueError(f"`rescale_space` must be 'native' or 'x0', got {space!r}.")


class RescaleRuntime(TermRuntime):
    """A base term whose config has ``rescale`` / ``rescale_space``: CFG rescale after all terms
    (docs/guidance.md sections 4.3, 3.2), in its own space whatever space the terms were combined in (the std
    matching is not affine, docs/guidance.md section 2.2). diffusers applies it after CFG, APG and CFG-Zero* alike."""

    @property
    def post_space(self) -> str | None:
        return self.config.rescale_space if self.config.rescale > 0 else None

    def post(self, guided, c, ctx) -> Tensor:
        return rescale_cfg(guided, c, self.config.rescale) if self.config.rescale > 0 else guided


@dataclass(frozen=True)
class CFG(GuidanceConfig):
    """Classifier-free guidance ``D = u + w (c - u)`` (Ho & Salimans 2022; Imagen convention, w = 1 is off).

    Args:
        scale: ``w``; ``1`` is neutral (no unconditional pass is run). Default ``None``: the pipeline
            call's ``guidance_scale`` (SD3 7.0, diffusers' default; DiT 4.0, diffusers' visual default, or
            1.5 when EMAG is in the call, the FID protocol the EMAG reference uses).
        window: step window (fractions ``(start, stop)``, half-open) or a :class:`~emag.SigmaInterval`.
        interval: the guidance interval of Kynkaanniemi et al. (NeurIPS 2024): ``(sigma_lo, sigma_hi]`` in
            EDM sigma; outside it CFG is off and the unconditional pass is skipped. Exclusive with ``window``.
            The paper's DiT-XL/2 settings are for the 512 px model (docs/guidance.md section 4.2): FID-optimal
            ``(0.34, 1.02]`` with ``w = 2.5`` (FID 3.04 -> 2.40), FD_DINOv2-optimal ``(0.45, 1.23]`` with
            ``w = 4.0``; with this library's sigma of the 250-step reference sampler
            (``sqrt((1 - abar) / abar)``) they guide 41 and 42 of the 250 steps. DiT-XL/2 256 px was not
            tuned there.
        rescale: CFG-rescale ``phi`` in [0, 1] (0 = off), per sample, applied after all terms. Lin et al.'s
            value is 0.7 as diffusers and other implementations use it (their section 3.4; the
            sentence itself was not reachable offline).
        rescale_space: the space the rescale's std matching runs in (it is not affine, docs/guidance.md
            sections 2.2, 4.3): ``"native"`` (default; diffusers': epsilon for DiT, velocity for SD3) or ``"x0"``.
            The same whatever other terms are active.
        guided_channels: DiT only: guide only the first N latent channels (3 = the original DiT convention).
    """

    is_base = True

    scale: float | None = None
    window: Any = None
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    rescale_space: str = "native"
    guided_channels: int | None = None

    def __post_init__(self) -> None:
        if self.scale is not None:
            check_scale("scale", self.scale)
        check_rescale(self.rescale, self.rescale_space)
        if self.interval is not None and self.window is not None:
            raise ValueError("Give either `window` or `interval` (the sigma guidance interval), not both.")
        if self.interval is not None:
            SigmaInterval(*self.interval)  # validate
        window_of(self.window)
        if self.guided_channels is not None and (not isinstance(self.guided_channels, int) or self.guided_channels < 1):
            raise ValueError(f"`guided_channels` must be a positive int or None, got {self.guided_channels!r}.")

    def uses_uncond(self, family: Any, guidance_scale: float) -> bool:
        return self.scale is None or self.scale != 1.0

    def with_defaults(self, family: Any, guidance_scale: float | None) -> "CFG":
        """This config with ``scale=None`` resolved to the call's ``guidance_scale``."""
        if self.scale is not None:
            return self
        if guidance_scale is None:
            raise ValueError("CFG(scale=None) takes the pipeline call's guidance_scale, and none was given.")
        return dataclasses.replace(self, scale=float(guidance_scale))

    def term_window(self):
        return SigmaInterval(*self.interval) if self.interval is not None else window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        if self.scale is None:
            raise ValueError("CFG(scale=None) must be resolved against the call's guidance_scale first "
                             "(the pipelines do this).")
        return CFGRuntime(self, self.term_window())


class CFGRuntime(RescaleRuntime):
    """CFG; its rescale (after all terms, docs/guidance.md section 3.2) runs in ``rescale_space`` whatever
    space the terms are combined in: the std matching is not affine (docs/guidance.md section 2.2), so the same call must not
    rescale differently because another term asked for x0 space."""

    kind = "base"
    name = "cfg"

    def active(self, ctx: StepContext) -> bool:
        return self.config.scale != 1.0 and self.window.contains(ctx)

    def combine(self, c, u, p, ctx) -> Tensor:
        return cfg(u, c, self.config.scale)


@dataclass(frozen=True)
class CFGZeroStar(GuidanceConfig):
    """CFG-Zero* (Fan et al. 2025): ``D = s* u + w (c - s* u)`` with the per-sample optimised scale
    ``s*``, and the output zeroed for the first ``zero_init_steps`` steps. Flow-matching models only:
    a zero velocity leaves ``x_t`` in place, while a zero epsilon would not.

    Zero-init zeroes the step's whole output, other terms (PAG, EMAG, ...) included, and applies whatever
    ``window`` says (diffusers' guider checks it before its window). Alone it runs no model pass; with other
    terms their passes still run (EMAG's EMA is fed, RNG streams advance) and their result is discarded.

    ``original_formulation=True``: the original-CFG form ``D = c + w (c - s* u)`` (docs/guidance.md
    section 4.4, diffusers' ``use_original_formulation``; ``w`` there is ``w' = w_Imagen - 1``).

    ``rescale`` / ``rescale_space``: CFG rescale after it, as :class:`CFG`'s (diffusers applies it after
    CFG-Zero* too).
    """

    is_base = True

    scale: float = 4.0
    zero_init_steps: int = 1
    window: Any = None
    original_formulation: bool = False
    rescale: float = 0.0
    rescale_space: str = "native"

    def __post_init__(self) -> None:
        check_scale("scale", self.scale)
        check_rescale(self.rescale, self.rescale_space)
        if not isinstance(self.zero_init_steps, int) or self.zero_init_steps < 0:
            raise ValueError(f"`zero_init_steps` must be an int >= 0, got {self.zero_init_steps!r}.")
        if not isinstance(self.original_formulation, bool):
            raise TypeError(f"`original_formulation` must be True or False, got {self.original_formulation!r}.")
        window_of(self.window)

    def uses_uncond(self, family: Any, guidance_scale: float) -> bool:
        return True

    def runtime(self, setup: Setup) -> TermRuntime:
        if setup.family.prediction != "flow":
            raise ValueError("CFG-Zero* is defined for flow-matching models (zero velocity); this model predicts "
                             f"{setup.family.prediction}.")
        return CFGZeroStarRuntime(self, window_of(self.window))


class CFGZeroStarRuntime(RescaleRuntime):
    """Computed on the velocity (the paper's space: ``s*`` and the zero output are velocity ones), whatever
    space the other terms are combined in."""

    kind = "base"
    name = "cfg_zero_star"
    space_sensitive = True

    def zero_output(self, ctx: StepContext) -> bool:
        return ctx.index < self.config.zero_init_steps

    def active(self, ctx: StepContext) -> bool:
        # diffusers' guider tests ``step < zero_init_steps`` before its window: zero-init ignores the window
        return self.zero_output(ctx) or self.window.contains(ctx)

    def combine(self, c, u, p, ctx) -> Tensor:
        if self.zero_output(ctx):
            return torch.zeros_like(c)
        s = zero_star_scale(c, u)
        if self.config.original_formulation:
            return c + self.config.scale * (c - s * u)
        return s * u + self.config.scale * (c - s * u)
