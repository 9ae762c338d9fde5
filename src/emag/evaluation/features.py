"""Feature extractors for scoring, behind one interface.

An extractor maps a batch of uint8 images ``[N, H, W, C]`` to named arrays (``"features"`` ``[N, D]``,
optionally ``"logits"``), says what it is (``name``) and which weights it ran (``fingerprint``), and
gives the reference set it is compared with. The digits extractor (the bundled classifier) is the one
every CPU can run; tests inject small random extractors through the same interface.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np
import torch

from ..digits.classifier import load_classifier
from ..digits.data import MAX_INTENSITY, load_arrays


class Extractor(Protocol):
    name: str

    def fingerprint(self) -> str:
        """sha256 of the weights the extractor runs (recorded with every result)."""

    def __call__(self, images: np.ndarray, conditions=None) -> dict[str, np.ndarray]:
        """uint8 ``[N, H, W, C]`` (and each image's prompt or label) -> ``{"features": [N, D], ...}``."""

    def reference(self) -> tuple[str, np.ndarray]:
        """An id of the reference set and its uint8 images ``[M, H, W, C]``."""


class DigitsExtractor:
    """The bundled digit classifier: penultimate features and class logits; reference: the 1,797 real
    digits of scikit-learn's data set (docs/digits.md section 3)."""

    name = "digits-classifier"

    def __init__(self, classifier=None) -> None:
        self.classifier = classifier if classifier is not None else load_classifier()

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k, v in sorted(self.classifier.state_dict().items()):
            h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    @torch.no_grad()
    def __call__(self, images: np.ndarray, conditions=None) -> dict[str, np.ndarray]:
        x = torch.as_tensor(np.asarray(images)).float()
        x = x.mean(dim=-1) if x.dim() == 4 else x  # grey: the channels are equal
        x = x[:, None] / 127.5 - 1.0
        model = self.classifier
        return {"features": model.features(x).double().numpy(), "logits": model(x).double().numpy()}

    def reference(self) -> tuple[str, np.ndarray]:
        images, _ = load_arrays()
        # intensities 0..16 -> 0..255, as a sample PNG stores [0, 1]
        u8 = np.rint(images.astype(np.float64) / MAX_INTENSITY * 255.0).astype(np.uint8)
        return "sklearn-digits-1797", u8[..., None]
