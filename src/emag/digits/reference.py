"""A fixed, cheap generation protocol for the bundled digits DiT, and statistics of its output.

Used by ``scripts/make_digits_reference_stats.py`` (which writes
``emag/assets/digits-dit/reference_stats.json``) and by ``tests/test_digits.py`` (which regenerates
the samples and compares). Regenerate the file whenever the bundled model changes.
"""

from __future__ import annotations

from typing import Any

import torch

from ..guidance.emag import EMAG
from . import DEFAULT_EMAG_LAYERS, NUM_CLASSES
from .classifier import predict

PROTOCOL: dict[str, Any] = {
    "seeds": [0, 1],                    # one batch of the 10 classes per seed
    "class_labels": list(range(NUM_CLASSES)),
    "num_inference_steps": 10,
    "guidance_scale": 3.0,
    "emag": {"scale": 2.0, "layers": list(DEFAULT_EMAG_LAYERS), "ema_window": [0.0, 1.0], "apply_window": [0.2, 1.0]},
}


def protocol_emag(protocol: dict[str, Any] = PROTOCOL):
    e = protocol["emag"]
    return EMAG(scale=e["scale"], layers=list(e["layers"]), ema_window=tuple(e["ema_window"]),
                apply_window=tuple(e["apply_window"]))


@torch.no_grad()
def generate(pipe, seeds, class_labels, num_inference_steps: int, guidance_scale: float, emag=None) -> torch.Tensor:
    """Images ``[len(seeds) * len(class_labels), 1, 8, 8]`` in [0, 1]: for each seed one batch of
    ``class_labels``, with ``torch.Generator().manual_seed(seed)``."""
    out = []
    for seed in seeds:
        out.append(pipe(class_labels=list(class_labels), num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                        output_type="pt", emag=emag).images)
    return torch.cat(out).float().cpu()


def reference_samples(pipe, with_emag: bool = False, protocol: dict[str, Any] = PROTOCOL) -> torch.Tensor:
    """The protocol's samples (CFG, or CFG + EMAG with the protocol's EMAG settings)."""
    return generate(pipe, protocol["seeds"], protocol["class_labels"], protocol["num_inference_steps"],
                    protocol["guidance_scale"], protocol_emag(protocol) if with_emag else None)


def sample_statistics(images: torch.Tensor, classifier=None) -> dict[str, Any]:
    """Summary numbers of ``[N, 1, 8, 8]`` images in [0, 1]: per-image means, overall mean/std, the
    mean image (64 values), and the digit classifier's predictions."""
    x = images.double()
    return {
        "num_images": int(x.shape[0]),
        "pixel_mean": float(x.mean()),
        "pixel_std": float(x.std()),
        "image_means": [round(float(v), 6) for v in x.mean(dim=(1, 2, 3))],
        "mean_image": [round(float(v), 6) for v in x.mean(dim=0).reshape(-1)],
        "predicted_classes": [int(c) for c in predict(images, value_range=(0.0, 1.0), classifier=classifier)],
    }
