"""Writing results: PNGs with every parameter in their text metadata, JSON sidecars, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

METADATA_KEY = "emag"


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(image: Image.Image, path: str | os.PathLike, params: dict[str, Any]) -> Path:
    """Save ``image`` with ``params`` as JSON in the PNG text chunk ``emag`` and in ``<name>.json``."""
    path = Path(path)
    text = json.dumps(params, sort_keys=True, default=str)
    info = PngInfo()
    info.add_text(METADATA_KEY, text)
    _atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(params, indent=2, sort_keys=True, default=str) + "\n"))
    return path


def read_png_params(path: str | os.PathLike) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text[METADATA_KEY])
