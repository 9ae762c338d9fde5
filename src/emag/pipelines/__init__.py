"""diffusers pipelines with EMAG."""

from .._compat import quiet_transformers_import

with quiet_transformers_import():
    from .dit import DiTEMAGPipeline
    from .flux import FluxEMAGPipeline
    from .guide import guide
    from .guider import EMAGGuider
    from .pixart import PixArtSigmaEMAGPipeline
    from .sana import SanaEMAGPipeline
    from .sd3 import StableDiffusion3EMAGPipeline
    from .wan import WanEMAGPipeline

__all__ = ["DiTEMAGPipeline", "EMAGGuider", "FluxEMAGPipeline", "StableDiffusion3EMAGPipeline", "PixArtSigmaEMAGPipeline", "SanaEMAGPipeline", "WanEMAGPipeline", "guide"]
