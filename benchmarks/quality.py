"""Quality of every guidance method on the bundled digits DiT, measured with a digit classifier.

For a fixed set of seeds (one batch of the 10 classes per seed, identical initial noise for every
method) this generates with no guidance, CFG, EMAG (full / q, alone and with CFG), APG, CADS,
EMAG + APG, EMAG + CADS, PAG, SEG, SAG, ERG, S², SLG and TPG at a small sweep of scales, and scores each
setting in the feature space of the repository's digit classifier (emag.digits.classifier):

- FD: Fréchet distance between the features of the samples and of the 1,797 real digits;
- precision / recall / density / coverage (k = 5) against the real digits;
- accuracy: the classifier's agreement with the requested class;
- diversity: mean pairwise feature distance between samples of the same class (averaged over classes).

    python benchmarks/quality.py                       # ~200 samples per setting, ~10 min on 2 CPU cores
    python benchmarks/quality.py --reduced             # a smoke run (CI)

Results are cached per setting in the JSON file (``--out``), so an interrupted run resumes. A table
is printed and FD-vs-scale and accuracy-vs-scale plots are saved next to the JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

CFG_BASE = 2.0  # the CFG scale of the composed settings
EMAG_KW = dict(layers=(3, 4), ema_window=(0.0, 1.0), apply_window=(0.2, 1.0))


def settings(reduced: bool):
    """(method, scale, guidance terms) for every point of the sweep."""
    import emag
    from emag.guidance.erg import ERG
    from emag.guidance.s2 import S2
    from emag.guidance.sag import SAG
    from emag.guidance.seg import SEG
    from emag.guidance.tpg import TPG

    def sweep(values):
        return values[1:2] if reduced else values

    cfg = lambda: emag.CFG(CFG_BASE)  # noqa: E731
    out = [("none", 0.0, [])]
    out += [("cfg", w, [emag.CFG(w)]) for w in sweep([1.5, 2.0, 3.0, 4.0])]
    out += [("emag-full", s, [emag.EMAG(scale=s, combination="emag_only", **EMAG_KW)]) for s in sweep([1.5, 2.0, 3.0])]
    out += [("emag-q", s, [emag.EMAG(scale=s, variant="q", combination="emag_only", **EMAG_KW)])
            for s in sweep([1.5, 2.0, 3.0])]
    out += [("emag+cfg", s, [cfg(), emag.EMAG(scale=s, **EMAG_KW)]) for s in sweep([1.25, 1.5, 2.0])]
    out += [("apg", w, [emag.APG(scale=w)]) for w in sweep([2.0, 3.0, 4.0])]
    out += [("cads+cfg", w, [emag.CADS(), emag.CFG(w)]) for w in sweep([2.0, 3.0, 4.0])]
    out += [("emag+apg", s, [emag.APG(scale=3.0), emag.EMAG(scale=s, **EMAG_KW)]) for s in sweep([1.25, 1.5, 2.0])]
    out += [("emag+cads", s, [emag.CADS(), cfg(), emag.EMAG(scale=s, **EMAG_KW)]) for s in sweep([1.25, 1.5, 2.0])]
    out += [("pag+cfg", s, [cfg(), emag.PAG(s)]) for s in sweep([0.5, 1.0, 2.0])]
    out += [("seg+cfg", s, [cfg(), SEG(s)]) for s in sweep([0.5, 1.0, 2.0])]
    out += [("sag+cfg", s, [cfg(), SAG(s)]) for s in sweep([0.25, 0.5, 1.0])]
    out += [("erg", w, [ERG(scale=w)]) for w in sweep([1.5, 2.0, 3.0])]
    out += [("s2+cfg", s, [cfg(), S2(scale=s)]) for s in sweep([0.5, 1.0, 2.0])]
    out += [("slg+cfg", s, [cfg(), emag.SLG(s, window=(0.0, 1.0))]) for s in sweep([0.5, 1.0, 2.0])]
    out += [("tpg+cfg", s, [cfg(), TPG(s)]) for s in sweep([0.5, 1.0, 2.0])]
    return out


def key_of(method: str, scale: float, terms, seeds, steps) -> str:
    text = repr((method, scale, [repr(t) for t in terms], list(seeds), steps))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@torch.no_grad()
def generate(pipe, terms, seeds, steps) -> torch.Tensor:
    """[len(seeds) * 10, 1, 8, 8] in [0, 1]; seed s gives the initial noise of the batch of 10 classes."""
    images = []
    for s in seeds:
        latents = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(s))
        images.append(pipe(class_labels=list(range(10)), latents=latents, num_inference_steps=steps,
                           guidance_scale=1.0, guidance=list(terms), noise_layout="samples",
                           generator=torch.Generator().manual_seed(s), output_type="pt").images)
    return torch.cat(images).float()


def within_class_diversity(feats: torch.Tensor, labels: torch.Tensor) -> float:
    from emag.metrics import diversity

    vals = [diversity(feats[labels == c]) for c in labels.unique() if int((labels == c).sum()) > 1]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def score(images: torch.Tensor, labels: torch.Tensor, real_feats: torch.Tensor) -> dict:
    from emag.digits.classifier import features, predict
    from emag.metrics import classifier_accuracy, frechet_distance_from_features, prdc

    feats = features(images, value_range=(0.0, 1.0))
    out = {"fd": frechet_distance_from_features(real_feats, feats)}
    out.update(prdc(real_feats, feats, k=5))
    out["accuracy"] = classifier_accuracy(predict(images, value_range=(0.0, 1.0)), labels)
    out["diversity"] = within_class_diversity(feats, labels)
    return out


def plots(results: list[dict], folder: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for metric, label in (("fd", "Fréchet distance (classifier features), lower is better"),
                          ("accuracy", "classifier accuracy of the requested class")):
        fig, ax = plt.subplots(figsize=(9, 5.5))
        colors = plt.get_cmap("tab20").colors
        for i, method in enumerate(dict.fromkeys(r["method"] for r in results)):
            pts = sorted((r["scale"], r[metric]) for r in results if r["method"] == method)
            if method == "none":
                ax.axhline(pts[0][1], color="k", ls=":", label="no guidance")
            else:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^vD<>"[i % 7], color=colors[i % 20],
                        ls="-" if i % 2 else "--", label=method)
        ax.set_xlabel("scale of the method (CFG w, EMAG w_e, perturbation s; composed settings use CFG 2)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = folder / f"quality_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=20, help="batches of 10 classes (samples = 10 x seeds)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--reduced", action="store_true", help="2 seeds, 8 steps, one scale per method")
    ap.add_argument("--only", nargs="*", default=None, help="subset of method names")
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.reduced:
        args.seeds, args.steps = 2, 8
    from emag.digits import load_digits_pipeline
    from emag.digits.classifier import features
    from emag.digits.data import load_images

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = json.loads(out.read_text()) if out.is_file() else {}
    real, _ = load_images()
    real_feats = features(real, value_range=(-1.0, 1.0))
    pipe = load_digits_pipeline()
    seeds = list(range(1000, 1000 + args.seeds))
    labels = torch.arange(10).repeat(len(seeds))
    results = []
    for method, scale, terms in settings(args.reduced):
        if args.only and method not in args.only:
            continue
        key = key_of(method, scale, terms, seeds, args.steps)
        if key not in cache:
            t0 = time.perf_counter()
            images = generate(pipe, terms, seeds, args.steps)
            cache[key] = {"method": method, "scale": scale, "samples": len(labels), "steps": args.steps,
                          "seconds": time.perf_counter() - t0, **score(images, labels, real_feats)}
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            os.replace(tmp, out)  # finished settings survive an interruption
        results.append(cache[key])
    print(f"# bundled digits DiT, {len(labels)} samples per setting ({len(seeds)} seeds x 10 classes), "
          f"{args.steps} DDIM steps; metrics in the digit classifier's feature space vs the 1,797 real digits")
    print("| method | scale | FD | precision | recall | density | coverage | accuracy | diversity | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['scale']:g} | {r['fd']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | "
              f"{r['density']:.3f} | {r['coverage']:.3f} | {r['accuracy']:.3f} | {r['diversity']:.3f} | "
              f"{r['seconds']:.1f} |")
    for p in plots(results, out.parent):
        print(f"saved {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
