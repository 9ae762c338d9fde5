"""A sample folder: PNGs named by index, an index, a manifest; checked, resumable, never mixed.

Layout (docs/eval.md section 3)::

    manifest.json    the full configuration, its hash, library versions, the model's fingerprint
    index.jsonl      one line per sample: index, seed, prompt or label, config hash
    000000.png ...   sample i as {i:06d}.png, with {index, seed, condition, config hash} in its metadata
    samples.npz      (ImageNet protocol) arr_0: uint8 [N, H, W, 3], what the ADM evaluator reads

Every file is written atomically (a temporary name in the folder, then a rename), so a PNG that exists
is whole; a PNG is still checked (its metadata names this run's config hash and its own index, its last
chunk is ``IEND``) before it counts as done. Files the folder should not hold are reported, and the
temporary files a killed run left behind are removed.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..io import atomic_write

MANIFEST = "manifest.json"
INDEX = "index.jsonl"
NPZ = "samples.npz"
METADATA_KEY = "emag-sample"
_PNG = re.compile(r"^(\d{6,})\.png$")
_TMP = re.compile(r"^\..+\.\d+\.[0-9a-f]{16}\.tmp$")  # emag.io's temporary names
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_OURS = {MANIFEST, INDEX, NPZ}
_RESULTS = re.compile(r"^(results.*\.(json|md)|reference-.*\.npz|features-.*\.npz)$")


def png_name(index: int) -> str:
    return f"{index:06d}.png"


class FolderError(ValueError):
    """The folder holds something this run must not use or overwrite."""


class SampleFolder:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    # -- manifest and index ------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        p = self.path / MANIFEST
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except ValueError as exc:
            raise FolderError(f"{p} is not valid JSON ({exc}); it is not an emag sample folder.") from None

    def check_config(self, config_hash: str, config: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The manifest, if any; ``FolderError`` if it was made with another configuration (``config``:
        this run's, to name what differs)."""
        m = self.manifest()
        if m is not None and m.get("config_hash") != config_hash:
            raise FolderError(f"{self.path} holds samples of another configuration (config hash "
                              f"{str(m.get('config_hash'))[:12]}, this run {config_hash[:12]}): use another --out "
                              "folder. The two configurations differ in: "
                              f"{', '.join(_differences(m.get('config', {}), config or {})) or 'unknown'}.")
        return m

    def prepare(self, manifest: dict[str, Any], index_lines: Iterable[dict[str, Any]]) -> None:
        """Create or extend the folder for ``manifest`` (rank 0 only): checks the configuration, removes
        temporary files of killed runs, refuses foreign files, writes the manifest and the index."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.check_config(manifest["config_hash"], manifest["config"])
        for p in self.path.iterdir():
            if _TMP.match(p.name):
                p.unlink(missing_ok=True)
        foreign = self.foreign_files()
        if foreign:
            raise FolderError(f"{self.path} holds files that are not this run's samples: {', '.join(foreign[:5])}"
                              f"{' ...' if len(foreign) > 5 else ''}. Use an empty or emag-made --out folder.")
        atomic_write(self.path / MANIFEST,
                      lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n"))
        text = "".join(json.dumps(line, sort_keys=True) + "\n" for line in index_lines)
        atomic_write(self.path / INDEX, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def foreign_files(self) -> list[str]:
        """Names in the folder that an emag sample folder does not hold."""
        out = []
        for p in sorted(self.path.iterdir()):
            if p.name in _OURS or _PNG.match(p.name) or _RESULTS.match(p.name) or _TMP.match(p.name):
                if p.is_file():
                    continue
            out.append(p.name)
        return out

    def index(self) -> list[dict[str, Any]]:
        p = self.path / INDEX
        if not p.exists():
            raise FolderError(f"{self.path} has no {INDEX}: it is not an emag sample folder (made by `emag sample`).")
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]

    # -- samples -----------------------------------------------------------------------------------
    def png(self, index: int) -> Path:
        return self.path / png_name(index)

    def write(self, index: int, image: Image.Image, meta: dict[str, Any]) -> Path:
        info = PngInfo()
        info.add_text(METADATA_KEY, json.dumps(meta, sort_keys=True))
        path = self.png(index)
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
        return path

    def finished(self, index: int, config_hash: str) -> bool:
        """True if sample ``index`` of ``config_hash`` is in the folder and whole; False if absent;
        ``FolderError`` for a truncated, foreign or other-configuration PNG under its name."""
        path = self.png(index)
        if not path.exists():
            return False
        meta = read_sample_meta(path)
        if meta.get("index") != index or meta.get("config_hash") != config_hash:
            raise FolderError(f"{path} is not sample {index} of this configuration (its metadata: index "
                              f"{meta.get('index')}, config hash {str(meta.get('config_hash'))[:12]}); remove it.")
        return True

    def finished_indices(self, count: int, config_hash: str) -> set[int]:
        return {i for i in range(count) if self.finished(i, config_hash)}

    def extra_pngs(self, count: int) -> list[str]:
        """Sample PNGs with an index outside ``range(count)``."""
        return sorted(p.name for p in self.path.iterdir() if (m := _PNG.match(p.name)) and int(m.group(1)) >= count)

    def load(self, index: int) -> np.ndarray:
        """Sample ``index`` as uint8 ``[H, W, 3]``."""
        with Image.open(self.png(index)) as im:
            return np.asarray(im.convert("RGB"))

    def write_npz(self, count: int) -> Path:
        """``samples.npz`` with ``arr_0`` uint8 ``[count, H, W, 3]`` in index order (the ADM evaluator's input)."""
        arr = np.stack([self.load(i) for i in range(count)])
        path = self.path / NPZ
        atomic_write(path, lambda tmp: _save_npz(tmp, arr))
        return path


def _save_npz(tmp: str, arr: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)


def read_sample_meta(path: Path) -> dict[str, Any]:
    """The metadata of a sample PNG, after checking that the file is whole (ends with ``IEND``)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(0, size - len(_IEND)))
            tail = f.read()
        if tail != _IEND:
            raise FolderError(f"{path} is truncated (no PNG end chunk): remove it and rerun `emag sample` to "
                              "regenerate it.")
        with Image.open(path) as im:
            text = im.info.get(METADATA_KEY)
    except FolderError:
        raise
    except Exception as exc:  # noqa: BLE001 - not a PNG at all
        raise FolderError(f"{path} is not a readable PNG ({exc}); remove it.") from None
    if text is None:
        raise FolderError(f"{path} is not an emag sample (no '{METADATA_KEY}' metadata); remove it or use another folder.")
    return json.loads(text)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The keys whose values differ, compared as stored (JSON: tuples are lists)."""
    a, b = (json.loads(json.dumps(d, sort_keys=True, default=str)) for d in (a, b))
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
