"""Throughput of `emag sample` per method on the bundled digits model, and of `emag score`.

Samples ``--num-samples`` digits per method into fresh folders (one process, ``--batch-size`` per call),
scores each folder with the digits classifier (after an untimed warm-up run that also caches the
reference statistics), and, when torch-fidelity is installed, times the Inception
network on the same images (random weights: the speed is the architecture's). Prints samples/s.

    python benchmarks/eval_throughput.py --num-samples 500 --batch-size 50
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from emag.evaluation import plan_sampling, run_sampling
from emag.evaluation.folder import SampleFolder
from emag.evaluation.scoring import score_folder

METHODS = {
    "cfg": dict(method="cfg"),
    "emag (cfg + emag full)": dict(method="emag"),
    "emag-q": dict(method="emag", emag_overrides={"variant": "q"}),
    "cfg + pag": dict(method="cfg,pag", method_params={"pag": {"layers": "4"}}),
}


def inception_speed(images: np.ndarray) -> float | None:
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as fe
    except ImportError:
        return None
    from emag.evaluation.networks import InceptionExtractor

    load, url = fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url
    fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, strict=True: None
    fe.load_state_dict_from_url = lambda *a, **k: {}
    try:
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])
    finally:
        fe.FeatureExtractorInceptionV3.load_state_dict, fe.load_state_dict_from_url = load, url
    net = InceptionExtractor(model=model)
    net(images[:2])
    t = time.perf_counter()
    for start in range(0, len(images), 32):
        net(images[start:start + 32])
    return len(images) / (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--inception-images", type=int, default=64)
    args = ap.parse_args(argv)
    print(f"# emag sample / score throughput, bundled digits model, {args.num_samples} samples, batches of "
          f"{args.batch_size}, 1 process (sampling on the plan's CPU threads: 1 for the bundled model; scoring on "
          f"{torch.get_num_threads()}), {platform.machine()}, torch {torch.__version__}")
    print("| method | sampling samples/s | scoring (digits classifier) samples/s |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm-up"  # untimed: first imports and loads, the cached reference statistics
        run_sampling(plan_sampling(None, "digits", num_samples=args.batch_size if args.batch_size % 10 == 0 else 10,
                                   batch_size=args.batch_size, method="cfg"), warm)
        score_folder(warm, cache_dir=Path(tmp) / "cache")
        last = None
        for name, kw in METHODS.items():
            plan = plan_sampling(None, "digits", num_samples=args.num_samples, batch_size=args.batch_size, **kw)
            out = Path(tmp) / name.replace(" ", "_")
            summary = run_sampling(plan, out)
            t = time.perf_counter()
            score_folder(out, cache_dir=Path(tmp) / "cache")
            score_rate = args.num_samples / (time.perf_counter() - t)
            print(f"| {name} | {summary.samples_per_second:.1f} | {score_rate:.0f} |")
            last = out
        folder = SampleFolder(last)
        images = np.stack([folder.load(i) for i in range(args.inception_images)])  # the extractor makes them RGB
        rate = inception_speed(images)
        print(f"\nInception-v3 features (torch-fidelity, 299x299 after resizing): "
              f"{'not installed' if rate is None else f'{rate:.1f} images/s'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
