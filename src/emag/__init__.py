"""emag: Exponential Moving Average Guidance (arXiv 2512.17303) for diffusion transformers on diffusers.

    import emag
    pipe = emag.StableDiffusion3EMAGPipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
    image = pipe("a photo of a cat", emag=emag.EMAG.preset("sd3-medium")).images[0]

The pipelines (which import diffusers' pipeline modules) are loaded on first use.
"""

from .config import EMAG, ResolvedEMAG
from .layers import parse_layers
from .loading import MissingWeightsError, ModelLoadError
from .presets import PRESETS, Preset, get_preset
from .guidance import APG, CADS, CFG, ERG, PAG, S2, SAG, SEG, SLG, STG, TPG, Autoguidance, CFGZeroStar
from .windows import GuiderWindow, RemainingStepsWindow, SD3ReferenceWindow, SigmaInterval, StepContext, StrictWindow, Window

__version__ = "0.1.0"

_LAZY = {
    "StableDiffusion3EMAGPipeline": ".pipelines",
    "DiTEMAGPipeline": ".pipelines",
    "dit_reference_scheduler": ".schedulers",
    "PipelineBusyError": ".pipelines._exclusive",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'emag' has no attribute {name!r}")


__all__ = [
    "APG",
    "Autoguidance",
    "CADS",
    "CFG",
    "CFGZeroStar",
    "DiTEMAGPipeline",
    "EMAG",
    "ERG",
    "PAG",
    "PRESETS",
    "PipelineBusyError",
    "Preset",
    "GuiderWindow",
    "MissingWeightsError",
    "ModelLoadError",
    "RemainingStepsWindow",
    "ResolvedEMAG",
    "S2",
    "SAG",
    "SD3ReferenceWindow",
    "StrictWindow",
    "SEG",
    "SLG",
    "STG",
    "SigmaInterval",
    "StableDiffusion3EMAGPipeline",
    "StepContext",
    "TPG",
    "Window",
    "dit_reference_scheduler",
    "get_preset",
    "parse_layers",
]
