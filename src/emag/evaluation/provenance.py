"""What makes a result traceable: the configuration's hash, the model's fingerprint, library versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

import torch

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the configuration's canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read by MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_fingerprint(folder: str | Path) -> str:
    """sha256 over a model folder: every JSON config's content and every weight file's path and size
    (reading gigabytes of weights for a hash would cost minutes; a re-download of the same snapshot keeps
    the fingerprint, any change of configuration or of a file's size changes it)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        if p.suffix == ".json":
            h.update(f"{rel}\0".encode() + p.read_bytes() + b"\0")
        elif p.suffix in _WEIGHTS:
            h.update(f"{rel}\0{p.stat().st_size}\0".encode())
    return h.hexdigest()


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of ``packages`` (and python, torch, diffusers, emag)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}  # with its build (+cpu, +cu130)
    for name in ("emag", "diffusers", *packages):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
