"""The standard scoring networks, through the libraries made for them (optional dependencies: install
``emag[eval]``): torch-fidelity's TF-exact Inception-v3 (FID, sFID, IS, KID, precision / recall), and
open_clip for HPS v2.1 and CLIPScore (docs/eval.md section 4).

Each network implements the extractor interface of :mod:`.features`: ``net(images, conditions)`` with
uint8 ``[N, H, W, C]`` images returns named per-sample arrays.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .provenance import sha256

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _rgb_nchw(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dim() == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = x.expand(*x.shape[:-1], 3)
    return x.permute(0, 3, 1, 2).contiguous()


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode() + v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class InceptionExtractor:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF FID network's weights, TF1-exact bilinear
    resize to 299 x 299 without antialiasing): pool3 ``features`` [N, 2048], ``logits_unbiased`` [N, 1008]
    (IS) and ``spatial`` [N, 2023] (sFID: the first 7 channels of Mixed_6d's 1x1 branch, 17 x 17)."""

    name = "inception-v3-tf"
    fd_metric = "fid"
    kid = True
    resize = "torch-fidelity TF1-exact bilinear to 299x299, no antialias"

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", model: torch.nn.Module | None = None):
        if model is None:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

            if weights is None:
                raise ValueError("InceptionExtractor needs the weights file (see emag.evaluation.weights.INCEPTION).")
            model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=str(weights))
        self.model = model.to(device).eval()
        self.device = device
        self._weights = Path(weights) if weights is not None else None
        self._fingerprint: str | None = None
        self._spatial: list[torch.Tensor] = []
        self.model.Mixed_6d.branch1x1.register_forward_hook(lambda m, a, out: self._spatial.append(out[:, :7]))

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = sha256(self._weights) if self._weights is not None else _state_hash(self.model)
        return self._fingerprint

    @torch.no_grad()
    def __call__(self, images: np.ndarray, conditions=None) -> dict[str, np.ndarray]:
        self._spatial.clear()
        pool, logits = self.model(_rgb_nchw(images).to(self.device))
        spatial = self._spatial.pop().flatten(1)
        return {"features": pool.double().cpu().numpy(), "logits_unbiased": logits.double().cpu().numpy(),
                "spatial": spatial.double().cpu().numpy()}


class CLIPScorer:
    """Image-text scores with an open_clip model: HPS v2.1 (``kind="hps"``: ViT-H-14 with the HPS v2.1
    checkpoint, score = cosine(image, text), hpsv2's preprocessing: ToTensor, Resize(224, bicubic) on the
    tensor, CenterCrop(224), Normalize(CLIP mean / std)) or CLIPScore (``kind="clip_score"``: 100 * max(cos, 0),
    OpenAI ViT-L/14 by default, open_clip's own preprocessing)."""

    fd_metric = None
    kid = False

    def __init__(self, kind: str, weights: str | Path | None, model_name: str | None = None, device: str = "cpu",
                 random_weights: bool = False):
        import open_clip

        if kind not in ("hps", "clip_score"):
            raise ValueError(f"Unknown CLIP score {kind!r}; expected 'hps' or 'clip_score'.")
        self.kind, self.name = kind, kind
        self.model_name = model_name or ("ViT-H-14" if kind == "hps" else "ViT-L-14")
        if weights is None and not random_weights:
            raise ValueError(f"{kind} needs its weights file (see emag.evaluation.weights).")
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.model_name, pretrained=None if random_weights else str(weights), device=device)
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.preprocess = self._hps_preprocess() if kind == "hps" else preprocess
        self.device = device
        self._weights = None if random_weights else Path(weights)
        self._fingerprint: str | None = None

    @staticmethod
    def _hps_preprocess():
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                          T.Normalize(OPENAI_MEAN, OPENAI_STD)])

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = sha256(self._weights) if self._weights is not None else _state_hash(self.model)
        return self._fingerprint

    @torch.no_grad()
    def __call__(self, images: np.ndarray, conditions) -> dict[str, np.ndarray]:
        if not conditions or not isinstance(conditions[0], str):
            raise ValueError(f"{self.kind} scores images against their prompts; this sample set has class labels.")
        pixels = torch.stack([self.preprocess(Image.fromarray(np.asarray(im).squeeze()).convert("RGB")) for im in images])
        img = self.model.encode_image(pixels.to(self.device))
        txt = self.model.encode_text(self.tokenizer(list(conditions)).to(self.device))
        cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
        score = cos if self.kind == "hps" else 100.0 * cos.clamp(min=0)
        return {self.kind: score.cpu().numpy()}

    def describe(self) -> dict[str, Any]:
        return {"name": self.kind, "model": self.model_name, "weights_sha256": self.fingerprint()}
