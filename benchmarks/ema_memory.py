"""Bytes held by EMAG's state at real model sizes: dense full maps, factored (past Q, K) and EMAG-Q.

Pure arithmetic from the published configurations and the reference windows (no model is built), so it
runs anywhere in a second:

    python benchmarks/ema_memory.py

- dense:    candidates x rows x H x N_i x N_k x bytes(EMA dtype) (the reference also holds one
            layer's full |E - R| while a block is fed; we feed and score by chunks of heads);
- factored: candidates x stored updates x rows x H x (N_i + N_k) x d x bytes(model dtype);
- q:        candidates x rows x H x N_i x d x bytes(EMA dtype).

Transients of one intercepted call (one branch's live map, freed after the call) are not counted.
"rows" are the EMA rows: 2B on SD3 (the reference's doubled perturbed batch), B on DiT. Stored updates
per row: the EMA steps of the schedule (SD3), twice that on DiT (cond, then uncond feed).
"""

from __future__ import annotations

import torch

import emag
from emag.guidance.emag import resolve
from emag.windows import window_steps

GiB = 2**30

CASES = [
    # label, family, blocks, heads, head dim, image tokens, text tokens, steps, batch, model dtype
    ("SD3-Medium 1024 px", "sd3", 24, 24, 64, 4096, 333, 28, 1, torch.float16),
    ("SD3-Medium 1024 px", "sd3", 24, 24, 64, 4096, 333, 28, 4, torch.float16),
    ("SD3-Medium 1024 px, 50 steps", "sd3", 24, 24, 64, 4096, 333, 50, 1, torch.float16),
    ("SD3-Medium 2048 px", "sd3", 24, 24, 64, 16384, 333, 28, 1, torch.float16),
    ("DiT-XL/2 256 px", "dit", 28, 16, 72, 256, 0, 250, 1, torch.float16),
    ("DiT-XL/2 512 px", "dit", 28, 16, 72, 1024, 0, 250, 1, torch.float16),
]


def sizes(family, blocks, heads, d, n_img, n_txt, steps, batch, dtype):
    cfg = resolve(emag.EMAG(), family, blocks)
    ema_bytes = torch.empty((), dtype=cfg.ema_dtype).element_size()
    model_bytes = torch.empty((), dtype=dtype).element_size()
    n_k = n_img + n_txt
    rows = 2 * batch if family == "sd3" else batch
    updates = len(window_steps(cfg.ema_window, steps)) * (1 if family == "sd3" else 2)
    layers = len(cfg.layers)
    dense_layer = rows * heads * n_img * n_k * ema_bytes
    dense = layers * dense_layer
    factored = layers * updates * rows * heads * (n_img + n_k) * d * model_bytes
    q = layers * rows * heads * n_img * d * ema_bytes
    return updates, dense, factored, q


def main() -> int:
    print("| case | batch | steps | stored updates/row | dense GiB | factored GiB | EMAG-Q GiB | factored / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for label, family, blocks, heads, d, n_img, n_txt, steps, batch, dtype in CASES:
        updates, dense, factored, q = sizes(family, blocks, heads, d, n_img, n_txt, steps, batch, dtype)
        print(f"| {label} | {batch} | {steps} | {updates} | {dense / GiB:.2f} | {factored / GiB:.2f} | "
              f"{q / GiB:.3f} | {factored / dense:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
