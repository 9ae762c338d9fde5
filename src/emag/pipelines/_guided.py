"""Shared pipeline plumbing: turning the call's arguments into guidance terms and an engine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import EMAG
from ..engine import GuidanceEngine
from ..guidance.base import Setup, TermRuntime
from ..guidance.cfg import CFG
from ..plumbing.architectures import Architecture
from ..plumbing.edits import EditScope


def with_defaults(terms: Sequence[Any], family: str, guidance_scale: float | None) -> list[Any]:
    """The terms with their call- and backbone-dependent defaults written in (``CFG(scale=None)`` takes the
    call's ``guidance_scale``; APG's per-backbone scale and threshold), so that what runs is what the
    metadata records."""
    return [t.with_defaults(family, guidance_scale) if hasattr(t, "with_defaults") else t for t in terms]


def build_terms(guidance: Sequence[Any] | None, emag: EMAG | None, guidance_scale: float,
                family: str) -> list[Any]:
    """The guidance terms of a call: ``guidance=[...]`` as given, or the legacy ``guidance_scale`` / ``emag``,
    with their defaults resolved (:func:`with_defaults`). ``guidance_scale`` was checked by the pipeline
    (a finite number >= 0, numpy scalars included)."""
    guidance_scale = float(guidance_scale)
    if guidance is not None:
        if emag is not None:
            raise ValueError("Pass EMAG either as `emag=` or inside `guidance=[...]`, not both.")
        if isinstance(guidance, (str, bytes)) or not isinstance(guidance, Sequence):
            raise TypeError("`guidance` must be a list of guidance terms, e.g. [emag.CFG(7.0), emag.EMAG()].")
        terms = list(guidance)
    else:
        if emag is not None and not isinstance(emag, EMAG):
            raise TypeError(f"`emag` must be an emag.EMAG instance or None, got {type(emag).__name__}.")
        terms = []
        # diffusers' convention: guidance_scale <= 1 means no CFG. The DiT EMAG reference instead always
        # applies eps = u + w (eps' - u) (emag.md 5.2, its fixed 1.5 exposed as w), so w < 1 there is CFG(w)
        dit_formula = family == "dit" and emag is not None and emag.combination != "emag_only"
        if (guidance_scale > 1 or (dit_formula and guidance_scale != 1)) and (
                emag is None or emag.combination != "emag_only"):
            terms.append(CFG(guidance_scale))
        if emag is not None:
            terms.append(emag)
    for t in terms:
        if not hasattr(t, "runtime"):
            raise TypeError(f"{t!r} is not a guidance term (expected e.g. emag.CFG, emag.EMAG, emag.PAG).")
    return with_defaults(terms, family, guidance_scale)


def uses_uncond(terms: Sequence[Any]) -> bool:
    """Whether any term can need the unconditional prediction (so negative conditions are prepared)."""
    from ..guidance import needs_negative

    return any(needs_negative(t) for t in terms)


def text_weakenings(terms: Sequence[Any]) -> list:
    """The weakened text conditions the terms' branches use (C-ERG), without duplicates."""
    seen = {}
    for t in terms:
        fn = getattr(t, "text_conditions", None)
        for w in (fn() if callable(fn) else []):
            seen.setdefault(w.name, w)
    return list(seen.values())


def guided_channels_of(terms: Sequence[Any], channels: int, family: str = "sd3") -> int:
    """How many latent channels the guided prediction replaces (the rest come from the conditional one).

    An explicit ``guided_channels`` of any term wins; otherwise EMAG on a 4-channel DiT guides the first
    3 (the original DiT sampler's convention the published DiT numbers were made with, emag.md 5.2),
    and everything else guides all channels (diffusers' DiT pipeline).
    """
    values = {t.guided_channels for t in terms if getattr(t, "guided_channels", None) is not None}
    if len(values) > 1:
        raise ValueError(f"Guidance terms disagree on guided_channels: {sorted(values)}.")
    if not values and family == "dit" and channels == 4 and any(isinstance(t, EMAG) for t in terms):
        values = {3}
    n = values.pop() if values else channels
    if n > channels:
        raise ValueError(f"guided_channels={n} exceeds the model's {channels} latent channels.")
    return n


def make_runtimes(terms: Sequence[Any], setup: Setup, contexts: Sequence[Any] | None = None,
                  transformer: Any = None) -> list[TermRuntime]:
    """The terms' per-call runtimes; with the call's step ``contexts``, a term whose window selects no step
    of the schedule is an error (it would silently never act); with the pipeline's ``transformer``, a
    separate model (autoguidance's weak one) must take the same inputs."""
    runtimes = [t.runtime(setup) for t in terms]
    check_distinct(runtimes)
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


def check_distinct(runtimes: Sequence[TermRuntime]) -> None:
    """Before any model pass: at most one CFG-like base term, and no term type given twice where the two
    would evaluate the same extra branch (two EMAGs, two PAGs on the same layers, ...)."""
    bases = [r.name for r in runtimes if r.kind == "base"]
    if len(bases) > 1:
        raise ValueError(f"At most one CFG-like base term per call, got {bases}: give one of CFG, APG, CFG-Zero*.")
    seen: dict[str, TermRuntime] = {}
    for r in runtimes:
        key = getattr(r, "branch_name", None) or ("emag" if getattr(r, "name", None) == "emag" else None)
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
    """Before any model pass: a term's separate model has the pipeline transformer's latent layout,
    condition sizes, device and dtype (otherwise its first pass fails with a shape error)."""
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


def make_engine(runtimes: list[TermRuntime], backbone_of, conditions: dict, transformer, arch: Architecture,
                channels: int, guided_channels: int, batching: str, has_uncond: bool,
                combine_space: str = "auto") -> GuidanceEngine:
    """``backbone_of(transformer)`` wraps a network in the pipeline's backbone adapter. ``combine_space``:
    ``"auto"`` combines in x0 space only when an active term asks for it, ``"x0"`` always does."""
    backbones = {"main": backbone_of(transformer)}
    for r in runtimes:
        for name, model in r.extra_models().items():
            if name in backbones:
                raise ValueError(f"Two guidance terms use the model name {name!r}.")
            backbones[name] = backbone_of(model)
    att = set().union(*[r.attention_layers() for r in runtimes]) if runtimes else set()
    blk = set().union(*[r.block_layers() for r in runtimes]) if runtimes else set()
    scope = EditScope(transformer, arch, att, blk)
    return GuidanceEngine(runtimes, backbones, conditions, scope, channels, guided_channels, batching, has_uncond,
                          combine_space=combine_space)


def emag_trace_of(runtimes: list[TermRuntime]) -> list | None:
    for r in runtimes:
        if getattr(r, "name", None) == "emag":
            return r.trace
    return None
