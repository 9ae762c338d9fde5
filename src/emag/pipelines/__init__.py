"""diffusers pipelines with EMAG."""

from .dit import DiTEMAGPipeline
from .sd3 import StableDiffusion3EMAGPipeline

__all__ = ["DiTEMAGPipeline", "StableDiffusion3EMAGPipeline"]
