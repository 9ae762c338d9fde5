"""The part every guided pipeline of this package shares: loading, the call's guidance terms, their
runtimes checked against the model and the schedule, the engine, and the per-thread results.

A family's pipeline (:mod:`.sd3`, :mod:`.dit`) prepares its inputs (conditions, latents, schedule) and
runs its sampler loop; everything about guidance it asks :class:`GuidedPipeline` and
:mod:`emag.guidance.call`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..engine import GuidanceEngine
from ..families import ModelFamily
from ..guidance.base import GuidanceConfig, Setup, TermRuntime
from ..guidance.call import guided_channels_of, make_runtimes, uses_uncond
from ..loading import from_pretrained_checked
from ..plumbing.edits import EditScope
from ..inputs import check_count, check_guidance_scale, check_options
from ..parametrization import EpsilonVP, FlowMatching
from ..plumbing.exclusive import PerThread
from ..windows import StepContext

# a guided pipeline's own call arguments; the others are the base diffusers pipeline's
OWN_ARGUMENTS = ("emag", "guidance", "batching", "fast", "combine_space", "on_step_outputs")


def base_arguments(call_locals: dict[str, Any]) -> dict[str, Any]:
    """The base pipeline's arguments of a call, from the call's ``locals()``."""
    return {k: v for k, v in call_locals.items() if k not in (*OWN_ARGUMENTS, "self", "__class__", "kwargs")}


def flow_contexts(scheduler: Any, timesteps) -> list[StepContext]:
    """Each step's position and flow-matching noise level (the scheduler's sigma) for the terms."""
    contexts = []
    for i, t in enumerate(timesteps):
        param = FlowMatching(float(scheduler.sigmas[i]))
        contexts.append(StepContext(i, len(timesteps), float(t), param.sigma_edm, param))
    return contexts


def vp_contexts(scheduler: Any, timesteps) -> list[StepContext]:
    """Each step's position and noise level (from the scheduler's cumulative alphas) for the terms."""
    alphas = scheduler.alphas_cumprod
    num_train = int(scheduler.config.get("num_train_timesteps", 1000))
    contexts = []
    for i, t in enumerate(timesteps):
        param = EpsilonVP(float(alphas[int(t)]), float(t), num_train)
        contexts.append(StepContext(i, len(timesteps), float(t), param.sigma_edm, param))
    return contexts


class GuidedPipeline:
    """Mixin of this package's diffusers pipelines (before the diffusers class in the bases)."""

    family: ModelFamily
    # what the calling thread's last call did (per thread: concurrent calls never see each other's)
    emag_trace = PerThread()
    guidance_runtimes = PerThread()
    guidance_engine = PerThread()

    def _begin_call(self, *, guided: bool, on_step_outputs, batching, combine_space, fast, guidance_scale=None,
                    counts: dict[str, tuple[Any, str]] | None = None) -> None:
        """The checks every guided pipeline makes before any work: scales, counts, this package's options;
        ``on_step_outputs`` observes the engine, so it needs guidance terms."""
        self.emag_trace = None
        if guidance_scale is not None:
            check_guidance_scale(guidance_scale)
        for name, (value, what) in (counts or {}).items():
            check_count(name, value, what)
        check_options(batching, combine_space, fast)
        if not guided and on_step_outputs is not None:
            raise ValueError("on_step_outputs observes the guidance engine: give guidance=[...] (e.g. "
                             "[emag.CFG(5.0)] for plain CFG).")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' ``from_pretrained`` (hub id or local folder) with clear errors: a local folder is
        checked first (a pipeline of this family, every listed component present, weights readable;
        components saved as None are passed as None); a missing folder, or a hub id whose weights are not
        available, raises :class:`emag.MissingWeightsError` with the download command."""
        return from_pretrained_checked(cls, super().from_pretrained, pretrained_model_name_or_path, cls.family, kwargs)

    def _guided_setup(self, terms: Sequence[GuidanceConfig], guidance_scale: float, *, num_steps: int,
                      batch_size: int, device: Any, fast: bool) -> Setup:
        """What the terms' runtimes may know about the call."""
        tr = self.transformer
        return Setup(family=self.family, num_blocks=self.family.num_blocks(tr), num_steps=num_steps,
                     batch_size=batch_size, device=device, dtype=tr.dtype,
                     uses_uncond=uses_uncond(terms, self.family, guidance_scale), fast=fast,
                     block_counts=self.family.block_counts(tr))

    def _guided_runtimes(self, terms: Sequence[GuidanceConfig], setup: Setup,
                         contexts: Sequence[StepContext]) -> list[TermRuntime]:
        """The terms' runtimes, every term checked against the model and the schedule (before any pass)."""
        return make_runtimes(terms, setup, contexts, self.transformer)

    def _guided_engine(self, terms: Sequence[GuidanceConfig], runtimes: list[TermRuntime], conditions: dict,
                       setup: Setup, batching: str, combine_space: str, observer=None,
                       **backbone_options: Any) -> GuidanceEngine:
        """The engine of one call: the family's backbone around the transformer (and each term's separate
        model), the interception of the blocks the terms edit. ``combine_space``: ``"auto"`` combines in
        x0 space only when an active term asks for it, ``"x0"`` always does. ``observer(step, guided)``
        (a call's ``on_step_outputs``) sees each step's branch predictions and guided prediction."""
        family, tr = self.family, self.transformer
        backbones = {"main": family.backbone_of(tr, **backbone_options)}
        for r in runtimes:
            for name, model in r.extra_models().items():
                if name in backbones:
                    raise ValueError(f"Two guidance terms use the model name {name!r}.")
                backbones[name] = family.backbone_of(model, **backbone_options)
        att = set().union(*[r.attention_layers() for r in runtimes]) if runtimes else set()
        blk = set().union(*[r.block_layers() for r in runtimes]) if runtimes else set()
        channels = backbones["main"].channels  # the noise (velocity) channels; DiT predicts a variance after them
        engine = GuidanceEngine(runtimes, backbones, conditions, EditScope(tr, family, att, blk), channels,
                                guided_channels_of(terms, family, channels), batching, setup.uses_uncond,
                                combine_space=combine_space, observer=observer)
        self.guidance_engine = engine
        return engine

    def decode_latents(self, latents):
        """Images ``[B, C, H, W]`` in [0, 1] from latents (or x0 predictions) of this pipeline's model."""
        raise NotImplementedError

    def _record(self, runtimes: list[TermRuntime]) -> None:
        """After the call: the runtimes, and EMAG's per-step trace (``pipe.emag_trace``)."""
        self.guidance_runtimes = runtimes
        self.emag_trace = next((r.trace for r in runtimes if r.name == "emag"), None)
