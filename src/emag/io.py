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


def save_grid(rows: list[list[Image.Image]], path: str | os.PathLike, min_cell: int = 64) -> Path:
    """One row per condition: the images side by side, upscaled (nearest) to at least ``min_cell`` px."""
    path = Path(path)
    w, h = rows[0][0].size
    scale = max(1, -(-min_cell // min(w, h)))
    cw, ch, pad = w * scale, h * scale, max(2, scale // 2)
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * (cw + pad) + pad, len(rows) * (ch + pad) + pad), (128, 128, 128))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cw, ch), Image.NEAREST), (pad + j * (cw + pad), pad + i * (ch + pad)))
    _atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path
