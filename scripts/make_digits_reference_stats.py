#!/usr/bin/env python
"""Write ``src/emag/assets/digits-dit/reference_stats.json`` for the bundled digits DiT.

    python scripts/make_digits_reference_stats.py               # reference statistics + quality table
    python scripts/make_digits_reference_stats.py --no-quality  # reference statistics only (seconds)

Regenerate whenever the bundled model (or the classifier) changes. Two parts:

- ``cfg`` / ``emag``: statistics of the fixed, cheap protocol of :mod:`emag.digits.reference`
  (2 seeds x 10 classes, 10 DDIM steps, CFG 3, without and with EMAG). ``tests/test_digits.py``
  regenerates these samples and compares within a tolerance.
- ``quality`` (informational, not tested): classifier accuracy, Fréchet distance of classifier
  features, precision/recall/density/coverage (k=5) and feature diversity of ``--per-class`` samples
  per class against the whole real data set, for a few guidance settings at ``--steps`` DDIM steps.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from emag import metrics  # noqa: E402
from emag import EMAG  # noqa: E402
from emag.digits import DEFAULT_EMAG_LAYERS, bundled_model_path, load_digits_pipeline  # noqa: E402
from emag.digits import classifier as digit_classifier  # noqa: E402
from emag.digits.data import load_images  # noqa: E402
from emag.digits.reference import PROTOCOL, generate, reference_samples, sample_statistics  # noqa: E402


def quality_table(pipe, per_class: int, steps: int, seed: int) -> dict:
    real, _ = load_images()
    real_features = digit_classifier.features(real)
    labels = [c for c in range(10) for _ in range(per_class)]
    emag_kw = dict(layers=list(DEFAULT_EMAG_LAYERS), ema_window=(0.0, 1.0), apply_window=(0.2, 1.0))
    settings = [
        ("no guidance", 1.0, None),
        ("CFG 2", 2.0, None),
        ("CFG 3", 3.0, None),
        ("EMAG 2 (no CFG)", 1.0, EMAG(scale=2.0, **emag_kw)),
        ("CFG 2 + EMAG 2", 2.0, EMAG(scale=2.0, **emag_kw)),
    ]
    rows = []
    for name, cfg_scale, emag_cfg in settings:
        t0 = time.time()
        images = generate(pipe, [seed], labels, steps, cfg_scale, emag_cfg)
        feats = digit_classifier.features(images, value_range=(0.0, 1.0))
        row = {
            "setting": name,
            "guidance_scale": cfg_scale,
            "emag": None if emag_cfg is None else {"scale": emag_cfg.scale, **{k: list(v) for k, v in emag_kw.items()}},
            "accuracy": metrics.classifier_accuracy(digit_classifier.predict(images, value_range=(0.0, 1.0)), labels),
            "frechet_distance": metrics.frechet_distance_from_features(real_features, feats),
            **metrics.prdc(real_features, feats, k=5),
            "diversity": metrics.diversity(feats),
        }
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        print(f"{name:18s} acc {row['accuracy']:.3f}  FD {row['frechet_distance']:7.2f}  P {row['precision']:.3f}  "
              f"R {row['recall']:.3f}  D {row['density']:.3f}  C {row['coverage']:.3f}  div {row['diversity']:.2f}  "
              f"({time.time() - t0:.0f}s)", flush=True)
    return {
        "num_samples": len(labels), "num_inference_steps": steps, "seed": seed,
        "reference": "all 1797 real digits", "features": "digit classifier penultimate layer",
        "real_diversity": round(metrics.diversity(real_features), 4),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=None, help="default: <bundled model>/reference_stats.json")
    ap.add_argument("--no-quality", action="store_true", help="skip the (slower) quality table")
    ap.add_argument("--per-class", type=int, default=100, help="quality table: samples per class")
    ap.add_argument("--steps", type=int, default=50, help="quality table: DDIM steps")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or bundled_model_path() / "reference_stats.json"

    pipe = load_digits_pipeline()
    result = {"protocol": PROTOCOL, "tolerance_note": "tests/test_digits.py compares image means, the mean image, pixel mean and std within 5e-4",
              "cfg": sample_statistics(reference_samples(pipe, with_emag=False)),
              "emag": sample_statistics(reference_samples(pipe, with_emag=True))}
    for key in ("cfg", "emag"):
        print(key, "predicted", result[key]["predicted_classes"])
    if not args.no_quality:
        result["quality"] = quality_table(pipe, args.per_class, args.steps, seed=1234)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
