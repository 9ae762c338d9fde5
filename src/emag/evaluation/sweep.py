"""``emag sweep``: a grid of guidance configurations sampled and scored as one resumable job.

A grid is written ``METHODS[:FIELD=V1,V2,...[;FIELD=...]]``: the methods of ``--method`` and, for each
field, the values to try; several fields multiply. ``cfg`` is the CFG scale (``--cfg``); any other field
is a method's parameter as ``--param`` writes it (``emag.scale``, ``pag.scale``, ``emag.layers`` with a
range such as ``6-8``: values are separated by commas). Every point is an ordinary sample folder
(``<out>/<point>/``) made by :func:`.sampling.run_sampling` and scored by :func:`.scoring.score_folder`,
so a rerun skips finished samples and finished scores (docs/eval.md section 5).
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import atomic_write
from .distributed import Ranks
from .sampling import SamplingPlan, plan_sampling, run_sampling
from .scoring import RESULTS, score_folder

SWEEP = "sweep.json"


@dataclass(frozen=True)
class Point:
    """One configuration of a grid: the methods and the values of the swept fields."""

    method: str
    values: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        parts = [self.method.replace(",", "+")] + [f"{k}-{v}" for k, v in self.values]
        return re.sub(r"[^A-Za-z0-9._+=-]", "-", "_".join(parts))

    def plan_kwargs(self, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` (the keyword arguments of :func:`plan_sampling`) with this point's method and values."""
        kw = {**base, "method": self.method}
        params = {m: dict(f) for m, f in (base.get("method_params") or {}).items()}
        for key, value in self.values:
            if key == "cfg":
                kw["guidance_scale"] = float(value)
            else:
                m, _, f = key.partition(".")
                params.setdefault(m, {})[f] = value
        kw["method_params"] = {m: f for m, f in params.items() if m in self.method.split(",")}
        return kw


def parse_grid(text: str) -> list[Point]:
    """The points of one ``--grid`` (module docstring)."""
    method, _, fields = text.partition(":")
    method = method.strip()
    if not method:
        raise ValueError(f"--grid {text!r}: give the methods first, e.g. 'emag:emag.scale=1,2,3'.")
    axes: list[list[tuple[str, str]]] = []
    for item in filter(None, (f.strip() for f in fields.split(";"))):
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or (key != "cfg" and "." not in key):
            raise ValueError(f"--grid {text!r}: {item!r} is not FIELD=V1,V2,... with FIELD 'cfg' or METHOD.FIELD.")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"--grid {text!r}: no values for {key}.")
        if key != "cfg" and key.partition(".")[0] not in [m.strip() for m in method.split(",")]:
            raise ValueError(f"--grid {text!r}: {key} belongs to a method that is not in {method!r}.")
        axes.append([(key, v) for v in vals])
    return [Point(method, tuple(combo)) for combo in itertools.product(*axes)] if axes else [Point(method)]


@dataclass
class SweepPlan:
    points: list[tuple[Point, SamplingPlan]] = field(default_factory=list)


def plan_sweep(grids: list[str], model: str | None, protocol: str, **base: Any) -> SweepPlan:
    """Every point checked (as ``emag sample`` checks one run) before any work; duplicates refused."""
    if not grids:
        raise ValueError("Give at least one --grid, e.g. --grid 'cfg:cfg=1.5,3' --grid 'emag:emag.scale=1,2'.")
    plan = SweepPlan()
    seen: dict[str, str] = {}
    for text in grids:
        for point in parse_grid(text):
            try:
                sp = plan_sampling(model, protocol, **point.plan_kwargs(base))
            except ValueError as exc:
                raise ValueError(f"Grid point {point.name}: {exc}") from None
            if sp.config_hash in seen or point.name in seen.values():
                raise ValueError(f"Grid point {point.name} is listed twice (or is the same configuration as "
                                 f"{seen.get(sp.config_hash, point.name)}).")
            seen[sp.config_hash] = point.name
            plan.points.append((point, sp))
    return plan


def run_sweep(plan: SweepPlan, out: str | Path, ranks: Ranks = Ranks(), score: bool = True,
              log=lambda line: None, **score_kw: Any) -> list[dict[str, Any]]:
    """Sample (and score) every point into ``out/<point>/``; a point whose samples and results exist for
    its configuration is skipped. Returns each point's results; writes ``out/sweep.json``."""
    out = Path(out)
    rows = []
    for point, sp in plan.points:
        folder = out / point.name
        summary = run_sampling(sp, folder, ranks)
        log(f"{point.name}: {summary.line()}")
        entry = {"point": point.name, "method": point.method, "values": dict(point.values), "folder": str(folder),
                 "config_hash": sp.config_hash}
        if score:
            done = folder / RESULTS
            cached = json.loads(done.read_text()) if done.exists() else None
            stale = cached is None or summary.generated or cached.get("config_hash") != sp.config_hash \
                or cached.get("prdc_k") != score_kw.get("k", 5)
            if stale:
                cached = score_folder(folder, ranks, **score_kw)
            entry["results"] = str(done)
            entry["metrics"] = cached["metrics"]
        rows.append(entry)
    if ranks.main:
        atomic_write(out / SWEEP, lambda tmp: Path(tmp).write_text(json.dumps(rows, indent=2) + "\n"))
    return rows
