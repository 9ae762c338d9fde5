"""Every guidance method by name: its config class, paper, cost and where it acts.

Used by the CLI (``emag generate --method cfg,pag --param pag.scale=3``) and ``emag methods``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from ..layers import parse_layers
from .apg import APG
from .autoguidance import Autoguidance
from .cads import CADS
from .cfg import CFG, CFGZeroStar
from .emag import EMAG
from .erg import ERG
from .pag import PAG
from .s2 import S2
from .sag import SAG
from .seg import SEG
from .slg import SLG, STG
from .tpg import TPG


@dataclass(frozen=True)
class MethodInfo:
    name: str
    config: type
    paper: str
    passes: str  # extra forward passes per step, with CFG as the baseline of 2
    acts_on: str
    kind: str

    @property
    def cls(self) -> str:
        return self.config.__name__

    def config_class(self) -> type:
        return self.config


METHODS: dict[str, MethodInfo] = {m.name: m for m in [
    MethodInfo("cfg", CFG, "Ho & Salimans 2022 (classifier-free guidance); interval: Kynkäänniemi et al. "
               "2024 arXiv 2404.07724; rescale: Lin et al. WACV 2024", "+1 (uncond; skipped outside the interval)",
               "the condition", "base"),
    MethodInfo("cfg-zero-star", CFGZeroStar, "Fan et al. 2025, arXiv 2503.18886 (flow models only)",
               "+1 (uncond)", "the condition; optimised uncond scale, zeroed first steps", "base"),
    MethodInfo("apg", APG, "Sadat, Hilliges, Weber, ICLR 2025, arXiv 2410.02416", "+1 (uncond)",
               "the CFG update: momentum, norm clamp, projection in x0 space", "base"),
    MethodInfo("cads", CADS, "Sadat et al., ICLR 2024, arXiv 2310.17347", "0",
               "the conditioning (text or class embeddings), annealed noise", "condition"),
    MethodInfo("emag", EMAG, "Yadav, Huy, Liu, ECCV 2026, arXiv 2512.17303",
               "+1 inside its windows", "attention map (or queries) of one middle block replaced by its EMA over steps",
               "refine / additive"),
    MethodInfo("pag", PAG, "Ahn et al., ECCV 2024, arXiv 2403.17377", "+1",
               "self-attention map -> identity (image->image on MMDiT)", "additive"),
    MethodInfo("seg", SEG, "Hong, NeurIPS 2024, arXiv 2408.00760", "+1",
               "image queries blurred on the token grid", "additive"),
    MethodInfo("sag", SAG, "Hong et al., ICCV 2023, arXiv 2210.00939", "+1 (sequential)",
               "input: x0 blurred where attention concentrates, re-noised", "additive"),
    MethodInfo("erg", ERG, "Ifriqi et al., NeurIPS 2025, arXiv 2504.13987", "+1 (replaces uncond)",
               "attention temperature (queries scaled); C-ERG: text-encoder queries (text_tau)", "uncond"),
    MethodInfo("s2", S2, "Chen et al., ICLR 2026, arXiv 2508.12880", "+1",
               "random blocks dropped, new mask per step", "additive"),
    MethodInfo("slg", SLG, "Stability AI SD3.5 reference (skip-layer guidance)", "+1 inside its window",
               "whole blocks skipped", "additive"),
    MethodInfo("stg", STG, "Hyung et al., arXiv 2411.18664", "+1",
               "whole blocks (STG-R) or attention maps (STG-A) skipped", "additive"),
    MethodInfo("autoguidance", Autoguidance, "Karras et al., NeurIPS 2024, arXiv 2406.02507",
               "+1 on a separate weak model", "a smaller / less-trained network of the same family", "uncond"),
    MethodInfo("tpg", TPG, "Rajabi et al., NeurIPS 2025, arXiv 2506.10036", "+1",
               "input tokens of blocks randomly permuted", "additive"),
]}


def get_method(name: str) -> MethodInfo:
    key = name.strip().lower().replace("_", "-")
    if key not in METHODS:
        raise ValueError(f"Unknown guidance method {name!r}; available: {', '.join(METHODS)}.")
    return METHODS[key]


def parameters(info: MethodInfo) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(info.config_class()) if not f.name.startswith("_") and f.name != "preset_name"]


def _convert(cls: type, field: dataclasses.Field, text: str) -> Any:
    """Turn a command-line string into a value for ``field`` of ``cls``."""
    name = field.name
    hints = typing.get_type_hints(cls)
    hint = str(hints.get(name, ""))
    if text.lower() in ("none", "null"):
        return None
    if name in ("layers",):
        return parse_layers(text)
    if name in ("window", "ema_window", "apply_window", "interval", "text_depth"):
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        if len(parts) != 2:
            raise ValueError(f"{name} expects two numbers START,STOP, got {text!r}.")
        return (float(parts[0]), float(parts[1]))
    if name == "text_encoders":  # e.g. clip_l+clip_g
        return tuple(p.strip() for p in text.replace(",", "+").split("+") if p.strip())
    default = field.default if field.default is not dataclasses.MISSING else None
    if isinstance(default, bool) or "bool" in hint:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} expects true/false, got {text!r}.")
    if isinstance(default, int) and not isinstance(default, bool) or hint.startswith("int"):
        try:
            return int(text)
        except ValueError:
            return float(text)
    if isinstance(default, float) or "float" in hint:
        return float(text)
    return text


def build_term(name: str, params: dict[str, str], base: Any = None) -> Any:
    """A config object of method ``name`` from string parameters (``base``: start from this config)."""
    info = get_method(name)
    cls = info.config_class()
    fields = {f.name: f for f in parameters(info)}
    values = {}
    for key, text in params.items():
        if key not in fields:
            raise ValueError(f"{info.name} has no parameter {key!r}; its parameters: {', '.join(fields)}.")
        if not isinstance(text, str):
            text = str(text)
        try:
            values[key] = _convert(cls, fields[key], text)
        except ValueError as exc:
            raise ValueError(f"{info.name}.{key}={text!r}: {exc}") from None
    if base is not None:
        return dataclasses.replace(base, **values)
    return cls(**values)
