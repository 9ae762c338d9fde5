"""``emag sample``: generate an evaluation set into a sample folder, on one process or many.

``plan_sampling`` checks everything cheaply (the guidance configuration through the same code as
``emag generate``, the protocol's conditions, the output folder's configuration) before any weights
load. ``run_sampling`` then runs this process's share of the fixed global batches (see
:mod:`.distributed`), skipping batches whose PNGs are all there, and writes each sample atomically.
Every sample draws its noise from its own generator (:mod:`.seeds`); a batch is always the same set of
indices, so a sample's image depends on neither the number of processes nor an interruption
(docs/eval.md section 3).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..generate import GenerationPlan, model_facts, plan_generation, prepare_pipeline, run_job
from ..threads import torch_threads
from .distributed import Ranks
from .folder import FolderError, SampleFolder
from .protocols import EvalSet, eval_set
from .provenance import config_hash, model_fingerprint, versions
from .seeds import sample_generators, sample_seed

NOISE = "one CPU generator per sample, seeded splitmix64(seed, index) >> 1"


@dataclass
class SamplingPlan:
    generation: GenerationPlan  # the guidance configuration, checked as `emag generate` checks it
    samples: EvalSet
    batch_size: int
    config: dict[str, Any]  # everything that decides the images (hashed)
    config_hash: str

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    def seed_of(self, index: int) -> int:
        return sample_seed(self.generation.seed, index)

    def index_line(self, index: int) -> dict[str, Any]:
        return {**self.samples.record(index), "seed": self.seed_of(index), "config_hash": self.config_hash}

    def manifest(self) -> dict[str, Any]:
        return {"format": "emag-samples/1", "config_hash": self.config_hash, "config": self.config,
                "num_samples": self.num_samples, "source": self.samples.source,
                "model_path": str(self.generation.folder), "versions": versions()}


def plan_sampling(model: str | None, protocol: str, *, source: str | None = None, num_samples: int | None = None,
                  batch_size: int = 8, seed: int | None = None, **generation: Any) -> SamplingPlan:
    """Check an evaluation request; no weights are loaded. ``generation``: the keyword arguments of
    :func:`emag.generate.plan_generation` (method, method_params, emag_overrides, guidance_scale, ...)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch_size!r}.")
    if protocol == "digits" and model is not None:
        raise ValueError("The digits protocol samples the bundled digits model; leave out --model.")
    if protocol != "digits" and model is None:
        raise ValueError(f"The {protocol} protocol needs --model (the bundled model is for --protocol digits).")
    facts = model_facts(model, generation.get("allow_download", False))
    if facts.family.video:
        raise ValueError(f"{facts.name} is a {facts.family.label} video model; the evaluation protocols score images "
                         "(use `emag generate --num-frames N` for videos).")
    text_protocol = protocol in ("coco2014", "prompts")
    if protocol in ("coco2014", "prompts", "imagenet") and text_protocol != facts.family.text_conditioned:
        kind = "text-conditioned" if text_protocol else "class-conditional"
        raise ValueError(f"The {protocol} protocol is for {kind} models; {facts.name} is a {facts.family.label} model.")
    samples = eval_set(protocol, num_samples, source, num_classes=None if text_protocol else facts.num_classes)
    if samples.text:
        plan = plan_generation(model, prompts=[samples.conditions[0]], seed=seed, **generation)
    else:
        plan = plan_generation(model, class_labels=[str(c) for c in sorted(set(samples.conditions))], seed=seed,
                               **generation)
    config = {
        "protocol": protocol,
        "source": {k: v for k, v in samples.source.items() if k != "path"},
        "model": model_fingerprint(plan.folder), "family": plan.family.name,
        "method": plan.method, "preset": plan.preset.name, "guidance": plan.term_params, "emag": plan.resolved_emag,
        "guidance_scale": plan.guidance_scale, "negative_prompt": plan.negative_prompt,
        "steps": plan.num_inference_steps, "sampler": plan.sampler, "height": plan.height, "width": plan.width,
        "dtype": plan.dtype, "batching": plan.batching, "fast": plan.fast,
        "seed": plan.seed, "noise": NOISE, "batch_size": batch_size,
    }
    return SamplingPlan(plan, samples, batch_size, config, config_hash(config))


