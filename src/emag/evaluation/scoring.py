"""``emag score``: metrics of a sample folder, sharded like sampling, recorded with their provenance.

Every process extracts the features of its share of the images (the batches of :mod:`.distributed`);
Gaussian statistics are float64 streaming sums added across processes; the per-sample arrays (for
precision / recall / density / coverage and the classifier metrics) are gathered in index order on the
main process, which computes the metrics with :mod:`emag.metrics` and writes ``results.json`` and a
Markdown row ``results.md`` into the folder. Reference statistics are computed once per (extractor
weights, reference set) and cached (docs/eval.md section 4).
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from .. import metrics as M
from ..io import atomic_write
from .distributed import Ranks
from . import weights as W
from .features import DigitsExtractor, Extractor
from .folder import FolderError, SampleFolder
from .networks import CLIPScorer, InceptionExtractor
from .provenance import config_hash, sha256, versions

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
    """What samples are compared with: per-image features (precision / recall, KID) and Gaussian
    statistics (FID; ``mu_s`` / ``sigma_s``: sFID, when the reference batch has them)."""

    id: str
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    hash: str = ""
    policy: str = ""
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))


def _center_crop_resize(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
        return np.asarray(im)


def reference_images(source: str | Path | None, extractor: Extractor, size: int = 512) -> tuple[str, np.ndarray, dict, str]:
    """(id, uint8 images, precomputed statistics, resize policy) of a reference: the extractor's own (None),
    an ADM reference batch (``.npz`` with ``arr_0`` and ``mu`` / ``sigma``, perhaps ``mu_s`` / ``sigma_s``), or a
    folder of images (centre-cropped to a square, Lanczos-resized to ``size``)."""
    if source is None:
        rid, images = extractor.reference()
        return rid, images, {}, "the extractor's reference set"
    source = Path(source)
    if source.suffix == ".npz":
        with np.load(source) as z:
            if "arr_0" not in z:
                raise ValueError(f"{source} has no arr_0 (reference images); expected an ADM reference batch.")
            stats = {k: np.asarray(z[k], dtype=np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in z}
            return f"{source.name}:{sha256(source)[:16]}", np.asarray(z["arr_0"]), stats, "ADM reference batch as stored"
    if source.is_dir():
        files = _image_files(source)
        if not files:
            raise ValueError(f"{source} holds no images (.png / .jpg / .jpeg / .webp).")
        images = np.stack([_center_crop_resize(f, size) for f in files])
        digest = config_hash({"files": [f.name for f in files], "sizes": [f.stat().st_size for f in files]})
        return (f"{source.name}:{len(files)}:{digest[:16]}", images, {},
                f"centre crop to a square, Lanczos resize to {size}x{size}")
    raise ValueError(f"Reference {source} is neither an .npz reference batch nor a folder of images.")


def reference_of(extractor: Extractor, cache_dir: Path | None, source: str | Path | None = None,
                 size: int = 512) -> Reference:
    """The reference's features and statistics for ``extractor``, computed once and cached per (extractor
    weights, reference)."""
    rid, images, stats, policy = reference_images(source, extractor, size)
    path = None
    if cache_dir is not None:
        key = config_hash({"extractor": extractor.name, "weights": extractor.fingerprint(), "reference": rid,
                           "policy": policy})
        path = Path(cache_dir) / f"reference-{extractor.name}-{key[:16]}.npz"
        if path.exists():
            with np.load(path) as z:
                extra = {k: z[k] for k in ("mu_s", "sigma_s") if k in z}
                return Reference(str(z["id"]), z["features"], z["mu"], z["sigma"], str(z["hash"]), str(z["policy"]), **extra)
    out = _extract(extractor, images, 64)
    feats = out["features"]
    if "mu" in stats and "sigma" in stats:
        mu, sigma = stats["mu"], stats["sigma"]
    else:
        acc = StreamingStats(feats.shape[1])
        acc.add(feats)
        mu, sigma = acc.mean_cov()
    extra = {k: stats[k] for k in ("mu_s", "sigma_s") if k in stats}
    h = config_hash({"id": rid, "mu": np.round(mu, 10).tolist(), "trace": float(np.trace(sigma)), "n": int(feats.shape[0])})
    ref = Reference(rid, feats, mu, sigma, h, policy, **extra)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _save(tmp, id=rid, features=feats, mu=mu, sigma=sigma, hash=h, policy=policy, **extra))
    return ref


def _save(tmp: str, **arrays: Any) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _extract(extractor: Extractor, images: np.ndarray, batch_size: int, conditions=None) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        conds = None if conditions is None else conditions[start:start + batch_size]
        for k, v in extractor(images[start:start + batch_size], conds).items():
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
    raise ValueError(f"Scoring the {protocol} protocol needs the Inception network: give its weights "
                     "(emag score --weights-dir, docs/eval.md section 4).")


def scoring_networks(folder: str | Path, reference, weights_dir, hps: bool, clip_score: bool, device: str = "cpu",
                     k: int | None = None) -> tuple[Extractor, tuple, int]:
    """The networks that score ``folder``'s protocol, every weight file located and checked first:
    digits -> the bundled classifier (k = 5); otherwise torch-fidelity's Inception (k = 3, the ADM
    evaluator's), plus HPS v2.1 and CLIPScore for text protocols; a reference is required then."""
    manifest = SampleFolder(folder).manifest()
    if manifest is None:
        raise FolderError(f"{folder} has no manifest.json: score a folder made by `emag sample`.")
    protocol = manifest["config"]["protocol"]
    if protocol == "digits":
        if reference is not None:
            raise ValueError("The digits protocol is scored against the bundled real digits; leave out --reference.")
        return DigitsExtractor(), (), 5 if k is None else k
    if reference is None:
        raise ValueError(f"Scoring the {protocol} protocol needs --reference: "
                         + ("the ADM reference batch VIRTUAL_imagenet256_labeled.npz." if protocol == "imagenet"
                            else "a folder of real images (COCO: val2014/)."))
    text = protocol in ("coco2014", "prompts")
    needed = ["torch_fidelity", "torchvision"] + (["open_clip"] if text and (hps or clip_score) else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"Scoring the {protocol} protocol needs {', '.join(missing)}: install the eval extra with a "
                         "matching torch / torchvision pair, e.g. pip install torch==2.14.1 torchvision==0.29.1 && pip "
                         "install -e '.[eval]' (README, Install).")
    files = [W.locate(W.INCEPTION, weights_dir)]
    if text and hps:
        files.append(W.locate(W.HPS_V21, weights_dir))
    if text and clip_score:
        files.append(W.locate(W.CLIP_L14, weights_dir))
    scorers = []
    if text and hps:
        scorers.append(CLIPScorer("hps", files[1], device=device))
    if text and clip_score:
        scorers.append(CLIPScorer("clip_score", files[-1], device=device))
    return InceptionExtractor(files[0], device=device), tuple(scorers), 3 if k is None else k


