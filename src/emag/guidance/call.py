"""What a call needs, decided in one place from its guidance terms' declarations.

The pipelines, the command line's plan (:mod:`emag.generate`) and the engine ask these functions; the
terms only declare (:class:`~emag.guidance.base.GuidanceConfig`): whether they can use the unconditional
condition, which text conditions and latent channels, which call settings their published numbers
used, whether they come with CFG when given through a pipeline's legacy ``emag=`` argument.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..families import ModelFamily
from ..windows import StepContext
from .base import GuidanceConfig, Setup, TermRuntime
from .cfg import CFG
from .emag import EMAG


def given_terms(guidance: Sequence[Any] | None, emag: Any) -> list[GuidanceConfig]:
    """The terms a pipeline call names (``guidance=[...]`` or the legacy ``emag=``), checked."""
    if guidance is not None:
        if emag is not None:
            raise ValueError("Pass EMAG either as `emag=` or inside `guidance=[...]`, not both.")
        if isinstance(guidance, (str, bytes)) or not isinstance(guidance, Sequence):
            raise TypeError("`guidance` must be a list of guidance terms, e.g. [emag.CFG(7.0), emag.EMAG()].")
        terms = list(guidance)
    elif emag is not None:
        if not isinstance(emag, EMAG):
            raise TypeError(f"`emag` must be an emag.EMAG instance or None, got {type(emag).__name__}.")
        terms = [emag]
    else:
        terms = []
    for t in terms:
        if not isinstance(t, GuidanceConfig):
            raise TypeError(f"{t!r} is not a guidance term (expected e.g. emag.CFG, emag.EMAG, emag.PAG).")
    return terms


def terms_of_call(guidance: Sequence[Any] | None, emag: Any, guidance_scale: float,
                  family: ModelFamily) -> list[GuidanceConfig]:
    """The guidance terms of a pipeline call, with their defaults resolved: ``guidance=[...]`` as given, or
    the legacy arguments: ``CFG(guidance_scale)`` where diffusers' convention has CFG on
    (``guidance_scale > 1``), and ``emag`` with the CFG it pairs with (:func:`with_paired_cfg`)."""
    guidance_scale = float(guidance_scale)
    terms = given_terms(guidance, emag)
    if emag is not None:
        terms = with_paired_cfg(terms, guidance_scale, family)
    elif guidance is None and guidance_scale > 1:
        terms = [CFG(guidance_scale)]
    return with_defaults(terms, family, guidance_scale)


def with_paired_cfg(terms: list[GuidanceConfig], cfg_scale: float, family: ModelFamily) -> list[GuidanceConfig]:
    """``terms`` with ``CFG(cfg_scale)`` in front when one of them pairs with CFG (EMAG but ``emag_only``:
    the paper's pairing) and none is a CFG-like term already."""
    if not any(t.is_base for t in terms) and any(t.pairs_with_cfg(family, cfg_scale) for t in terms):
        return [CFG(cfg_scale), *terms]
    return list(terms)


def with_defaults(terms: Sequence[GuidanceConfig], family: ModelFamily, guidance_scale: float | None) -> list:
    """The terms with their call- and family-dependent defaults written in (``CFG(scale=None)`` takes the
    call's ``guidance_scale``; APG's family defaults), so that what runs is what the metadata records."""
    return [t.with_defaults(family, guidance_scale) for t in terms]


def call_defaults(terms: Sequence[GuidanceConfig], family: ModelFamily) -> dict[str, Any]:
    """The call settings the terms' published numbers used (the first term that says wins)."""
    out: dict[str, Any] = {}
    for t in terms:
        for key, value in t.call_defaults(family).items():
            out.setdefault(key, value)
    return out


def uses_uncond(terms: Sequence[GuidanceConfig], family: ModelFamily, guidance_scale: float) -> bool:
    """Whether the call prepares the unconditional (negative) condition: some term can use it."""
    return any(t.uses_uncond(family, guidance_scale) for t in terms)


def text_weakenings(terms: Sequence[GuidanceConfig]) -> list:
    """The weakened text conditions the terms' branches use (C-ERG), without duplicates."""
    seen = {}
    for t in terms:
        for w in t.text_conditions():
            seen.setdefault(w.name, w)
    return list(seen.values())


def guided_channels_of(terms: Sequence[GuidanceConfig], family: ModelFamily, channels: int) -> int:
    """How many latent channels the guided prediction replaces (the rest come from the conditional one):
    an explicit ``guided_channels`` of any term wins; otherwise a term's family convention (EMAG on a
    4-channel DiT: the first 3, as the original DiT sampler the paper's DiT numbers were made with);
    otherwise every channel."""
    values = {t.guided_channels for t in terms if getattr(t, "guided_channels", None) is not None}
    if len(values) > 1:
        raise ValueError(f"Guidance terms disagree on guided_channels: {sorted(values)}.")
    if not values:
        values = {n for t in terms if (n := t.default_guided_channels(family, channels)) is not None}
    n = values.pop() if values else channels
    if n > channels:
        raise ValueError(f"guided_channels={n} exceeds the model's {channels} latent channels.")
    return n


def noise_layout(terms: Sequence[GuidanceConfig], legacy_cfg: bool) -> str:
    """The sampler's row layout: ``"doubled"`` (``[x ; x]``, the original DiT CFG sampler and diffusers'
    DiTPipeline) when a term's reference used it or for a legacy CFG call (``legacy_cfg``), else
    ``"samples"`` (only the B samples)."""
    doubled = legacy_cfg or any(t.noise_layout() == "doubled" for t in terms)
    return "doubled" if doubled else "samples"


# -- runtimes ------------------------------------------------------------------------------------------

def make_runtimes(terms: Sequence[GuidanceConfig], setup: Setup, contexts: Sequence[StepContext] | None = None,
                  transformer: Any = None) -> list[TermRuntime]:
    """The terms' per-call runtimes, checked before any model pass: at most one CFG-like term, no term
    twice (:func:`check_distinct`); with the call's step ``contexts``, a term whose window selects no step
    of the schedule is an error (it would silently never act); with the pipeline's ``transformer``, a
    separate model (autoguidance's weak one) must take the same inputs."""
    for t in terms:
        why = setup.family.undefined_methods.get(type(t).__name__.lower())
        if why:
            raise ValueError(f"{type(t).__name__} is not defined on {setup.family.label}: {why}")
    runtimes = [t.runtime(setup) for t in terms]
    check_distinct(runtimes)
    check_defined(runtimes, setup)
    if transformer is not None:
        check_extra_models(runtimes, transformer)
    for r in runtimes if contexts else []:
        window = getattr(r, "window", None)
        if window is None:
            continue
        if not any(window.contains(c) or r.zero_output(c) for c in contexts):
            describe = getattr(window, "describe", None)
            shown = describe() if callable(describe) else repr(window)
            raise ValueError(f"The window of {type(r.config).__name__} ({shown}) selects no step of this "
                             f"{len(contexts)}-step schedule: the term would never act. Widen the window or "
                             "drop the term.")
    return runtimes


def check_defined(runtimes: Sequence[TermRuntime], setup: Setup) -> None:
    """An attention edit that needs the softmax attention map on a block whose attention is linear is an
    error before any pass (terms the family does not define at all are refused before their runtimes)."""
    family = setup.family
    for r in runtimes:
        linear = sorted(l for l in r.attention_layers() if family.attention_kind(l, setup.counts) == "linear")
        if linear and not r.queries_only:
            where = ", ".join(family.address(l, setup.counts) for l in linear)
            variant = getattr(r.config, "variant", None) or getattr(r.config, "mode", None)
            what = type(r.config).__name__ + (f" ({variant!r})" if variant else "")
            raise ValueError(f"{what} reads or replaces the softmax attention map, which block(s) "
                             f"{where} of {family.label} do not have: their self-attention is linear (no attention "
                             "map exists). Defined there: edits of the queries (EMAG(variant='q'), SEG) and whole-"
                             "block methods (SLG, STG residual, S2, TPG).")


def check_distinct(runtimes: Sequence[TermRuntime]) -> None:
    """At most one CFG-like base term, and no term type given twice where the two would evaluate the same
    extra branch (two EMAGs, two PAGs on the same layers, ...)."""
    bases = [r.name for r in runtimes if r.kind == "base"]
    if len(bases) > 1:
        raise ValueError(f"At most one CFG-like base term per call, got {bases}: give one of CFG, APG, CFG-Zero*.")
    seen: dict[str, TermRuntime] = {}
    for r in runtimes:
        key = r.branch_key()
        if key is None:
            continue
        if key in seen:
            cls = type(r.config).__name__
            layered = getattr(r, "layers", None) is not None and ":" in key
            raise ValueError(f"emag.{cls} is given twice in `guidance` ({seen[key].config!r} and {r.config!r}): both "
                             f"would evaluate the same extra branch {key!r}. Give each guidance term once"
                             + (f" (two {cls} terms need different `layers`)." if layered else "."))
        seen[key] = r


# config entries a separate model must share with the pipeline's transformer to take its inputs
LAYOUT_KEYS = ("in_channels", "out_channels", "patch_size", "joint_attention_dim", "pooled_projection_dim",
               "num_embeds_ada_norm")


def check_extra_models(runtimes: Sequence[TermRuntime], transformer: Any) -> None:
    """A term's separate model has the pipeline transformer's latent layout, condition sizes, device and
    dtype (otherwise its first pass fails with a shape error)."""
    main = transformer.config
    for r in runtimes:
        for model in r.extra_models().values():
            cfg = getattr(model, "config", None) or {}
            bad = [f"{k}={cfg.get(k)} (the pipeline's: {main.get(k)})" for k in LAYOUT_KEYS
                   if cfg.get(k) is not None and main.get(k) is not None and cfg.get(k) != main.get(k)]
            param = next(iter(model.parameters()), None)
            if param is not None and (param.device != transformer.device or param.dtype != transformer.dtype):
                bad.append(f"on {param.device} in {param.dtype} (the pipeline's: {transformer.device}, "
                           f"{transformer.dtype})")
            if bad:
                raise ValueError(f"{type(r.config).__name__}: the separate `model` does not take the pipeline's inputs: "
                                 f"{'; '.join(bad)}. It needs the same latent channels, patch size and condition "
                                 "sizes, on the pipeline's device and dtype.")


# -- one step ------------------------------------------------------------------------------------------

def step_needs_uncond(active: Sequence[TermRuntime], ctx: StepContext) -> bool:
    """Whether this step runs the unconditional branch: a term needs it, or the CFG-like term does and no
    term supplies its own unconditional prediction (ERG, autoguidance)."""
    replaced = any(r.kind == "uncond" for r in active)
    return any(r.needs_uncond(ctx) for r in active) or (
        not replaced and any(r.kind == "base" and r.base_needs_uncond(ctx) for r in active))