@dataclass
class SamplingSummary:
    num_samples: int
    generated: int  # by all processes in this run
    already_done: int
    seconds: float
    processes: int

    @property
    def samples_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.generated} sample(s) generated in {self.seconds:.1f} s ({self.samples_per_second:.2f} samples/s "
                f"over {self.processes} process(es)); {self.already_done} were already done; "
                f"{self.num_samples} in the folder.")


def run_sampling(plan: SamplingPlan, out: str | Path, ranks: Ranks = Ranks(), pipe=None,
                 progress: Callable[[int], None] | None = None) -> SamplingSummary:
    """Run this process's batches of ``plan`` into ``out`` (every process of the group calls it).
    ``progress(n)`` is called on the main process after each of its batches with the number of samples
    all processes are estimated to have finished."""
    folder = SampleFolder(out)
    error = None
    already, finished = 0, set()
    if ranks.main:
        try:
            folder.prepare(plan.manifest(), (plan.index_line(i) for i in range(plan.num_samples)))
            extra = folder.extra_pngs(plan.num_samples)
            if extra:
                raise FolderError(f"{folder.path} holds samples beyond --num-samples {plan.num_samples} "
                                  f"({', '.join(extra[:3])} ...): give the larger --num-samples.")
            finished = folder.finished_indices(plan.num_samples, plan.config_hash)
            already = len(finished)
        except (FolderError, OSError) as exc:
            error = exc
    if ranks.any(error is not None):
        if error is not None:
            raise error
        raise FolderError(f"The main process refused {out} (see its message).")
    ranks.barrier()
    if progress is not None and ranks.main and already:
        progress(already)
    if ranks.main:  # the main process has just checked every sample; the others check their own batches
        todo = [b for b in ranks.batches(plan.num_samples, plan.batch_size) if not set(b) <= finished]
    else:
        todo = [b for b in ranks.batches(plan.num_samples, plan.batch_size)
                if not all(folder.finished(i, plan.config_hash) for i in b)]
    g = plan.generation
    start = time.perf_counter()
    generated = 0
    with torch_threads(g.threads):
        if todo:
            pipe = prepare_pipeline(g, pipe, quiet=True, device=ranks.device(g.device))
        for batch in todo:
            conditions = [plan.samples.conditions[i] for i in batch]
            # class-conditional: each row's ancestral noise from its own generator (noise_layout="samples")
            layout = {} if g.family.text_conditioned else {"noise_layout": "samples"}
            images = run_job(pipe, g, conditions, sample_generators(g.seed, batch), **layout).images
            for i, image in zip(batch, images):
                if not folder.png(i).exists():
                    folder.write(i, image, {**plan.index_line(i)})
                    generated += 1
            if progress is not None and ranks.main:
                progress(len(batch) * ranks.world)
    seconds = time.perf_counter() - start
    total = ranks.sum([generated, seconds])
    ranks.barrier()
    if ranks.main and plan.samples.protocol == "imagenet":
        folder.write_npz(plan.num_samples)
    ranks.barrier()
    return SamplingSummary(plan.num_samples, int(total[0]), already, float(total[1]) / ranks.world, ranks.world)


def describe(plan: SamplingPlan) -> str:
    g = plan.generation
    return (f"{plan.samples.protocol}: {plan.num_samples} sample(s) from {g.model} ({g.family.label}), method {g.method}, "
            f"CFG {g.guidance_scale}, {g.num_inference_steps} steps, batches of {plan.batch_size}, "
            f"config {plan.config_hash[:12]}")


__all__ = ["SamplingPlan", "SamplingSummary", "describe", "plan_sampling", "run_sampling"]
