"""scikit-learn's handwritten digits as a tiny image dataset for the bundled class-conditional DiT.

``sklearn.datasets.load_digits()`` ships with scikit-learn (no download): 1,797 grey-scale 8x8
images with integer intensities 0..16 and labels 0..9 (about 180 per class). :func:`load_images`
maps them to float32 tensors in [-1, 1] of shape ``[N, 1, 8, 8]`` (``x / 8 - 1``).

Resolution: the model works on the native 8x8 grid with ``patch_size=1`` (64 tokens, one pixel per
token). The alternative, bilinear upsampling to 16x16 with ``patch_size=2``, gives the same 64
tokens and the same transformer cost, but the upsampled images carry no information beyond the 8x8
ones: the model would also have to learn the interpolation (4 strongly correlated outputs per
token), which costs training time for no gain in content. On 8x8 the data set and everything measured on it (the
classifier, the reference statistics) stay in the images' own space, with no resampling choice to
document or get wrong. (The 16x16 variant was not trained for comparison; the 8x8 recipe reaches
clean, class-correct samples in about 2,000 steps, see ``train_config.json``.) For display,
:func:`image_grid` enlarges samples with nearest-neighbour pixels.

Splits: the generative model trains on all 1,797 images, and the metrics' reference set is the
whole real data set (it is what the model is asked to reproduce; a held-out part of 360 images
would make the statistics of the 64-dimensional classifier features noisy). The classifier that
provides features and accuracies is trained on a fixed, seeded, class-stratified split
(:func:`train_heldout_split`) so that its reported accuracy is measured on images it never saw.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

NUM_CLASSES = 10
IMAGE_SIZE = 8
MAX_INTENSITY = 16.0
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw data set: images ``uint8 [N, 8, 8]`` with values 0..16 and labels ``int64 [N]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.uint8), bunch.target.astype(np.int64)


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Intensities 0..16 (``[N, 8, 8]`` or ``[N, 1, 8, 8]``) -> float32 ``[N, 1, 8, 8]`` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() == 3:
        x = x[:, None]
    return x / (MAX_INTENSITY / 2) - 1.0


def load_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images float32 ``[N, 1, 8, 8]`` in [-1, 1] and labels int64 ``[N]``."""
    images, labels = load_arrays()
    return to_model_range(images), torch.as_tensor(labels)


def train_heldout_split(labels: np.ndarray | torch.Tensor, heldout_fraction: float = 0.2,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, class-stratified split: ``(train_indices, heldout_indices)``, both sorted.

    In every class a fraction ``heldout_fraction`` (rounded) of the images, chosen by a permutation
    drawn from ``numpy.random.default_rng(seed)``, goes to the held-out part. Deterministic for a
    given ``(labels, heldout_fraction, seed)`` on every platform.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    heldout = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_held = int(round(heldout_fraction * len(idx)))
        heldout.append(idx[rng.permutation(len(idx))[:n_held]])
    held = np.sort(np.concatenate(heldout))
    train = np.setdiff1d(np.arange(len(labels)), held)
    return train, held


def image_grid(images: torch.Tensor, nrow: int, scale: int = 8, pad: int = 1, value_range=(0.0, 1.0)):
    """A PIL grid of ``[N, 1, H, W]`` images (row-major, ``nrow`` images per row), each pixel enlarged
    ``scale`` times (nearest neighbour), ``pad`` grid lines of mid grey between images."""
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)[:, 0]
    n, h, w = x.shape
    ncol = nrow
    rows = (n + ncol - 1) // ncol
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = np.full((rows * cell_h + pad, ncol * cell_w + pad), 128, dtype=np.uint8)
    big = x.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
    for k in range(n):
        r, c = divmod(k, ncol)
        y0, x0 = pad + r * cell_h, pad + c * cell_w
        canvas[y0:y0 + h * scale, x0:x0 + w * scale] = np.round(big[k] * 255).astype(np.uint8)
    return Image.fromarray(canvas, mode="L")
