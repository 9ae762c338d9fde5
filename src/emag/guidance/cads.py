"""CADS, Condition-Annealed Diffusion Sampler (Sadat et al., ICLR 2024 spotlight, arXiv 2310.17347).

At normalised model time ``t`` in [0, 1] (1 = noisiest), the condition ``y`` fed to the denoiser is
replaced by (docs/guidance.md section 6.1)

    gamma(t) = 1 if t <= tau1;  (tau2 - t) / (tau2 - tau1) if tau1 < t < tau2;  0 if t >= tau2
    y_hat    = sqrt(gamma) y + s sqrt(1 - gamma) n,          n ~ N(0, I), fresh every step
    y_resc   = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)     (per sample)
    y_final  = psi y_resc + (1 - psi) y_hat                   (y_hat when rescaling is off)

so early (noisy) steps see a noisier condition, which raises diversity at high guidance scales. The
algorithm is as in the A1111 extension ``v0xie/sd-webui-cads``, which follows the paper's appendix
code; the formulas above agree with a paper note of arXiv 2310.17347 (Eqs. 1-4; checked 2026-11), the
paper's per-task table (Appendix G, Table 12: DiT-XL/2 tau1, tau2, s, psi) was not reachable offline
[unverified], and neither was its wording on which branch is noised (third-party implementations
disagree: the A1111 extension noises cond and uncond, ComfyUI-CADS defaults to uncond). No official
code exists. Conditions derived from the noised one (C-ERG's weakened text condition) are annealed with
the SAME draw, from their own clean value. CADS adds no forward pass and no
combine term: it rewrites the conditioning every branch of the step is fed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..plumbing.conditions import ClassCondition, TextCondition
from ..windows import StepContext
from .base import GuidanceConfig, Setup, TermRuntime, check_scale, window_of

APPLY_TO = ("cond", "cond+uncond")
DEFAULT_SEED = 2310_17347  # the paper's arXiv id
_STREAM_SALT = 0x43414453  # "CADS"


def stream_seed(seed: int) -> int:
    """The seed of CADS's own generator for a user ``seed``: a fixed mix, so that ``CADS(seed=s)`` does not
    replay the numbers of a latent generator seeded with the same ``s`` (separate streams, docs/guidance.md section 3.6)."""
    return (seed * 0x9E3779B97F4A7C15 + _STREAM_SALT) % (2**63)


#----------------------------------------------------------------------------
# Pure functions.

def cads_gamma(t: float, tau1: float, tau2: float) -> float:
    """The annealing schedule ``gamma(t)``: 1 for ``t <= tau1``, 0 for ``t >= tau2``, linear between."""
    if t <= tau1:
        return 1.0
    if t >= tau2:
        return 0.0
    return (tau2 - t) / (tau2 - tau1)


def rescale_to_stats(y_hat: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """``(y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)``, statistics per sample over all
    non-batch dims (the reference code pools the whole batch; we do not)."""
    dims = list(range(1, y.dim()))
    mean_h, std_h = y_hat.mean(dim=dims, keepdim=True), y_hat.std(dim=dims, keepdim=True)
    mean_y, std_y = y.mean(dim=dims, keepdim=True), y.std(dim=dims, keepdim=True)
    return (y_hat - mean_h) / std_h.clamp_min(eps) * std_y + mean_y


def cads_anneal(y: Tensor, gamma: float, noise: Tensor, noise_scale: float, psi: float = 1.0,
                rescale: bool = True) -> Tensor:
    """The CADS condition (paper Eq. for ``y_hat``, optional rescale and ``psi`` mix), computed in float32."""
    y32 = y.float()
    y_hat = math.sqrt(gamma) * y32 + noise_scale * math.sqrt(1.0 - gamma) * noise.float()
    if rescale:
        y_hat = psi * rescale_to_stats(y_hat, y32) + (1.0 - psi) * y_hat
    return y_hat.to(y.dtype)


#----------------------------------------------------------------------------
# The composable term.

@dataclass(frozen=True)
class CADS(GuidanceConfig):
    """Condition-Annealed Diffusion Sampler (Sadat et al., ICLR 2024, arXiv 2310.17347): annealed noise on
    the condition for diversity (equations in the module docstring).

    What is noised: SD3: the sequence text embeddings ``[B, T, D]`` (CLIP + T5, padding tokens
    included: SD3 attends to them without a mask) AND the pooled embeddings ``[B, P]``, each with its
    own draw and rescaled to its own per-sample statistics. DiT: the class-embedding vector after the
    label lookup (not the integer label), in every block's label embedder with the SAME noise in a step.

    Every branch that consumes the conditional condition in a step (``cond`` and every perturbed
    branch: PAG, SEG, EMAG, ...) gets the identical noised ``y_hat``, so a perturbation difference
    contains no CADS noise (docs/guidance.md section 3.5).

    Args:
        tau1, tau2: schedule breakpoints in normalised model time, ``0 <= tau1 < tau2`` (defaults 0.6,
            0.9 [3rd-party: the paper's code as used by the A1111 extension]). ``t`` is the model's own
            time, not the step fraction: sigma for rectified flow (SD3, after the scheduler's shift),
            ``timestep / 1000`` for DDPM (DiT). ``tau1 >= 1`` disables CADS.
        noise_scale: ``s >= 0`` (default 0.25 [3rd-party]; the ComfyUI-CADS README suggests 0.025-0.25).
        psi: mix of the rescaled and raw noised condition, in [0, 1] (default 1 [3rd-party]).
        rescale: rescale to the clean condition's per-sample mean/std (default on [3rd-party]).
        apply_to: ``"cond"`` (default) or ``"cond+uncond"`` (also the negative / null condition, with its
            own draw, as the A1111 extension does; the paper's choice is [unverified]).
        seed: seed of the term's OWN ``torch.Generator`` (CPU; ``None``: a fixed default), so toggling
            CADS never changes the latent noise stream and a call is reproducible. The generator is
            seeded with a fixed mix of ``seed`` (:func:`stream_seed`), so the same number used for the
            latents does not give correlated draws. One stream per call for the whole batch: the noise
            of a sample depends on the batch size.
        window: step window of the term (default every step; ``gamma`` is the real schedule).
    """

    tau1: float = 0.6
    tau2: float = 0.9
    noise_scale: float = 0.25
    psi: float = 1.0
    rescale: bool = True
    apply_to: str = "cond"
    seed: int | None = None
    window: Any = None

    def __post_init__(self) -> None:
        check_scale("tau1", self.tau1)
        check_scale("tau2", self.tau2)
        if self.tau1 >= self.tau2:
            raise ValueError(f"CADS needs tau1 < tau2 (gamma falls from 1 at tau1 to 0 at tau2), got "
                             f"tau1={self.tau1}, tau2={self.tau2}.")
        check_scale("noise_scale", self.noise_scale)
        check_scale("psi", self.psi)
        if self.psi > 1:
            raise ValueError(f"`psi` must be in [0, 1], got {self.psi}.")
        if not isinstance(self.rescale, bool):
            raise TypeError(f"`rescale` must be a bool, got {self.rescale!r}.")
        if self.apply_to not in APPLY_TO:
            raise ValueError(f"Unknown CADS apply_to {self.apply_to!r}; expected one of {APPLY_TO}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"`seed` must be an int or None, got {self.seed!r}.")
        window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        if setup.family.conditioning not in ("text", "class"):
            raise ValueError(f"CADS noises text or class conditions, not the {setup.family.label} model's.")
        return CADSRuntime(self, window_of(self.window))


class CADSRuntime(TermRuntime):
    """Per-call CADS state: the term's generator, and what it did at each step (``trace``)."""

    kind = "condition"
    name = "cads"

    def __init__(self, config: CADS, window) -> None:
        super().__init__(config, window)
        seed = DEFAULT_SEED if config.seed is None else config.seed
        self.generator = torch.Generator(device="cpu").manual_seed(stream_seed(seed))
        self.trace: list[tuple[int, float, float]] = []  # (step, t, gamma)

    def gamma(self, ctx: StepContext) -> float:
        if ctx.param is None:
            raise ValueError("CADS needs the step's normalised model time (ctx.param); this scheduler is not supported.")
        return cads_gamma(float(ctx.param.time), self.config.tau1, self.config.tau2)

    def active(self, ctx: StepContext) -> bool:
        return self.window.contains(ctx) and self.gamma(ctx) < 1.0

    def _randn(self, shape: torch.Size) -> Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)

    def _noised(self, cond: Any, gamma: float, noise: tuple[Tensor, Tensor] | None = None) -> tuple[Any, Any]:
        """The noised condition and the noise used (text: drawn unless ``noise`` is given)."""
        cfg = self.config

        def anneal(y: Tensor, noise: Tensor) -> Tensor:
            return cads_anneal(y, gamma, noise.to(y.device), cfg.noise_scale, cfg.psi, cfg.rescale)

        if isinstance(cond, TextCondition):
            pooled = cond.pooled
            n_seq, n_pool = noise or (self._randn(cond.embeds.shape), None if pooled is None else self._randn(pooled.shape))
            return TextCondition(anneal(cond.embeds, n_seq), None if pooled is None else anneal(pooled, n_pool),
                                 cond.mask), (n_seq, n_pool)
        if isinstance(cond, ClassCondition):
            return ClassCondition(cond.labels, _NoisedEmbedding(self._step_seed(), anneal, cond.embedding)), None
        raise TypeError(f"CADS cannot noise a condition of type {type(cond).__name__}.")

    def _step_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def condition(self, conditions: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        g = self.gamma(ctx)
        self.trace.append((ctx.index, float(ctx.param.time), g))
        out = dict(conditions)
        names = ("cond", "uncond") if self.config.apply_to == "cond+uncond" else ("cond",)
        for name in names:
            if name in out:
                out[name], noise = self._noised(out[name], g)
                # conditions derived from this one (C-ERG's weakened text "cond:...") get the SAME draw
                for derived in [k for k in out if k.startswith(name + ":")]:
                    out[derived], _ = self._noised(out[derived], g, noise)
        return out


class _NoisedEmbedding:
    """DiT label-embedding rewrite of one branch for one step: ``[b, D]`` vectors -> CADS-noised.

    The step's noise is drawn ONCE, from a seed taken from the term's generator when the step was
    planned, and reused for every block's label embedder and every forward pass of the step, so all
    branches and blocks see the same ``y_hat`` whatever the batching and evaluation order.
    """

    def __init__(self, seed: int, anneal, previous=None) -> None:
        self.seed, self.anneal, self.previous = seed, anneal, previous
        self.noise: Tensor | None = None

    def __call__(self, emb: Tensor) -> Tensor:
        if self.previous is not None:
            emb = self.previous(emb)
        if self.noise is None:
            g = torch.Generator(device="cpu").manual_seed(self.seed)
            self.noise = torch.randn(tuple(emb.shape), generator=g, dtype=torch.float32)
        if self.noise.shape != emb.shape:
            raise ValueError(f"CADS: class embeddings of shape {tuple(emb.shape)} in a step planned for "
                             f"{tuple(self.noise.shape)}.")
        return self.anneal(emb, self.noise)


__all__ = ["CADS", "CADSRuntime", "DEFAULT_SEED", "cads_anneal", "cads_gamma", "rescale_to_stats", "stream_seed"]
