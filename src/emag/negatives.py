"""Look inside a guided call: the positive, unconditional and negative (perturbed-branch) predictions of
chosen steps decoded from their x0 estimates, side by side, and EMAG's block choice per step.

The guidance engine shows each step's branch predictions to an observer (the pipelines'
``on_step_outputs``); each prediction is turned into its x0 estimate with the step's parametrization
(flow matching: ``x0 = x - sigma v``; epsilon: ``x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)``) and decoded
by the pipeline's VAE (docs/cli.md section 9). A branch that does not run at a step (EMAG outside its
replacement window, where the fast path's negative equals the positive) is drawn as "not run".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from .engine import Step
from .io import atomic_write

GUIDED = "guided"


@dataclass
class StepImages:
    """Decoded x0 estimates of one step: branch name -> ``[B, C, H, W]`` in [0, 1] (and ``"guided"``)."""

    index: int
    timestep: float
    images: dict[str, Tensor] = field(default_factory=dict)


class Watcher:
    """An ``on_step_outputs`` observer that keeps the decoded x0 estimates of the steps ``at``."""

    def __init__(self, pipe, at: Iterable[int]) -> None:
        self.pipe = pipe
        self.at = set(at)
        self.steps: list[StepImages] = []

    def __call__(self, step: Step, guided: Tensor) -> None:
        if step.ctx.index not in self.at:
            return
        if step.ctx.param is None:
            raise ValueError("This pipeline's steps carry no parametrization; x0 estimates cannot be formed.")
        c = step.x.shape[1]
        view = StepImages(step.ctx.index, step.ctx.timestep)
        preds = {**step.outputs, GUIDED: guided}
        for name, pred in preds.items():
            x_in = step.inputs.get(name, step.x)[:, :c]
            x0 = step.ctx.param.to_x0(x_in, pred[:, :c])
            view.images[name] = self.pipe.decode_latents(x0).float().cpu()
        self.steps.append(view)


def label(name: str) -> str:
    """How a branch is named in the figure."""
    if name == "cond":
        return "positive (cond)"
    if name == "uncond":
        return "unconditional"
    if name == GUIDED:
        return "guided"
    return f"negative: {name}"


def columns(steps: list[StepImages]) -> list[str]:
    names = list(dict.fromkeys(n for s in steps for n in s.images))
    order = {"cond": 0, "uncond": 1, GUIDED: 3}
    return sorted(names, key=lambda n: (order.get(n, 2), n))


def _cell(image: Tensor | None, size: int) -> Image.Image:
    if image is None:
        cell = Image.new("RGB", (size, size), (200, 200, 200))
        ImageDraw.Draw(cell).text((6, size // 2 - 6), "not run", fill=(60, 60, 60))
        return cell
    arr = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return Image.fromarray(arr).resize((size, size), Image.NEAREST if arr.shape[0] < size else Image.BICUBIC)


def figure(steps: list[StepImages], sample: int = 0, size: int = 160) -> Image.Image:
    """A grid: one row per watched step, one column per branch (positive, unconditional, negatives,
    guided), each cell sample ``sample``'s decoded x0 estimate; labels above the columns and left of rows."""
    if not steps:
        raise ValueError("No step was watched (the steps asked for are outside the schedule).")
    names = columns(steps)
    head, side, pad = 24, 70, 4
    width = side + len(names) * (size + pad)
    height = head + len(steps) * (size + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((side + j * (size + pad) + 2, 6), label(name), fill=(0, 0, 0))
    for i, s in enumerate(steps):
        y = head + i * (size + pad)
        draw.text((4, y + size // 2 - 12), f"step {s.index}\nt={s.timestep:.0f}", fill=(0, 0, 0))
        for j, name in enumerate(names):
            img = s.images.get(name)
            canvas.paste(_cell(None if img is None else img[sample], size), (side + j * (size + pad), y))
    return canvas


def save_figure(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def trace_rows(trace) -> list[dict[str, Any]]:
    """EMAG's trace as plain rows: step, EMA / replacement on, chosen blocks, score per candidate block."""
    rows = []
    for r in trace or []:
        rows.append({"step": r.index, "ema": bool(r.ema), "apply": bool(r.apply), "chosen": list(r.chosen),
                     "scores": {int(k): (None if v is None else float(v)) for k, v in r.scores.items()}})
    return rows


def choice_figure(rows: list[dict[str, Any]], title: str | None = None):
    """EMAG's score of each candidate block per step (lines) and the block it chose (stars): a matplotlib
    figure (the caller closes it)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("The choice plot needs matplotlib: pip install matplotlib.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({k for r in rows for k in r["scores"]})
    if not layers:
        raise ValueError("The trace holds no EMAG scores (did EMAG run?).")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(2, 1))
    for layer in layers:
        pts = [(r["step"], r["scores"].get(layer)) for r in rows if r["scores"].get(layer) is not None]
        top.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"block {layer}")
    top.set_ylabel("score mean |E - R|")
    top.legend(fontsize=8)
    if title:
        top.set_title(title, fontsize=9)
    chosen = [(r["step"], b) for r in rows if r["apply"] for b in r["chosen"]]
    bottom.scatter([c[0] for c in chosen], [c[1] for c in chosen], marker="*", s=80)
    bottom.set_yticks(layers)
    bottom.set_ylabel("chosen block")
    bottom.set_xlabel("step")
    fig.tight_layout()
    return fig


def choice_plot(rows: list[dict[str, Any]], stem: str | Path) -> list[Path]:
    """:func:`choice_figure` saved as PNG and SVG."""
    fig = choice_figure(rows)  # checks that matplotlib is there
    import matplotlib.pyplot as plt

    out = []
    for ext in ("png", "svg"):
        p = Path(f"{stem}.{ext}")
        fig.savefig(p, dpi=120)
        out.append(p)
    plt.close(fig)
    return out