def _stack(per_sample: dict[int, dict[str, np.ndarray]], key: str, n: int) -> np.ndarray:
    return np.stack([per_sample[i][key] for i in range(n)])


def score_folder(out: str | Path, ranks: Ranks = Ranks(), extractor: Extractor | None = None,
                 cache_dir: str | Path | None = None, batch_size: int = 256, k: int = 5,
                 reference: str | Path | None = None, scorers: tuple = (), reference_size: int = 512,
                 kid_subset_size: int = 1000, is_splits: int = 10) -> dict[str, Any]:
    """Score the finished sample folder ``out`` (every process of the group calls it); returns the
    results (on every process) and, on the main one, writes them into the folder. ``extractor``: the
    feature network (default: the protocol's); ``scorers``: image-text scorers (HPS v2.1, CLIPScore);
    ``reference``: an ADM ``.npz`` or a folder of images (default: the extractor's own reference set)."""
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
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None and ranks.world > 1:  # the main process computes the reference once, the others read it
        if ranks.main:
            reference_of(extractor, cache, reference, reference_size)
        ranks.barrier()
    ref = reference_of(extractor, cache, reference, reference_size)
    conditions = [line.get("prompt", line.get("label")) for line in index]
    local: dict[int, dict[str, np.ndarray]] = {}
    stats = StreamingStats(ref.features.shape[1])
    spatial: StreamingStats | None = None
    for batch in ranks.batches(n, batch_size):
        images = np.stack([folder.load(i) for i in batch])
        if images.ndim == 3:
            images = images[..., None]
        conds = [conditions[i] for i in batch]
        out_b = dict(extractor(images, conds))
        for scorer in scorers:
            out_b.update(scorer(images, conds))
        stats.add(out_b["features"])
        if "spatial" in out_b and ref.mu_s is not None:
            spatial = spatial or StreamingStats(out_b["spatial"].shape[1])
            spatial.add(out_b.pop("spatial"))
        out_b.pop("spatial", None)
        for j, i in enumerate(batch):
            local[i] = {k2: np.asarray(v[j]) for k2, v in out_b.items()}
    stats = stats.reduce(ranks)
    if ref.mu_s is not None:
        spatial = (spatial or StreamingStats(ref.mu_s.shape[0])).reduce(ranks)
    per_sample = _gather(ranks, local)
    values = _metrics(extractor, ref, stats, spatial, per_sample, n, index, k, kid_subset_size, is_splits)
    results = {
        "format": "emag-results/1", "folder": str(folder.path), "num_samples": n, "metrics": values,
        "extractor": {"name": extractor.name, "weights_sha256": extractor.fingerprint(),
                      "resize": getattr(extractor, "resize", "")},
        "scorers": [s.describe() for s in scorers],
        "reference": {"id": ref.id, "hash": ref.hash, "count": int(ref.features.shape[0]), "policy": ref.policy},
        "prdc_k": k, "config_hash": chash, "config": manifest["config"],
        "versions": versions("torch-fidelity", "open_clip_torch", "torchvision"),
        "seconds": time.perf_counter() - start, "processes": ranks.world,
    }
    if ranks.main:
        atomic_write(folder.path / RESULTS,
                      lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n"))
        atomic_write(folder.path / RESULTS_MD, lambda tmp: Path(tmp).write_text(markdown_row(results, header=True)))
    ranks.barrier()
    return results


def _metrics(extractor, ref: Reference, stats: StreamingStats, spatial: StreamingStats | None,
             per_sample: dict[int, dict[str, np.ndarray]], n: int, index: list[dict], k: int, kid_subset_size: int,
             is_splits: int) -> dict[str, float]:
    """Every metric the extractor's outputs and the reference allow (docs/eval.md section 4)."""
    feats = _stack(per_sample, "features", n)
    mu, sigma = stats.mean_cov()
    values: dict[str, float] = {getattr(extractor, "fd_metric", "fd"): M.frechet_distance(ref.mu, ref.sigma, mu, sigma)}
    if spatial is not None and ref.mu_s is not None:
        values["sfid"] = M.frechet_distance(ref.mu_s, ref.sigma_s, *spatial.mean_cov())
    values.update(M.prdc(ref.features, feats, k=k))
    keys = per_sample[0].keys()
    if "logits_unbiased" in keys:
        from torch_fidelity.metric_isc import isc_features_to_metric

        isc = isc_features_to_metric(torch.from_numpy(_stack(per_sample, "logits_unbiased", n)), splits=is_splits)
        values["is"], values["is_std"] = isc["inception_score_mean"], isc["inception_score_std"]
    if getattr(extractor, "kid", False):
        from torch_fidelity.metric_kid import kid_features_to_metric

        size = min(kid_subset_size, n, ref.features.shape[0])
        kid = kid_features_to_metric(torch.from_numpy(ref.features), torch.from_numpy(feats), kid_subsets=100,
                                     kid_subset_size=size, kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=2020,
                                     verbose=False)
        values["kid"], values["kid_std"] = kid["kernel_inception_distance_mean"], kid["kernel_inception_distance_std"]
    for key in ("hps", "clip_score"):
        if key in keys:
            v = _stack(per_sample, key, n)
            scale = 100.0 if key == "hps" else 1.0  # HPS in tables: x100; CLIPScore is already 100 * cos
            values[key], values[f"{key}_median"] = float(v.mean() * scale), float(np.median(v) * scale)
    labels = np.array([line.get("label", -1) for line in index])
    if "logits" in keys and (labels >= 0).all():
        predicted = _stack(per_sample, "logits", n).argmax(axis=1)
        values["accuracy"] = M.classifier_accuracy(torch.from_numpy(predicted), torch.from_numpy(labels))
        diversity = _within_class_diversity(feats, labels)
        if np.isfinite(diversity):  # defined once a class has two samples
            values["diversity"] = diversity
    return values


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
