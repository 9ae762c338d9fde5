"""``emag.EMAGGuider``: this package's guidance terms as a diffusers guider for modular pipelines.

diffusers' modular pipelines (SD3, Wan, ...) call a guider around their denoiser: ``prepare_inputs``
splits the step's inputs into one batch per prediction the guider needs, ``prepare_models`` /
``cleanup_models`` surround the denoiser's call on each batch, and the guider combines the predictions.
EMAG's passes depend on each other within a step (the normal pass feeds the EMA the perturbed pass reads;
suffix passes resume from the normal pass's hidden states), so this guider asks for ONE prediction per
step and, for that call, runs this package's engine in place of the denoiser's forward: the same passes
and numbers as this package's pipelines on the same inputs (tested against them). The unconditional
inputs the pipeline prepared (its negative prompt) are the ``uncond`` branch.

The model time of a step gives the flow-matching noise level ``sigma = t / 1000`` (diffusers' flow
schedulers' ``timesteps``); only flow-matching families are supported.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from ..engine import GuidanceEngine
from ..families import family_of
from ..guidance.base import Setup
from ..guidance.call import given_terms, guided_channels_of, make_runtimes, uses_uncond, with_defaults
from ..parametrization import FlowMatching
from ..plumbing.conditions import TextCondition
from ..plumbing.edits import EditScope
from ..windows import StepContext


class EMAGGuider(BaseGuidance):
    """A diffusers guider running ``guidance`` (a list of this package's terms, e.g. ``[emag.CFG(7.0),
    emag.EMAG()]``) in a modular pipeline: ``pipe.update_components(guider=emag.EMAGGuider([...]))``.
    ``batching``, ``fast`` and ``combine_space`` as in this package's pipelines. After a call,
    ``guider.emag_trace`` lists what EMAG did at each step."""

    _input_predictions = ["pred_cond"]

    @register_to_config
    def __init__(self, guidance: Sequence[Any], batching: str = "normal", fast: bool = True,
                 combine_space: str = "auto") -> None:
        super().__init__()
        self.terms = given_terms(list(guidance), None)
        if not self.terms:
            raise ValueError("EMAGGuider needs at least one guidance term, e.g. [emag.CFG(7.0), emag.EMAG()].")
        self.batching, self.fast, self.combine_space = batching, fast, combine_space
        self._engine: GuidanceEngine | None = None
        self._inputs: dict[str, tuple[Any, Any]] = {}
        self.emag_trace = None

    def new(self, **changes: Any) -> "EMAGGuider":
        options = dict(guidance=self.terms, batching=self.batching, fast=self.fast, combine_space=self.combine_space)
        return EMAGGuider(**{**options, **changes})

    # -- the guider protocol -------------------------------------------------------------------------
    @property
    def num_conditions(self) -> int:
        return 1

    @property
    def is_conditional(self) -> bool:
        return True

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0:  # a new pipeline call: new runtimes (EMA state, windows)
            self._engine = None

    def prepare_inputs(self, data: dict[str, Any]) -> list:
        self._inputs = {k: v if isinstance(v, tuple) else (v, None) for k, v in data.items()}
        return [self._prepare_batch(data, 0, "pred_cond")]

    def prepare_inputs_from_block_state(self, data, input_fields: dict[str, str | tuple[str, str]]) -> list:
        def field(name):
            return None if name is None else getattr(data, name, None)

        self._inputs = {k: (field(v[0]), field(v[1])) if isinstance(v, tuple) else (field(v), None)
                        for k, v in input_fields.items()}
        return [self._prepare_batch_from_block_state(input_fields, data, 0, "pred_cond")]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """The denoiser's next call (this step's one prediction) runs the guided engine instead; the
        replacement removes itself when called (and in :meth:`cleanup_models`)."""
        super().prepare_models(denoiser)

        def guided_forward(*args: Any, **kwargs: Any):
            vars(denoiser).pop("forward", None)
            return self._guided(denoiser, kwargs)

        denoiser.forward = guided_forward

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        vars(denoiser).pop("forward", None)

    def forward(self, pred_cond: torch.Tensor) -> GuiderOutput:
        return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=None)

    # -- the engine ----------------------------------------------------------------------------------
    def _conditions(self, family) -> dict[str, TextCondition]:
        if not family.guider_inputs:
            raise ValueError(f"EMAGGuider has no input mapping for {family.label} models (its modular pipeline's "
                             "guider fields are not known to this package).")
        missing = [f for f in family.guider_inputs.values() if self._inputs.get(f, (None,))[0] is None]
        if missing:
            raise ValueError(f"The modular pipeline gave the guider no {missing}; expected the fields "
                             f"{sorted(family.guider_inputs.values())}.")
        out = {"cond": TextCondition(**{k: self._inputs[f][0] for k, f in family.guider_inputs.items()})}
        if all(self._inputs[f][1] is not None for f in family.guider_inputs.values()):
            out["uncond"] = TextCondition(**{k: self._inputs[f][1] for k, f in family.guider_inputs.items()})
        return out

    def _build(self, denoiser: torch.nn.Module, x: torch.Tensor, conditions: dict, options: dict) -> GuidanceEngine:
        family = family_of(denoiser)
        if family.prediction != "flow":
            raise ValueError(f"EMAGGuider supports flow-matching models; {family.label} predicts {family.prediction}.")
        terms = with_defaults(self.terms, family, None)
        setup = Setup(family=family, num_blocks=family.num_blocks(denoiser), num_steps=self._num_inference_steps,
                      batch_size=x.shape[0], device=x.device, dtype=denoiser.dtype,
                      uses_uncond=uses_uncond(terms, family, 1.0), fast=self.fast,
                      block_counts=family.block_counts(denoiser))
        if setup.uses_uncond and "uncond" not in conditions:
            raise ValueError("A guidance term uses the unconditional prediction but the modular pipeline prepared no "
                             "negative condition: give it negative prompt embeddings (diffusers' modular pipelines "
                             "skip the unconditional inputs otherwise).")
        runtimes = make_runtimes(terms, setup, None, denoiser)
        backbone = family.backbone_of(denoiser, **options)
        att = set().union(*[r.attention_layers() for r in runtimes])
        blk = set().union(*[r.block_layers() for r in runtimes])
        engine = GuidanceEngine(runtimes, {"main": backbone}, conditions, EditScope(denoiser, family, att, blk),
                                backbone.channels, guided_channels_of(terms, family, backbone.channels),
                                self.batching, setup.uses_uncond, combine_space=self.combine_space)
        self._runtimes = runtimes
        return engine

    def _guided(self, denoiser: torch.nn.Module, kwargs: dict[str, Any]):
        x, t = kwargs["hidden_states"], self._timestep
        family = family_of(denoiser)
        if self._engine is None:  # the call's first step: the engine, with the backbone options it takes
            options = {k: kwargs[k] for k in self._backbone_options(family) if kwargs.get(k) is not None}
            self._engine = self._build(denoiser, x, self._conditions(family), options)
        else:
            self._engine.conditions.update(self._conditions(family))
        param = FlowMatching(float(t) / 1000.0)
        ctx = StepContext(self._step, self._num_inference_steps, float(t), param.sigma_edm, param)
        with torch.no_grad(), self._engine.installed():
            out = self._engine.predict(x, t if torch.is_tensor(t) else torch.tensor(t), ctx)
        self.emag_trace = next((r.trace for r in self._runtimes if r.name == "emag"), None)
        return (out,) if not kwargs.get("return_dict", True) else _Output(out)

    @staticmethod
    def _backbone_options(family) -> list[str]:
        """The denoiser-call arguments the family's backbone takes (e.g. SD3's ``joint_attention_kwargs``)."""
        params = inspect.signature(family.backbone_class().__init__).parameters
        return [p for p in params if p not in ("self", "transformer")]


class _Output(tuple):
    """``Transformer2DModelOutput``-like: ``.sample`` and ``[0]``."""

    def __new__(cls, sample: torch.Tensor):
        obj = super().__new__(cls, (sample,))
        obj.sample = sample
        return obj
