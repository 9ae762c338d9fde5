#!/usr/bin/env python
"""Train the digit classifier used for features and accuracies (emag.digits.classifier).

    python scripts/train_digits_classifier.py            # writes src/emag/assets/digits-classifier/

Seeded. Trains on the class-stratified 80 % split of scikit-learn's digits
(``train_heldout_split(labels, 0.2, seed=0)``), reports the accuracy on the held-out 20 % and
writes it, with the architecture and the recipe, into ``config.json`` next to ``model.safetensors``.
Augmentation: random shifts of up to one pixel (zero padding) and small Gaussian pixel noise, so
that the classifier does not depend on exact pixel values of generated samples.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from emag.digits.classifier import DEFAULT_ARCHITECTURE, DigitClassifier, bundled_classifier_path  # noqa: E402
from emag.digits.data import load_images, train_heldout_split  # noqa: E402
from emag.metrics import classifier_accuracy  # noqa: E402

RECIPE = {
    "seed": 0,
    "heldout_fraction": 0.2,
    "split_seed": 0,
    "epochs": 60,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 1e-4,
    "max_shift": 1,
    "pixel_noise_std": 0.05,
}


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by (dy, dx) in [-max_shift, max_shift]^2 with zero padding (background -1)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    shifts = torch.randint(0, 2 * p + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        out[i] = padded[i, :, dy:dy + h, dx:dx + w]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    out = args.out or bundled_classifier_path()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(RECIPE["seed"])
    gen = torch.Generator().manual_seed(RECIPE["seed"])

    images, labels = load_images()
    train_idx, held_idx = train_heldout_split(labels, RECIPE["heldout_fraction"], RECIPE["split_seed"])
    xt, yt = images[train_idx], labels[train_idx]
    xh, yh = images[held_idx], labels[held_idx]

    model = DigitClassifier(**DEFAULT_ARCHITECTURE)
    opt = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"])
    epochs, bs = RECIPE["epochs"], RECIPE["batch_size"]
    steps_per_epoch = (len(xt) + bs - 1) // bs
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=RECIPE["lr"], total_steps=epochs * steps_per_epoch)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * bs:(s + 1) * bs]
            x = random_shift(xt[idx], RECIPE["max_shift"], gen)
            x = x + RECIPE["pixel_noise_std"] * torch.randn(x.shape, generator=gen)
            loss = F.cross_entropy(model(x), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 10 == 9 or epoch == epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = classifier_accuracy(model(xh), yh)
            print(f"epoch {epoch + 1:3d}  train loss {total / len(xt):.4f}  held-out acc {acc:.4f}", flush=True)
    seconds = time.time() - t0

    model.eval()
    with torch.no_grad():
        heldout_acc = classifier_accuracy(model(xh), yh)
        train_acc = classifier_accuracy(model(xt), yt)
        per_class = {str(c): classifier_accuracy(model(xh[yh == c]), yh[yh == c]) for c in range(10)}

    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    config = {
        "architecture": DEFAULT_ARCHITECTURE,
        "input": "[N, 1, 8, 8] float32 in [-1, 1] (intensity / 8 - 1)",
        "split": {"function": "emag.digits.data.train_heldout_split", "heldout_fraction": RECIPE["heldout_fraction"],
                  "seed": RECIPE["split_seed"], "num_train": len(train_idx), "num_heldout": len(held_idx)},
        "heldout_accuracy": round(heldout_acc, 6),
        "heldout_accuracy_per_class": {k: round(v, 4) for k, v in per_class.items()},
        "train_accuracy": round(train_acc, 6),
        "recipe": RECIPE,
        "train_seconds": round(seconds, 1),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"held-out accuracy {heldout_acc:.4f} ({len(held_idx)} images), train {train_acc:.4f}; "
          f"{seconds:.0f}s; saved to {out}")


if __name__ == "__main__":
    main()
