"""Samplers of the paper, expressed with diffusers schedulers."""

from __future__ import annotations

import math

from diffusers import DDPMScheduler


def dit_reference_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The DiT paper's sampler: ancestral DDPM with learned-range variance, respaced like the original.

    ``DDPMScheduler(linear betas 1e-4..0.02, variance_type="learned_range", clip_sample=False,
    timestep_spacing="linspace")`` with 250 inference steps gives the original respaced schedule's
    timesteps (999, 995, ..., 0) and variances (docs/method.md section 7.2). Pass the generator to the pipeline so
    that the same noise is drawn for the same seed and batch shape.
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
        prediction_type="epsilon",
    )


def vp_sigma_edm(alpha_cumprod: float) -> float:
    """EDM-equivalent noise level of a VP/DDPM timestep: ``sqrt((1 - abar) / abar)``."""
    return math.sqrt((1.0 - alpha_cumprod) / alpha_cumprod)
