"""``emag report``: result files -> the paper's tables and plots.

- A table (Markdown and CSV) of every result: method, swept value, every metric, the best value of each
  column marked (lower is better for Fréchet distances and KID, higher for the rest).
- Plots (PNG and SVG, matplotlib): each metric against the swept scale, one line per method; the plane
  of a distance (``fd`` / ``fid``) against a quality score (HPS, CLIPScore, precision or accuracy,
  whichever the results have, or ``--quality``), with each method's Pareto frontier and its operating
  point.
- Matched guidance: each method's operating point next to CFG's distance at the same quality score,
  interpolated along the CFG sweep, so that a gain cannot be just stronger guidance.

The operating point is this project's rule (the paper picks a scale on the frontier by inspection): the
frontier point nearest to the ideal corner (lowest distance, highest quality) after scaling both axes to
[0, 1] over all results (docs/eval.md section 5).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .scoring import RESULTS
from .sweep import SWEEP

LOWER_IS_BETTER = ("fd", "fid", "kid", "sfid")
QUALITY_ORDER = ("hps", "clip_score", "precision", "accuracy")


@dataclass
class Row:
    name: str
    method: str
    scale: float
    metrics: dict[str, float]


def _scale_of(config: dict[str, Any], values: dict[str, str] | None) -> float:
    """The swept value of a result: the sweep's (first) value, else the scale of its first non-CFG term,
    else the CFG scale."""
    for v in (values or {}).values():
        try:
            return float(v)
        except ValueError:
            continue
    for term in config.get("guidance", []):
        if term.get("method") != "CFG" and isinstance(term.get("scale"), (int, float)):
            return float(term["scale"])
    return float(config.get("guidance_scale", math.nan))


def _read(path: Path, what: str, keys: tuple[str, ...]) -> Any:
    """The JSON of ``path``, which must be ``what`` (an object with ``keys``, or a list of them)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not {what} ({exc}).") from None
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(d, dict) and all(k in d for k in keys) for d in items):
        raise ValueError(f"{path} is not {what} (expected the keys {', '.join(keys)}).")
    return data


def load_rows(paths: list[str | Path]) -> list[Row]:
    """Results from ``results.json`` files, sample folders holding one, or sweep folders (``sweep.json``)."""
    rows: list[Row] = []
    for p in map(Path, paths):
        if (p / SWEEP).exists():
            for entry in _read(p / SWEEP, "an emag sweep listing", ("point", "method", "values", "results")):
                res = _read(Path(entry["results"]), "an emag results file", ("config", "metrics"))
                rows.append(Row(entry["point"], entry["method"], _scale_of(res["config"], entry["values"]), res["metrics"]))
            continue
        f = p / RESULTS if p.is_dir() else p
        if not f.exists():
            raise ValueError(f"{p}: no {RESULTS} or {SWEEP} there; run `emag score` or `emag sweep` first.")
        res = _read(f, "an emag results file (from `emag score`)", ("config", "metrics"))
        rows.append(Row(f.parent.name, res["config"]["method"], _scale_of(res["config"], None), res["metrics"]))
    if not rows:
        raise ValueError("No results to report.")
    return sorted(rows, key=lambda r: (r.method != "cfg", r.method, r.scale))


def metric_names(rows: list[Row]) -> list[str]:
    return sorted({m for r in rows for m in r.metrics})


def best(rows: list[Row], metric: str) -> float | None:
    vals = [r.metrics[metric] for r in rows if metric in r.metrics and math.isfinite(r.metrics[metric])]
    if not vals:
        return None
    return min(vals) if metric in LOWER_IS_BETTER else max(vals)


