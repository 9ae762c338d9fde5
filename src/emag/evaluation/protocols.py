"""Evaluation sets: which condition (prompt or class) each sample index gets, for each protocol.

- ``coco2014``: ``captions_val2014.json``; one caption per image, the first seen in the file's
  ``annotations`` order, images in the order their first caption appears; the first N (the EMAG SD3
  protocol: 40,000).
- ``imagenet``: class ``i mod C`` for sample ``i`` (C classes, 1,000 for ImageNet): N/C samples per class
  when C divides N, and every prefix of the run as balanced as it can be.
- ``prompts``: a UTF-8 text file, one prompt per line (empty lines skipped), used in order and cycled.
- ``digits``: the bundled digits model's 10 classes, as ``imagenet``.

docs/eval.md section 1 gives the protocols' provenance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .provenance import sha256

PROTOCOLS = ("coco2014", "imagenet", "prompts", "digits")


@dataclass(frozen=True)
class EvalSet:
    """The conditions of an evaluation run: ``conditions[i]`` is sample ``i``'s prompt (str) or class (int)."""

    protocol: str
    conditions: tuple
    source: dict[str, Any]  # what the set was read from (path, sha256) or how it was made

    def __len__(self) -> int:
        return len(self.conditions)

    @property
    def text(self) -> bool:
        return bool(self.conditions) and isinstance(self.conditions[0], str)

    def record(self, index: int) -> dict[str, Any]:
        """The index line of sample ``index`` (without its seed and config hash)."""
        c = self.conditions[index]
        return {"index": index, "prompt": c} if isinstance(c, str) else {"index": index, "label": c}


def _count(num_samples: Any) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"--num-samples must be a positive integer, got {num_samples!r}.")
    return num_samples


def coco_captions(path: str | Path, num_samples: int) -> EvalSet:
    """The first ``num_samples`` captions of ``captions_val2014.json``, one per image (module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"COCO captions file {path} not found. Download annotations_trainval2014.zip from "
                         "https://cocodataset.org/#download and pass annotations/captions_val2014.json.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        annotations = data["annotations"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a COCO captions file (expected JSON with 'annotations'): {exc}") from None
    seen: set = set()
    captions: list[str] = []
    for ann in annotations:
        try:
            image, caption = ann["image_id"], ann["caption"]
        except (KeyError, TypeError):
            raise ValueError(f"{path}: an annotation without image_id / caption: {ann!r}") from None
        if image not in seen:
            seen.add(image)
            captions.append(str(caption))
    n = _count(num_samples)
    if n > len(captions):
        raise ValueError(f"{path} has captions for {len(captions)} images; --num-samples {n} is more.")
    return EvalSet("coco2014", tuple(captions[:n]), {"path": str(path), "sha256": sha256(path),
                                                     "images_with_captions": len(captions)})


def balanced_labels(protocol: str, num_samples: int, num_classes: int) -> EvalSet:
    """Class ``i mod num_classes`` for sample ``i``; ``num_samples`` must be a multiple of ``num_classes``."""
    n = _count(num_samples)
    if n % num_classes:
        raise ValueError(f"--num-samples {n} is not a multiple of the {num_classes} classes: a {protocol} set is "
                         f"balanced (the same number of samples per class); use e.g. {num_classes * max(1, n // num_classes)}.")
    return EvalSet(protocol, tuple(i % num_classes for i in range(n)), {"classes": num_classes, "order": "i mod classes"})


def prompt_file(path: str | Path, num_samples: int | None) -> EvalSet:
    """Prompts of a text file, one per line, in order (cycled when ``num_samples`` exceeds them)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Prompt file {path} not found.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"Prompt file {path} has no prompts.")
    n = len(prompts) if num_samples is None else _count(num_samples)
    return EvalSet("prompts", tuple(prompts[i % len(prompts)] for i in range(n)),
                   {"path": str(path), "sha256": sha256(path), "prompts": len(prompts)})


def eval_set(protocol: str, num_samples: int | None, source: str | None = None, num_classes: int | None = None) -> EvalSet:
    """The evaluation set of ``protocol`` (see the module docstring); ``source``: the captions or prompt file."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"Unknown protocol {protocol!r}; expected one of {PROTOCOLS}.")
    if protocol in ("coco2014", "prompts") and not source:
        raise ValueError(f"The {protocol} protocol needs --source: "
                         + ("the path of captions_val2014.json." if protocol == "coco2014" else "a text file, one prompt per line."))
    if protocol in ("imagenet", "digits") and source:
        raise ValueError(f"The {protocol} protocol takes no --source (its labels are generated).")
    if protocol == "coco2014":
        return coco_captions(source, 40_000 if num_samples is None else num_samples)
    if protocol == "prompts":
        return prompt_file(source, num_samples)
    classes = 10 if protocol == "digits" else (num_classes or 1000)
    return balanced_labels(protocol, (50_000 if protocol == "imagenet" else 1_000) if num_samples is None else num_samples,
                           classes)
