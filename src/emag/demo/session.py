"""A comparison of method configurations on one model, as the demo page runs it (no web code here).

:class:`DemoSession` reads the model folder once (the bundled digits model by default), loads its pipeline
on the first run and keeps it. :meth:`DemoSession.compare` checks every configuration line against the
model before any pass (the command line's checks: :func:`emag.generate.plan_generation`), then runs each
one with the same seed, hence the same initial noise, through the same call as ``emag generate``
(:func:`emag.generate.run_job`): the images are the command line's for the same settings. For each it
keeps the image, its parameters, the PNG written with them (``emag.io.save_png``), EMAG's trace, and
the positive / unconditional / negative predictions decoded from x0 at a few steps
(:mod:`emag.negatives`).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..generate import GenerationPlan, job_params, model_facts, plan_generation, prepare_pipeline, run_job
from ..io import save_png
from ..loading import read_model_index
from ..negatives import Watcher, figure, trace_rows
from ..threads import torch_threads
from .configs import Configuration, parse_configurations


class Cancelled(Exception):
    """A run was cancelled between two steps."""


@dataclass
class Result:
    """One configuration's outcome."""

    label: str  # the line as written
    terms: str  # the terms that ran, with their defaults written in
    image: Image.Image
    params: dict[str, Any]
    png: Path
    trace: list[dict[str, Any]] = field(default_factory=list)  # EMAG's per-step rows (empty without EMAG)
    negatives: Image.Image | None = None


class DemoSession:
    """The model of a demo page (``model``: a folder or hub id; None: the bundled digits model)."""

    def __init__(self, model: str | None = None, device: str = "cpu", dtype: str = "float32",
                 out_dir: str | Path | None = None) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.facts = model_facts(model)  # the folder is read (and checked) once
        self.family = self.facts.family
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="emag-demo-"))
        self._pipe = None
        self._lock = threading.Lock()  # one comparison at a time: the pipeline runs one call at a time
        self.cancel = threading.Event()
        self._runs = 0
        base = plan_generation(model, **self._condition_kwargs(None), method="cfg", device=device, dtype=dtype)
        self.defaults = dict(steps=base.num_inference_steps, cfg=base.guidance_scale, seed=base.seed,
                             height=base.height, width=base.width, emag_scale=base.preset.emag.scale,
                             preset=base.preset.name)

    # -- what the page offers -----------------------------------------------------------------------
    @property
    def text_conditioned(self) -> bool:
        return self.family.text_conditioned

    @property
    def sized(self) -> bool:
        """Whether the image size is a choice (text models; DiT models generate at their native size)."""
        return self.family.text_conditioned

    def class_choices(self) -> list[str]:
        """Class labels a class-conditional model offers (ids, with names where the model has them)."""
        names = read_model_index(self.facts.folder).get("id2label") or {}
        n = self.facts.num_classes
        return [f"{i}: {names[str(i)]}" if str(i) in names else str(i) for i in range(min(n, 1000))]

    def _condition_kwargs(self, condition: str | None) -> dict[str, Any]:
        if self.text_conditioned:
            return {"prompts": [condition or "a photo of a cat"]}
        label = "0" if condition is None else str(condition).split(":", 1)[0].strip()
        return {"class_labels": [label]}

    # -- a comparison -------------------------------------------------------------------------------
    def plans(self, configurations: str, condition: str | None, seed: int, steps: int,
              height: int | None = None, width: int | None = None,
              negative_prompt: str | None = None) -> list[tuple[Configuration, GenerationPlan]]:
        """Every configuration line checked against the model (no pass runs): clear errors first."""
        configs = parse_configurations(configurations)
        size = dict(height=height, width=width) if self.sized else {}
        out = []
        for c in configs:
            try:
                plan = plan_generation(
                    self.model, **self._condition_kwargs(condition), method=c.method, method_params=c.params,
                    guidance_scale=c.cfg_scale() if c.cfg_scale() is not None else self.defaults["cfg"],
                    num_inference_steps=steps, seed=seed, device=self.device, dtype=self.dtype,
                    **({"negative_prompt": negative_prompt} if self.text_conditioned else {}), **size)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{c.text}: {exc}") from None
            out.append((c, plan))
        return out

    def pipeline(self, plan: GenerationPlan):
        """The model's pipeline, loaded once (the sampler each plan asks for is set before its run)."""
        if self._pipe is None:
            self._pipe = prepare_pipeline(plan, quiet=True)
        return prepare_pipeline(plan, self._pipe, quiet=True)

    def compare(self, configurations: str, condition: str | None, seed: int, steps: int,
                height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
                negatives_at: int = 3, progress: Callable[[float, str], None] | None = None) -> list[Result]:
        """Run every configuration on the same noise (see the module docstring); ``progress(fraction,
        text)`` is told each step; :attr:`cancel` stops the run at the next step (:class:`Cancelled`)."""
        plans = self.plans(configurations, condition, seed, steps, height, width, negative_prompt)
        with self._lock:
            self.cancel.clear()
            self._runs += 1
            results = []
            for k, (config, plan) in enumerate(plans):
                results.append(self._run(k, len(plans), config, plan, negatives_at, progress))
            return results

    def _run(self, k: int, total: int, config: Configuration, plan: GenerationPlan, negatives_at: int,
             progress) -> Result:
        n = plan.num_inference_steps
        at = sorted({round(i * (n - 1) / max(negatives_at - 1, 1)) for i in range(negatives_at)}) if negatives_at else []
        with torch_threads(plan.threads):
            pipe = self.pipeline(plan)
            watcher = Watcher(pipe, at)

            def observe(step, guided) -> None:
                if self.cancel.is_set():
                    raise Cancelled("Cancelled.")
                watcher(step, guided)
                if progress is not None:
                    progress((k + (step.ctx.index + 1) / n) / total, f"{config.text}: step {step.ctx.index + 1}/{n}")

            condition = plan.jobs[0]["condition"]
            out = run_job(pipe, plan, [condition], torch.Generator(device="cpu").manual_seed(plan.seed),
                          on_step_outputs=observe)
        params = job_params(plan, 0)
        saved = out.frames[0] if plan.num_frames is not None else out.images[0]  # a video: its frames
        png = save_png(saved, self.out_dir / f"run{self._runs:03d}_{k:02d}_seed{plan.seed}.png", params)
        image = saved[0] if isinstance(saved, list) else saved
        terms = " + ".join(f"{t['method']}({_short(t)})" for t in plan.term_params)
        return Result(config.text, terms, image, params, png, trace_rows(pipe.emag_trace),
                      figure(watcher.steps) if watcher.steps else None)


def _short(term: dict[str, Any]) -> str:
    """A term's main settings for a caption."""
    keep = ("scale", "layers", "variant")
    return ", ".join(f"{k}={term[k]}" for k in keep if term.get(k) is not None)
