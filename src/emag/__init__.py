"""emag: Exponential Moving Average Guidance (arXiv 2512.17303) for diffusion transformers on diffusers.

    import emag
    pipe = emag.StableDiffusion3EMAGPipeline.from_pretrained("stabilityai/stable-diffusion-3-medium-diffusers")
    image = pipe("a photo of a cat", emag=emag.EMAG.preset("sd3-medium")).images[0]

The pipelines (which import diffusers' and transformers' pipeline modules, seconds of work) and the DiT
reference scheduler are loaded on first use.
"""

import importlib

from .families import FAMILIES, ModelFamily
from .guidance import (
    APG,
    CADS,
    CFG,
    EMAG,
    ERG,
    PAG,
    S2,
    SAG,
    SEG,
    SLG,
    STG,
    TPG,
    Autoguidance,
    CFGZeroStar,
)
from .guidance.emag import PRESETS, Preset, ResolvedEMAG, get_preset
from .layers import parse_layers
from .loading import MissingWeightsError, ModelLoadError
from .plumbing.exclusive import PipelineBusyError
from .windows import (
    GuiderWindow,
    RemainingStepsWindow,
    SD3ReferenceWindow,
    SigmaInterval,
    StepContext,
    StrictWindow,
    Window,
)

__version__ = "0.1.0"

_LAZY = {
    "StableDiffusion3EMAGPipeline": ".pipelines",
    "DiTEMAGPipeline": ".pipelines",
    "FluxEMAGPipeline": ".pipelines",
    "EMAGGuider": ".pipelines",
    "PixArtSigmaEMAGPipeline": ".pipelines",
    "SanaEMAGPipeline": ".pipelines",
    "WanEMAGPipeline": ".pipelines",
    "guide": ".pipelines",
    "dit_reference_scheduler": ".schedulers",
}


def __getattr__(name: str):
    if name in _LAZY:
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
    "dit_reference_scheduler",
    "DiTEMAGPipeline",
    "FluxEMAGPipeline",
    "EMAGGuider",
    "PixArtSigmaEMAGPipeline",
    "SanaEMAGPipeline",
    "WanEMAGPipeline",
    "EMAG",
    "ERG",
    "FAMILIES",
    "get_preset",
    "guide",
    "GuiderWindow",
    "MissingWeightsError",
    "ModelFamily",
    "ModelLoadError",
    "PAG",
    "parse_layers",
    "PipelineBusyError",
    "Preset",
    "PRESETS",
    "RemainingStepsWindow",
    "ResolvedEMAG",
    "S2",
    "SAG",
    "SD3ReferenceWindow",
    "SEG",
    "SigmaInterval",
    "SLG",
    "StableDiffusion3EMAGPipeline",
    "StepContext",
    "STG",
    "StrictWindow",
    "TPG",
    "Window",
]
