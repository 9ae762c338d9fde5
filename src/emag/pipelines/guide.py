"""``emag.guide(pipe)``: this package's pipeline for an already loaded diffusers pipeline of a supported
family, sharing its components (the family's pipeline class ``from_pipe``)."""

from __future__ import annotations

from typing import Any

from ..families import family_of
from ._guided import GuidedPipeline


def guide(pipe: Any) -> GuidedPipeline:
    """The guided pipeline of ``pipe``'s model family (``pipe`` itself if it is one already): the same
    transformer, VAE, scheduler and text encoders, no copy; calls then take ``guidance=[...]``. A pipeline
    without a transformer, or of an unsupported family, is a clear error."""
    if isinstance(pipe, GuidedPipeline):
        return pipe
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ValueError(f"{type(pipe).__name__} has no `transformer`: emag.guide takes a diffusers pipeline of a "
                         "diffusion transformer (e.g. StableDiffusion3Pipeline, DiTPipeline).")
    return family_of(transformer).pipeline_class().from_pipe(pipe)
