"""Conversions between a model's native output and the denoised estimate x0 at one step.

At a fixed ``x_t`` and noise level, eps, v and x0 are affine in each other with the SAME coefficients
for every branch, so any combination whose branch weights sum to one is identical in every space
(docs/guidance.md section 2.1); non-affine methods (APG, CFG-Zero*, rescale) depend on the space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class FlowMatching:
    """Rectified flow ``x_t = (1 - t) x0 + t eps``, model predicts ``v = eps - x0``."""

    sigma: float  # t in (0, 1]

    def to_x0(self, x_t: Tensor, v: Tensor) -> Tensor:
        return x_t - self.sigma * v

    def from_x0(self, x_t: Tensor, x0: Tensor) -> Tensor:
        return (x_t - x0) / self.sigma

    @property
    def sigma_edm(self) -> float:
        return math.inf if self.sigma >= 1.0 else self.sigma / (1.0 - self.sigma)

    @property
    def time(self) -> float:
        """Normalised model time in [0, 1] (1 = pure noise)."""
        return self.sigma


@dataclass(frozen=True)
class EpsilonVP:
    """VP/DDPM ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, model predicts eps."""

    alpha_cumprod: float
    timestep: float
    num_train_timesteps: int = 1000

    def to_x0(self, x_t: Tensor, eps: Tensor) -> Tensor:
        return (x_t - math.sqrt(1.0 - self.alpha_cumprod) * eps) / math.sqrt(self.alpha_cumprod)

    def from_x0(self, x_t: Tensor, x0: Tensor) -> Tensor:
        return (x_t - math.sqrt(self.alpha_cumprod) * x0) / math.sqrt(1.0 - self.alpha_cumprod)

    @property
    def sigma_edm(self) -> float:
        return math.sqrt((1.0 - self.alpha_cumprod) / self.alpha_cumprod)

    @property
    def time(self) -> float:
        return self.timestep / self.num_train_timesteps
