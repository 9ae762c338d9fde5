"""The model-family registry: every supported transformer family, one module each.

Everything that depends on the model family asks this registry (by a transformer, a saved config, a
pipeline class name or the family's name) and reads the :class:`ModelFamily` record; adding a family is
adding one module here (plus its pipeline and tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .base import LayerDefault, ModelFamily, every_block, middle
from .dit import DIT
from .flux import FLUX
from .pixart import PIXART
from .sana import SANA
from .sd3 import SD3
from .wan import WAN

FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD3, DIT, FLUX, PIXART, SANA, WAN)}


def hub_models() -> dict[str, bool]:
    """Every hub model emag knows by name (hub id -> gated), for download commands."""
    return {m: gated for f in FAMILIES.values() for m, gated in f.hub_models.items()}


def supported() -> str:
    """For messages: the supported transformer classes."""
    return ", ".join(f.transformer_class for f in FAMILIES.values())


def family_named(name: str) -> ModelFamily:
    if isinstance(name, ModelFamily):
        return name
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family {name!r}; supported: {', '.join(FAMILIES)}.")
    return FAMILIES[name]


def family_of(transformer: nn.Module) -> ModelFamily:
    """The family of a transformer (by its class or a base class), or a clear error naming what is supported."""
    for cls in type(transformer).__mro__:
        for family in FAMILIES.values():
            if cls.__name__ == family.transformer_class:
                return family
    raise ValueError(f"EMAG does not support the model family {type(transformer).__name__} yet; supported "
                     f"transformers: {supported()}.")


def family_of_transformer_config(config: Mapping[str, Any]) -> ModelFamily | None:
    """The family whose transformer a saved ``transformer/config.json`` describes, or None."""
    return next((f for f in FAMILIES.values() if f.owns_transformer_config(config)), None)


def family_of_pipeline(class_name: str) -> ModelFamily | None:
    """The family of a pipeline class named in ``model_index.json``, or None."""
    return next((f for f in FAMILIES.values() if class_name in f.pipeline_classes), None)


__all__ = ["DIT", "FAMILIES", "FLUX", "LayerDefault", "ModelFamily", "PIXART", "SANA", "SD3", "WAN", "every_block",
           "family_named", "family_of", "family_of_pipeline", "family_of_transformer_config", "hub_models", "middle",
           "supported"]
