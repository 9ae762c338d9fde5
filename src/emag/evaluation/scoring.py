"""``emag score``: metrics of a sample folder, sharded like sampling, recorded with their provenance.

Every process extracts the features of its share of the images (the batches of :mod:`.distributed`);
Gaussian statistics are float64 streaming sums added across processes; the per-sample arrays (for
precision / recall / density / coverage and the classifier metrics) are gathered in index order on the
main process, which computes the metrics with :mod:`emag.metrics` and writes ``results.json`` and a
Markdown row ``results.md`` into the folder. Reference statistics are computed once per (extractor
weights, reference set) and cached (docs/evaluation.md section 4).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .. import metrics as M
from ..io import _atomic_write
from .distributed import Ranks
from .features import DigitsExtractor, Extractor
from .folder import FolderError, SampleFolder
from .provenance import config_hash, versions

RESULTS = "results.json"
RESULTS_MD = "results.md"


@dataclass
class StreamingStats:
    """float64 sums ``n``, ``sum x`` and ``sum x x^T`` of feature vectors: mean and covariance of any
    union of shards, independent of how the vectors were cut into batches or processes (up to float64
    rounding of the sums)."""

    dim: int
    n: float = 0.0
    s: np.ndarray | None = None
    ss: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if self.s is None:
            self.s, self.ss = np.zeros(self.dim), np.zeros((self.dim, self.dim))
        self.n += x.shape[0]
        self.s += x.sum(axis=0)
        self.ss += x.T @ x

    def reduce(self, ranks: Ranks) -> "StreamingStats":
        s = self.s if self.s is not None else np.zeros(self.dim)
        ss = self.ss if self.ss is not None else np.zeros((self.dim, self.dim))
        flat = ranks.sum(torch.from_numpy(np.concatenate([[self.n], s, ss.reshape(-1)]))).numpy()
        return StreamingStats(self.dim, float(flat[0]), flat[1:1 + self.dim], flat[1 + self.dim:].reshape(self.dim, self.dim))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (``numpy.cov``'s, as FID uses)."""
        if self.n < 2:
            raise ValueError("Statistics need at least two feature vectors.")
        mu = self.s / self.n
        cov = (self.ss - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, cov


@dataclass
class Reference:
    id: str
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    hash: str = field(default="")


def reference_of(extractor: Extractor, cache_dir: Path | None) -> Reference:
    """The extractor's reference features and statistics, from the cache when it has them."""
    ref_id = getattr(extractor, "reference_id", None)
    path = None
    if cache_dir is not None:
        key = config_hash({"extractor": extractor.name, "weights": extractor.fingerprint(),
                           "reference": ref_id or extractor.reference()[0]})
        path = Path(cache_dir) / f"reference-{extractor.name}-{key[:16]}.npz"
        if path.exists():
            with np.load(path) as z:
                return Reference(str(z["id"]), z["features"], z["mu"], z["sigma"], str(z["hash"]))
    rid, images = extractor.reference()
    feats = _extract(extractor, images, 256)["features"]
    stats = StreamingStats(feats.shape[1])
    stats.add(feats)
    mu, sigma = stats.mean_cov()
    h = config_hash({"id": rid, "mu": mu.tolist(), "sigma_trace": float(np.trace(sigma)), "n": int(stats.n)})
    ref = Reference(rid, feats, mu, sigma, h)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda tmp: _save(tmp, id=rid, features=feats, mu=mu, sigma=sigma, hash=h))
    return ref


