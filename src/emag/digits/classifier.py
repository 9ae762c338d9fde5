"""A small CNN that recognises the 8x8 digits: class predictions and features for the metrics.

Architecture (input ``[N, 1, 8, 8]`` in [-1, 1], the DiT's data range)::

    conv3x3(1->32) SiLU  conv3x3(32->32) SiLU  maxpool2      -> [32, 4, 4]
    conv3x3(32->64) SiLU maxpool2                             -> [64, 2, 2]
    flatten  linear(256->64) SiLU                             -> features [N, 64]  (penultimate layer)
    dropout  linear(64->10)                                   -> logits

SiLU rather than ReLU keeps the features dense (no dead units), so their covariance is well
conditioned for Fréchet distances. Trained by ``scripts/train_digits_classifier.py`` on the seeded
stratified split of :func:`emag.digits.data.train_heldout_split`; the held-out accuracy is stored in
``emag/assets/digits-classifier/config.json``.

The module-level functions take images in ``value_range`` (default ``(-1, 1)``); pipeline outputs
(``output_type="pt"``) are in ``(0, 1)``: pass ``value_range=(0, 1)``.
"""

from __future__ import annotations

import json
import pathlib
from functools import lru_cache
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import assets_path

DEFAULT_ARCHITECTURE: dict[str, Any] = {"channels": [32, 32, 64], "feature_dim": 64, "num_classes": 10,
                                        "dropout": 0.2, "image_size": 8}


class DigitClassifier(nn.Module):
    def __init__(self, channels=(32, 32, 64), feature_dim: int = 64, num_classes: int = 10, dropout: float = 0.2,
                 image_size: int = 8):
        super().__init__()
        c1, c2, c3 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),
        )
        flat = c3 * (image_size // 4) ** 2
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(flat, feature_dim), nn.SiLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features ``[N, feature_dim]`` of images in [-1, 1]."""
        return self.embed(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def bundled_classifier_path() -> pathlib.Path:
    return assets_path() / "digits-classifier"


def read_config(folder: str | pathlib.Path | None = None) -> dict[str, Any]:
    """The classifier's ``config.json`` (architecture, split, held-out accuracy, training recipe)."""
    folder = pathlib.Path(folder) if folder is not None else bundled_classifier_path()
    return json.loads((folder / "config.json").read_text())


def load_classifier(folder: str | pathlib.Path | None = None, device="cpu") -> DigitClassifier:
    """The trained classifier (eval mode) from ``folder`` (default: the bundled one)."""
    folder = pathlib.Path(folder) if folder is not None else bundled_classifier_path()
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"No classifier in {folder}; train it with `python scripts/train_digits_classifier.py`.")
    model = DigitClassifier(**read_config(folder)["architecture"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval().requires_grad_(False).to(device)


@lru_cache(maxsize=1)
def _bundled() -> DigitClassifier:
    return load_classifier()


def _prepare(images: torch.Tensor, value_range) -> torch.Tensor:
    x = torch.as_tensor(images).float()
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"Expected grey-scale images [N, 1, H, W] (or [N, H, W]), got {tuple(x.shape)}.")
    lo, hi = value_range
    return (x - lo) / (hi - lo) * 2.0 - 1.0


@torch.no_grad()
def _batched(fn, images, value_range, classifier, batch_size):
    model = classifier if classifier is not None else _bundled()
    device = next(model.parameters()).device
    x = _prepare(images, value_range)
    outs = [fn(model, x[i:i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def features(images: torch.Tensor, value_range=(-1.0, 1.0), classifier: DigitClassifier | None = None,
             batch_size: int = 1024) -> torch.Tensor:
    """Penultimate-layer features ``[N, D]`` (float32) of ``[N, 1, 8, 8]`` images in ``value_range``."""
    return _batched(lambda m, x: m.features(x), images, value_range, classifier, batch_size)


def logits(images: torch.Tensor, value_range=(-1.0, 1.0), classifier: DigitClassifier | None = None,
           batch_size: int = 1024) -> torch.Tensor:
    """Class logits ``[N, 10]``."""
    return _batched(lambda m, x: m(x), images, value_range, classifier, batch_size)


def predict(images: torch.Tensor, value_range=(-1.0, 1.0), classifier: DigitClassifier | None = None,
            batch_size: int = 1024) -> torch.Tensor:
    """Predicted class ids ``[N]`` (int64)."""
    return logits(images, value_range, classifier, batch_size).argmax(dim=1)