def table_markdown(rows: list[Row]) -> str:
    names = metric_names(rows)
    bests = {m: best(rows, m) for m in names}
    out = ["| point | method | scale | " + " | ".join(f"{m} {'(lower)' if m in LOWER_IS_BETTER else '(higher)'}" for m in names) + " |",
           "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        cells = []
        for m in names:
            v = r.metrics.get(m)
            cell = "-" if v is None else f"{v:.4f}"
            cells.append(f"**{cell}**" if v is not None and v == bests[m] else cell)
        out.append(f"| {r.name} | {r.method} | {r.scale:g} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def table_csv(rows: list[Row]) -> str:
    names = metric_names(rows)
    bests = {m: best(rows, m) for m in names}
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["point", "method", "scale", *names, "best_in"])
    for r in rows:
        w.writerow([r.name, r.method, r.scale, *[r.metrics.get(m, "") for m in names],
                    " ".join(m for m in names if r.metrics.get(m) is not None and r.metrics.get(m) == bests[m])])
    return buf.getvalue()


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, higher y), sorted by x."""
    keep = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def operating_point(points: list[tuple[float, float]], span: tuple[float, float, float, float]) -> int:
    """The frontier point nearest the ideal corner, both axes scaled by ``span`` = (xmin, xmax, ymin, ymax)."""
    xmin, xmax, ymin, ymax = span
    sx, sy = (xmax - xmin) or 1.0, (ymax - ymin) or 1.0
    front = pareto(points)
    return min(front, key=lambda i: ((points[i][0] - xmin) / sx) ** 2 + ((ymax - points[i][1]) / sy) ** 2)


def axes_of(rows: list[Row], quality: str | None) -> tuple[str, str]:
    names = metric_names(rows)
    distance = next((m for m in ("fid", "fd") if m in names), None)
    quality = quality or next((m for m in QUALITY_ORDER if m in names), None)
    if distance is None or quality not in names:
        raise ValueError(f"The results need a distance (fid / fd) and a quality metric ({quality or '/'.join(QUALITY_ORDER)}); "
                         f"they have {names}.")
    return distance, quality


def matched_guidance(rows: list[Row], distance: str, quality: str) -> list[dict[str, Any]]:
    """For each method's operating point: CFG's distance at the same quality, interpolated along the CFG sweep."""
    xs = [r.metrics[distance] for r in rows]
    ys = [r.metrics[quality] for r in rows]
    span = (min(xs), max(xs), min(ys), max(ys))
    cfg = sorted((r.metrics[quality], r.metrics[distance]) for r in rows if r.method == "cfg")
    out = []
    for method in dict.fromkeys(r.method for r in rows):
        mine = [r for r in rows if r.method == method]
        i = operating_point([(r.metrics[distance], r.metrics[quality]) for r in mine], span)
        r = mine[i]
        entry = {"method": method, "point": r.name, "scale": r.scale, distance: r.metrics[distance], quality: r.metrics[quality],
                 f"cfg_{distance}_at_same_{quality}": None}
        q = r.metrics[quality]
        if len(cfg) >= 2 and cfg[0][0] <= q <= cfg[-1][0]:
            entry[f"cfg_{distance}_at_same_{quality}"] = float(np.interp(q, [c[0] for c in cfg], [c[1] for c in cfg]))
        out.append(entry)
    return out


def plots(rows: list[Row], folder: Path, distance: str, quality: str) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("Plots need matplotlib: pip install matplotlib (the tables were written).") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    methods = list(dict.fromkeys(r.method for r in rows))
    markers = "os^vD<>p*h"

    def save(fig, stem):
        fig.tight_layout()
        for ext in ("png", "svg"):
            p = folder / f"{stem}.{ext}"
            fig.savefig(p, dpi=120)
            paths.append(p)
        plt.close(fig)

    for metric in metric_names(rows):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for k, method in enumerate(methods):
            pts = sorted((r.scale, r.metrics[metric]) for r in rows if r.method == method and metric in r.metrics)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)], label=method)
        ax.set_xlabel("scale of the swept method")
        ax.set_ylabel(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
        ax.legend(fontsize=8)
        save(fig, f"{metric}_vs_scale")
    xs = [r.metrics[distance] for r in rows]
    ys = [r.metrics[quality] for r in rows]
    span = (min(xs), max(xs), min(ys), max(ys))
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for k, method in enumerate(methods):
        mine = [r for r in rows if r.method == method]
        pts = [(r.metrics[distance], r.metrics[quality]) for r in mine]
        line = ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)], label=method)
        front = pareto(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color=line.get_facecolor()[0], lw=1)
        op = operating_point(pts, span)
        ax.scatter([pts[op][0]], [pts[op][1]], marker="*", s=220, color=line.get_facecolor()[0], edgecolor="k", zorder=5)
    ax.set_xlabel(f"{distance} (lower is better)")
    ax.set_ylabel(f"{quality} (higher is better)")
    ax.set_title("Pareto frontier per method; star: operating point")
    ax.legend(fontsize=8)
    save(fig, f"{distance}_{quality}_plane")
    return paths


def write_report(paths: list[str | Path], out: str | Path, quality: str | None = None) -> dict[str, Any]:
    """Tables, matched guidance and plots of the results under ``paths`` into ``out``."""
    rows = load_rows(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table_markdown(rows))
    (out / "table.csv").write_text(table_csv(rows))
    report = {"rows": len(rows), "table": str(out / "table.md")}
    try:
        distance, q = axes_of(rows, quality)
    except ValueError as exc:
        report["plane"] = str(exc)
        return report
    matched = matched_guidance(rows, distance, q)
    lines = [f"| method | operating point | scale | {distance} | {q} | CFG's {distance} at the same {q} |", "|---|---|---|---|---|---|"]
    for m in matched:
        cfg_at = m[f"cfg_{distance}_at_same_{q}"]
        lines.append(f"| {m['method']} | {m['point']} | {m['scale']:g} | {m[distance]:.4f} | {m[q]:.4f} | "
                     f"{'outside the CFG sweep' if cfg_at is None else f'{cfg_at:.4f}'} |")
    (out / "matched_guidance.md").write_text("\n".join(lines) + "\n")
    report["matched_guidance"] = matched
    report["plots"] = [str(p) for p in plots(rows, out, distance, q)]
    return report
