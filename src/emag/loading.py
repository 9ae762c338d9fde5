"""Finding and loading models: a hub id or a local folder, with clear errors when weights are missing.

Nothing is downloaded unless asked (``allow_download=True``); a missing model fails before any
expensive work with a message that says what to download and where to put it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

PIPELINE_FAMILIES = {
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3EMAGPipeline": "sd3",
    "DiTPipeline": "dit",
    "DiTEMAGPipeline": "dit",
}


class MissingWeightsError(FileNotFoundError):
    """The model folder or hub snapshot is not available locally."""


def _download_hint(model: str) -> str:
    return (
        f"Download it first, e.g.\n"
        f"    huggingface-cli download {model} --local-dir ./models/{model.split('/')[-1]}\n"
        f"(gated models such as SD3-Medium need `huggingface-cli login` and accepting the licence on the hub),\n"
        f"then pass that folder: --model ./models/{model.split('/')[-1]}. "
        f"Or allow downloading with --download."
    )


def locate_model(model: str | os.PathLike, allow_download: bool = False) -> Path:
    """A local folder holding ``model_index.json`` for ``model`` (a local path or a hub id)."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise MissingWeightsError(
                f"{path} exists but has no model_index.json: it is not a diffusers pipeline folder. "
                f"Save one with `pipe.save_pretrained('{path}')` or download a full snapshot from the hub."
            )
        return path
    looks_like_hub_id = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise MissingWeightsError(f"Model folder {model} does not exist.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), local_files_only=not allow_download))
    except Exception as exc:  # LocalEntryNotFoundError, GatedRepoError, connection errors, ...
        raise MissingWeightsError(
            f"The weights of {model} are not available locally ({type(exc).__name__}). " + _download_hint(str(model))
        ) from None


def read_model_index(folder: Path) -> dict[str, Any]:
    with open(folder / "model_index.json") as f:
        return json.load(f)


def model_family(folder: Path) -> str:
    """``"sd3"`` or ``"dit"`` from the pipeline class recorded in ``model_index.json``."""
    name = read_model_index(folder).get("_class_name", "?")
    if name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{folder} holds a {name}; emag supports {', '.join(sorted(set(PIPELINE_FAMILIES)))} "
            "(Stable Diffusion 3 / 3.5 and DiT)."
        )
    return PIPELINE_FAMILIES[name]


def read_component_config(folder: Path, component: str) -> dict[str, Any]:
    cfg = folder / component / "config.json"
    if not cfg.is_file():
        raise MissingWeightsError(f"{folder} has no {component}/config.json: the snapshot is incomplete.")
    with open(cfg) as f:
        return json.load(f)


def check_weights_present(folder: Path, components: list[str]) -> None:
    """Fail clearly when a component folder has a config but no weight files (an interrupted download)."""
    for comp in components:
        d = folder / comp
        if not d.is_dir():
            raise MissingWeightsError(f"{folder} has no `{comp}` folder: the snapshot is incomplete.")
        if not any(p.suffix in (".safetensors", ".bin") for p in d.iterdir()):
            raise MissingWeightsError(
                f"{d} holds no weights (*.safetensors / *.bin): the download is incomplete; download it again."
            )


def load_pipeline(folder: Path, family: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from .pipelines import DiTEMAGPipeline, StableDiffusion3EMAGPipeline

    cls = StableDiffusion3EMAGPipeline if family == "sd3" else DiTEMAGPipeline
    index = read_model_index(folder)
    components = [c for c in ("transformer", "vae") if index.get(c) and index[c][0] is not None]
    check_weights_present(folder, components)
    # Components saved as None (e.g. SD3 without T5) are [null, null] in model_index.json; pass them
    # explicitly so that from_pretrained accepts the folder.
    absent = {name: None for name in cls._get_signature_keys(cls)[0]
              if not index.get(name) or index[name][0] is None}
    pipe = cls.from_pretrained(str(folder), dtype=dtype, **absent)
    return pipe.to(device)