def _save(tmp: str, **arrays: Any) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _extract(extractor: Extractor, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        for k, v in extractor(images[start:start + batch_size]).items():
            parts.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _gather(ranks: Ranks, local: dict[int, dict[str, np.ndarray]]) -> dict[int, dict[str, np.ndarray]]:
    if ranks.world == 1:
        return local
    shards: list = [None] * ranks.world
    dist.all_gather_object(shards, local)
    merged: dict[int, dict[str, np.ndarray]] = {}
    for shard in shards:
        merged.update(shard)
    return merged


def _within_class_diversity(features: np.ndarray, labels: np.ndarray) -> float:
    vals = [M.diversity(features[labels == c]) for c in np.unique(labels) if int((labels == c).sum()) > 1]
    return float(np.mean(vals)) if vals else float("nan")


def default_extractor(protocol: str) -> Extractor:
    if protocol == "digits":
        return DigitsExtractor()
    raise ValueError(f"Scoring the {protocol} protocol needs the Inception / CLIP extractors, which this version "
                     "does not have yet (see docs/evaluation.md section 6); the digits protocol is scored here.")


def score_folder(out: str | Path, ranks: Ranks = Ranks(), extractor: Extractor | None = None,
                 cache_dir: str | Path | None = None, batch_size: int = 256, k: int = 5) -> dict[str, Any]:
    """Score the finished sample folder ``out`` (every process of the group calls it); returns the
    results (on every process) and, on the main one, writes them into the folder."""
    folder = SampleFolder(out)
    manifest = folder.manifest()
    if manifest is None:
        raise FolderError(f"{folder.path} has no manifest.json: score a folder made by `emag sample`.")
    n, chash = int(manifest["num_samples"]), manifest["config_hash"]
    index = folder.index()
    if len(index) != n:
        raise FolderError(f"{folder.path}: index.jsonl lists {len(index)} samples, the manifest {n}.")
    foreign = folder.foreign_files() + folder.extra_pngs(n)
    if foreign:
        raise FolderError(f"{folder.path} holds files that are not its samples: {', '.join(foreign[:5])}.")
    missing = [i for i in range(n) if not folder.finished(i, chash)]  # checks every PNG (whole, this config)
    if missing:
        raise FolderError(f"{folder.path}: {len(missing)} of {n} samples are missing (first: {missing[0]}); "
                          "finish them with the same `emag sample` command first.")
    extractor = extractor or default_extractor(manifest["config"]["protocol"])
    start = time.perf_counter()
    ref = reference_of(extractor, None if cache_dir is None else Path(cache_dir))
    local: dict[int, dict[str, np.ndarray]] = {}
    stats = StreamingStats(ref.features.shape[1])
    for batch in ranks.batches(n, batch_size):
        images = np.stack([folder.load(i) for i in batch])
        if images.ndim == 3:
            images = images[..., None]
        out_b = extractor(images)
        stats.add(out_b["features"])
        for j, i in enumerate(batch):
            local[i] = {k2: np.asarray(v[j]) for k2, v in out_b.items()}
    stats = stats.reduce(ranks)
    per_sample = _gather(ranks, local)
    feats = np.stack([per_sample[i]["features"] for i in range(n)])
    mu, sigma = stats.mean_cov()
    values: dict[str, float] = {getattr(extractor, "fd_metric", "fd"): M.frechet_distance(ref.mu, ref.sigma, mu, sigma)}
    values.update(M.prdc(ref.features, feats, k=k))
    labels = np.array([line.get("label", -1) for line in index])
    if "logits" in per_sample[0] and (labels >= 0).all():
        predicted = np.stack([per_sample[i]["logits"] for i in range(n)]).argmax(axis=1)
        values["accuracy"] = M.classifier_accuracy(torch.from_numpy(predicted), torch.from_numpy(labels))
        diversity = _within_class_diversity(feats, labels)
        if np.isfinite(diversity):  # defined once a class has two samples
            values["diversity"] = diversity
    results = {
        "format": "emag-results/1", "folder": str(folder.path), "num_samples": n, "metrics": values,
        "extractor": {"name": extractor.name, "weights_sha256": extractor.fingerprint()},
        "reference": {"id": ref.id, "hash": ref.hash, "count": int(ref.features.shape[0])}, "prdc_k": k,
        "config_hash": chash, "config": manifest["config"], "versions": versions(),
        "seconds": time.perf_counter() - start, "processes": ranks.world,
    }
    if ranks.main:
        _atomic_write(folder.path / RESULTS,
                      lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n"))
        _atomic_write(folder.path / RESULTS_MD, lambda tmp: Path(tmp).write_text(markdown_row(results, header=True)))
    ranks.barrier()
    return results


def markdown_row(results: dict[str, Any], header: bool = False) -> str:
    """One Markdown table row: method, scales, sample count and every metric."""
    c = results["config"]
    scales = ", ".join(f"{t['method']} {t.get('scale')}" for t in c.get("guidance", []) if "scale" in t)
    names = sorted(results["metrics"])
    row = f"| {c.get('method')} | {scales} | {results['num_samples']} | " + \
        " | ".join(f"{results['metrics'][m]:.4f}" for m in names) + " |\n"
    if not header:
        return row
    return ("| method | scales | samples | " + " | ".join(names) + " |\n" +
            "|---|---|---|" + "---|" * len(names) + "\n" + row)
