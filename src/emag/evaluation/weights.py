"""The weight files of the scoring networks: where they are looked for, and a clear error before any work.

None of the metric libraries verifies a hash, and all of them try to download on first use (offline:
a raw ``URLError``, or a hang behind a firewall). Here each file is looked for in ``--weights-dir`` (or
``$EMAG_WEIGHTS_DIR``) and in the library's own cache, and checked (sha256) before anything runs
(docs/eval.md section 4).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .provenance import sha256


@dataclass(frozen=True)
class WeightFile:
    name: str  # file name
    what: str  # what it is, for messages
    how: str  # how to get it
    sha256_prefix: str | None = None  # the file's sha256 starts with this (torch hub's naming convention)
    also: tuple[str, ...] = ()  # other places (relative to the weights folder or absolute) it may be found


INCEPTION = WeightFile(
    "weights-inception-2015-12-05-6726825d.pth", "TF-Inception-v3 features (torch-fidelity's port of the FID network)",
    "download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    sha256_prefix="6726825d")
HPS_V21 = WeightFile(
    "HPS_v2.1_compressed.pt", "the HPS v2.1 checkpoint (open_clip ViT-H-14)",
    "hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir WEIGHTS_DIR")
CLIP_L14 = WeightFile(
    "open_clip_pytorch_model.bin", "OpenAI CLIP ViT-L/14 in open_clip's format (CLIPScore)",
    "hf download timm/vit_large_patch14_clip_224.openai open_clip_pytorch_model.bin "
    "--local-dir WEIGHTS_DIR/vit_large_patch14_clip_224.openai",
    also=("vit_large_patch14_clip_224.openai/open_clip_pytorch_model.bin",))


def weights_dir(given: str | os.PathLike | None = None) -> Path | None:
    d = given or os.environ.get("EMAG_WEIGHTS_DIR")
    return Path(d) if d else None


def _torch_hub_checkpoints() -> Path:
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def locate(file: WeightFile, folder: str | os.PathLike | None = None) -> Path:
    """The checked path of ``file``; ``FileNotFoundError`` naming the file, the places looked in and how
    to get it, or ``ValueError`` when its hash is wrong."""
    base = weights_dir(folder)
    candidates = []
    if base is not None:
        candidates += [base / file.name] + [base / a for a in file.also]
    candidates.append(_torch_hub_checkpoints() / file.name)
    for p in candidates:
        if p.is_file():
            if file.sha256_prefix and not sha256(p).startswith(file.sha256_prefix):
                raise ValueError(f"{p} is not {file.what}: its sha256 does not start with {file.sha256_prefix} (a "
                                 f"partial or different download). Get it again: {file.how}.")
            return p
    where = ", ".join(str(c) for c in candidates)
    hint = file.how.replace("WEIGHTS_DIR", str(base) if base is not None else "WEIGHTS_DIR")
    raise FileNotFoundError(f"{file.what} is needed: {file.name} was not found (looked in: {where}). {hint}, and pass "
                            "its folder with --weights-dir (or set EMAG_WEIGHTS_DIR).")
