"""emag: Exponential Moving Average Guidance (arXiv 2512.17303) for diffusion transformers on diffusers.

    import emag
    pipe = emag.StableDiffusion3EMAGPipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
    image = pipe("a photo of a cat", emag=emag.EMAG.preset("sd3-medium")).images[0]
"""

from .config import EMAG, ResolvedEMAG
from .layers import parse_layers
from .pipelines import DiTEMAGPipeline, StableDiffusion3EMAGPipeline
from .presets import PRESETS, Preset, get_preset
from .schedulers import dit_reference_scheduler
from .windows import RemainingStepsWindow, SD3ReferenceWindow, StepContext, Window

__version__ = "0.1.0"

__all__ = [
    "EMAG",
    "PRESETS",
    "DiTEMAGPipeline",
    "Preset",
    "RemainingStepsWindow",
    "ResolvedEMAG",
    "SD3ReferenceWindow",
    "StableDiffusion3EMAGPipeline",
    "StepContext",
    "Window",
    "dit_reference_scheduler",
    "get_preset",
    "parse_layers",
]
