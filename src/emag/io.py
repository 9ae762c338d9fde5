"""Writing results: PNGs with every parameter in their text metadata, JSON sidecars, atomic writes."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

METADATA_KEY = "emag"


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through a temporary file in the same folder, then rename it into place: a reader (or
    an interrupted run) sees the old file or the whole new one, never a part. The temporary file is
    created like any new file (mode 0o666 less the umask, as ``open`` does; ``mkstemp`` would make every
    result 0o600) and removed on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # a new, unique name; the umask applies
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def save_png(image: Image.Image | list[Image.Image], path: str | os.PathLike, params: dict[str, Any],
             fps: float = 16.0) -> Path:
    """Save ``image`` with ``params`` as JSON in the PNG text chunk ``emag`` and in ``<name>.json``; a list
    of frames (a video) is saved as one animated PNG at ``fps``.

    The sidecar is written first and the PNG last: a PNG marks a finished image (a resumed run keeps it
    and repairs its sidecar if an interruption lost it, see ``repair_sidecar``)."""
    path = Path(path)
    text = json.dumps(params, sort_keys=True, default=str)
    info = PngInfo()
    info.add_text(METADATA_KEY, text)
    write_sidecar(path, params)
    if isinstance(image, (list, tuple)):
        first, rest = image[0], list(image[1:])
        atomic_write(path, lambda tmp: first.save(tmp, format="PNG", pnginfo=info, save_all=True, append_images=rest,
                                                  duration=round(1000 / fps), loop=0))
    else:
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def write_sidecar(path: str | os.PathLike, params: dict[str, Any]) -> Path:
    """The JSON sidecar ``<name>.json`` of the image ``path``."""
    side = sidecar_path(path)
    atomic_write(side, lambda tmp: Path(tmp).write_text(json.dumps(params, indent=2, sort_keys=True, default=str) + "\n"))
    return side


def repair_sidecar(path: str | os.PathLike, params: dict[str, Any] | None = None) -> bool:
    """Rewrite the sidecar of the finished image ``path`` from the parameters embedded in the PNG
    (``params``: those, already read) when it is missing, unreadable or different (an interruption
    between the two writes). True if it was rewritten."""
    params = read_png_params(path) if params is None else params
    side = sidecar_path(path)
    try:
        if json.loads(side.read_text()) == json.loads(json.dumps(params, default=str)):
            return False
    except (OSError, ValueError):  # missing, unreadable, not JSON
        pass
    write_sidecar(path, params)
    return True


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
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return path
