"""Autoguidance (Karras, Aittala, Kynkäänniemi, Lehtinen, Aila, Laine; NeurIPS 2024, arXiv 2406.02507).

Guide the main model with a SEPARATE, weaker network of the same family (smaller and / or trained for
less time) that receives the SAME condition [src: NVlabs/edm2 ``generate_images.py``]:

    D = D_w + w (D_main - D_w)

This is not "CFG with a degraded unconditional branch" (diffusers' ``AutoGuidance`` guider, which feeds
the negative embeddings to a layer-dropped copy of the main model), and a layer-dropout proxy of the main
model is not autoguidance (docs/guidance.md section 13). EDM2's presets use ``w`` 2.05-2.10 with an XS / M
weak model; the default here, 2.0, is a starting point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..families import family_of
from ..windows import StepContext
from .base import Branch, GuidanceConfig, Setup, TermRuntime, window_of
from .perturbation import WeakGuidanceRuntime, check_weak_scale

WEAK_MODEL_NAME = "weak-autoguidance"


@dataclass(frozen=True)
class Autoguidance(GuidanceConfig):
    """``D = D_w + w (D_main - D_w)`` with ``D_w`` from the separate network ``model`` on the same condition.

    Args:
        scale: ``w`` (>= 0; 1 is neutral, and no weak pass is run). Default 2.0 (EDM2 presets: 2.05-2.10).
            ``None``: the weak prediction instead replaces the unconditional prediction of the call's
            CFG-like term (``guidance=[emag.APG(...), emag.Autoguidance(None, model=weak)]``), whose scale
            applies. With a number, autoguidance is a guidance rule of its own and no unconditional pass
            is run; a CFG-like term given as well is applied on top of its result (nested, like EMAG).
        model: the weak transformer: same family and latent layout as the pipeline's (e.g. a smaller or
            shorter-trained SD3 / DiT), in eval mode, on the pipeline's device and dtype. Required.
        window: step window, default every step.
    """

    scale: float | None = 2.0
    model: Any = field(default=None, repr=False)
    window: Any = None

    def __post_init__(self) -> None:
        check_weak_scale(self.scale)
        if self.model is None:
            raise ValueError("Autoguidance needs the weak network: Autoguidance(scale, model=<weak transformer>).")
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"Autoguidance `model` must be a transformer module, got {type(self.model).__name__}.")
        family_of(self.model)  # a supported family, or a clear error
        window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        family = family_of(self.model)
        if family != setup.family:
            raise ValueError(f"Autoguidance: the weak model is a {family.label} transformer but the pipeline's is "
                             f"{setup.family.label}; use a weak model of the same family.")
        return AutoguidanceRuntime(self, window_of(self.window), setup)


class AutoguidanceRuntime(WeakGuidanceRuntime):
    def __init__(self, config: Autoguidance, window, setup: Setup) -> None:
        super().__init__(config, window, "autoguidance", WEAK_MODEL_NAME, setup)

    def extra_models(self) -> dict[str, Any]:
        return {WEAK_MODEL_NAME: self.config.model}

    def make_branch(self, ctx: StepContext) -> Branch:
        return Branch(self.branch_name, "cond", model=WEAK_MODEL_NAME)

    def describe(self) -> dict:
        m = self.config.model
        return {"method": self.name, "scale": self.config.scale, "role": self.kind,
                "weak_model": type(m).__name__, "weak_parameters": sum(p.numel() for p in m.parameters()),
                "window": self.config.window}
