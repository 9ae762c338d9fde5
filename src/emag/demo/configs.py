"""The method configurations a comparison is written in, one per line: ``CFG 7``, ``CFG 7 + EMAG 1.5``,
``CFG 7 + PAG 3 layers=13``, ``EMAG-Q 1.5`` (terms joined by ``+``; a name, an optional scale, then
``field=value`` parameters as the command line's ``--param``), and the one-click presets of each family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..families import ModelFamily
from ..guidance.registry import get_method

# shorthands a line may use for a method and fixed parameters
ALIASES = {"emag-q": ("emag", {"variant": "q"})}
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$|^[+-]?inf$")


@dataclass(frozen=True)
class Configuration:
    """One line of a comparison: method names in order and their string parameters."""

    text: str
    names: tuple[str, ...]
    params: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return ",".join(self.names)

    def cfg_scale(self) -> float | None:
        """The line's CFG scale, when it has a CFG term with one."""
        scale = self.params.get("cfg", {}).get("scale")
        return None if scale is None else float(scale)


def parse_configuration(text: str) -> Configuration:
    """Parse one line (see the module docstring); an unknown method or a malformed term is a clear error."""
    line = text.strip()
    if not line:
        raise ValueError("An empty configuration: write e.g. 'CFG 7' or 'CFG 7 + EMAG 1.5'.")
    names: list[str] = []
    params: dict[str, dict[str, str]] = {}
    for term in line.split("+"):
        words = term.split()
        if not words:
            raise ValueError(f"{line!r}: an empty term between '+' signs.")
        key = words[0].strip().lower().replace("_", "-")
        name, fixed = ALIASES.get(key, (key, {}))
        try:
            name = get_method(name).name
        except ValueError as exc:
            raise ValueError(f"{line!r}: {exc}") from None
        if name in names:
            raise ValueError(f"{line!r}: {name} appears twice.")
        values = dict(fixed)
        for word in words[1:]:
            if "=" in word:
                k, _, v = word.partition("=")
                if not k or not v:
                    raise ValueError(f"{line!r}: {word!r} is not a parameter; write field=value (e.g. layers=6-8).")
                values[k.strip()] = v.strip()
            elif _NUMBER.match(word) and "scale" not in values:
                values["scale"] = word
            else:
                raise ValueError(f"{line!r}: {word!r} after {words[0]} is neither a scale nor field=value.")
        names.append(name)
        params[name] = values
    return Configuration(line, tuple(names), params)


def parse_configurations(text: str) -> list[Configuration]:
    """Every non-empty line of ``text`` (``#`` starts a comment); at least one."""
    lines = [ln.split("#", 1)[0] for ln in text.splitlines()]
    configs = [parse_configuration(ln) for ln in lines if ln.strip()]
    if not configs:
        raise ValueError("No method configuration: write one per line, e.g. 'CFG 7' and 'CFG 7 + EMAG 1.5'.")
    return configs


def presets(family: ModelFamily, cfg: float, emag_scale: float) -> dict[str, str]:
    """One-click comparisons for ``family``: button label -> configuration lines (the family's CFG scale and
    EMAG scale). Guidance-distilled models compare against their conditional prediction (``PAG 0``: no
    term acts, no extra pass); linear-attention models use EMAG-Q, the variant defined there."""
    base = "" if family.distilled_guidance else f"CFG {cfg:g} + "
    plain = "PAG 0" if family.distilled_guidance else f"CFG {cfg:g}"
    emag = "EMAG-Q" if family.linear_attention else "EMAG"
    out = {"CFG vs EMAG": f"{plain}\n{base}{emag} {emag_scale:g}"}
    if not family.linear_attention:
        out["EMAG full vs Q"] = f"{base}EMAG {emag_scale:g}\n{base}EMAG-Q {emag_scale:g}"
    others = "SEG 3" if "pag" in family.undefined_methods else "PAG 3\n" + base + "SEG 3"
    out["CFG, EMAG and perturbations"] = f"{plain}\n{base}{emag} {emag_scale:g}\n{base}{others}"
    return out
