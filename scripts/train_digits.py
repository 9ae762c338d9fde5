#!/usr/bin/env python
"""Train the bundled class-conditional digits DiT (scikit-learn's 8x8 digits, pixel space).

    python scripts/train_digits.py                       # recipe: src/emag/digits/train_config.json
    python scripts/train_digits.py --out /tmp/digits-dit --steps 300   # quick experiments

Writes, into ``--out`` (default: the package's ``emag/assets/digits-dit``): the pipeline saved with
``emag.DiTEMAGPipeline.save_pretrained`` (EMA weights, safetensors; DDIM scheduler; id2label),
``train_log.json`` (recipe, versions, time, final losses), ``losses.csv`` (loss per step),
``loss_curve.png`` and ``samples.png`` (one row per class, CFG 3, 50 DDIM steps).

Objective: epsilon prediction, MSE, uniform timesteps over the 1000-step linear schedule
(betas 1e-4..0.02, as DiT). Labels are replaced by the null class 10 with probability
``class_dropout_prob`` (one draw per sample, shared by all blocks; see ``emag/digits/model.py``).
AdamW with warm-up and cosine decay, gradient clipping, an EMA of the weights (the EMA is saved).
The saved DDIM sampler does not clip x0 (see ``emag/digits/model.py``).

Seeded and reproducible bit for bit for a given thread count on a given machine (the thread count
changes float rounding). The bundled weights were made with ``--threads 1`` (recorded in
``train_log.json``): 2,000 steps in ~10 min (0.28-0.30 s per step) on one core of a 2-core machine
that another process kept busy. With 2 idle cores the default (2 threads) was measured at 0.38 s
per step at batch 128 (2x the batch), so ~0.2 s per step, ~7 min, is expected (not measured on an
idle machine). Do not oversubscribe: 2 torch threads on 2 cores that another process is using ran
~25x slower than 1 thread here (7 s per step).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import pathlib
import platform
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import diffusers  # noqa: E402

from emag.digits import ID2LABEL, NULL_CLASS, bundled_model_path  # noqa: E402
from emag.digits.data import image_grid, load_images  # noqa: E402
from emag.digits.model import (  # noqa: E402
    build_transformer,
    disable_builtin_label_dropout,
    drop_labels,
    lr_at,
    make_scheduler,
    train_config,
)
from emag.pipelines import DiTEMAGPipeline  # noqa: E402  (imported up front: fail before training, not after)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, default=None, help="output folder (default: the bundled asset folder)")
    p.add_argument("--config", type=pathlib.Path, default=None, help="a recipe JSON (default: the committed one)")
    p.add_argument("--steps", type=int, default=None, help="override the number of optimisation steps")
    p.add_argument("--threads", type=int, default=None,
                   help="override num_threads (e.g. 1 when another process is using the CPU: oversubscribed "
                        "torch threads slow down by an order of magnitude)")
    return p.parse_args()


def plot_losses(losses: list[float], path: pathlib.Path, window: int = 50) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    loss = np.asarray(losses)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(np.arange(1, len(loss) + 1), loss, lw=0.6, alpha=0.35, color="tab:blue", label="per step")
    if len(loss) >= window:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(loss) + 1), smooth, lw=1.6, color="tab:blue", label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.set_title("digits DiT training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    cfg = json.loads(args.config.read_text()) if args.config else train_config()
    tcfg = dict(cfg["train"])
    if args.steps is not None:
        tcfg["steps"] = args.steps
    out = args.out or bundled_model_path()
    out.mkdir(parents=True, exist_ok=True)

    if args.threads is not None:
        cfg["num_threads"] = args.threads
    torch.set_num_threads(cfg["num_threads"])
    seed = cfg["seed"]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    images, labels = load_images()
    n = images.shape[0]
    model = build_transformer(cfg["model"], seed=seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    found = disable_builtin_label_dropout(model)
    assert found == cfg["model"]["num_layers"], found

    ns = cfg["noise_schedule"]
    betas = torch.linspace(ns["beta_start"], ns["beta_end"], ns["num_train_timesteps"], dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    sqrt_ab = alphas_cumprod.sqrt().float()
    sqrt_1mab = (1 - alphas_cumprod).sqrt().float()

    opt = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], betas=tuple(tcfg["betas"]),
                            weight_decay=tcfg["weight_decay"])
    bs, steps = tcfg["batch_size"], tcfg["steps"]
    losses, lrs = [], []
    perm, pos = torch.randperm(n, generator=gen), 0
    t0 = time.time()
    for step in range(steps):
        if pos + bs > n:  # new epoch: reshuffle, drop the incomplete tail
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        x0, y = images[idx], labels[idx]
        y = drop_labels(y, NULL_CLASS, tcfg["class_dropout_prob"], gen)
        t = torch.randint(0, ns["num_train_timesteps"], (bs,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = sqrt_ab[t].view(-1, 1, 1, 1) * x0 + sqrt_1mab[t].view(-1, 1, 1, 1) * eps
        lr = lr_at(step, tcfg["lr"], tcfg["warmup_steps"], steps, tcfg["min_lr_fraction"])
        for group in opt.param_groups:
            group["lr"] = lr
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip_norm"])
        opt.step()
        # EMA with the usual warm-up of the decay, min(decay, (1 + k) / (10 + k))
        decay = min(tcfg["ema_decay"], (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(loss.detach()))
        lrs.append(lr)
        if step % 100 == 0 or step == steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            print(f"step {step:5d}  loss {recent:.4f}  lr {lr:.2e}  {time.time() - t0:6.1f}s", flush=True)
    train_seconds = time.time() - t0

    scheduler = make_scheduler(ns, cfg["sampler"])
    pipe = DiTEMAGPipeline(transformer=ema, vae=None, scheduler=scheduler, id2label=ID2LABEL)
    pipe.save_pretrained(str(out), safe_serialization=True)

    with open(out / "losses.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "lr"])
        for i, (l, r) in enumerate(zip(losses, lrs)):
            w.writerow([i, f"{l:.6f}", f"{r:.6g}"])
    plot_losses(losses, out / "loss_curve.png")

    pipe.set_progress_bar_config(disable=True)
    classes = [c for c in range(10) for _ in range(10)]
    samples = pipe(class_labels=classes, num_inference_steps=50, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(0), output_type="pt").images
    image_grid(samples, nrow=10, scale=6).save(out / "samples.png")

    log = {
        "recipe": cfg | {"train": tcfg},
        "train_seconds": round(train_seconds, 1),
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
        "num_parameters": sum(p.numel() for p in ema.parameters()),
        "dataset": {"name": "sklearn.datasets.load_digits", "num_images": n, "range": "[-1, 1] = x / 8 - 1"},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": platform.python_version()},
        "machine": {"processor": platform.processor() or platform.machine(), "threads": cfg["num_threads"]},
    }
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"trained {steps} steps in {train_seconds:.0f}s; saved to {out}")


if __name__ == "__main__":
    main()
