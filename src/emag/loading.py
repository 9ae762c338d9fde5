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


class ModelLoadError(ValueError):
    """A model folder that is present could not be loaded (components that do not fit together, ...)."""


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
    local_hint = f"There is no local folder {model} (relative to {Path.cwd()}); read as a hub id: "
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), local_files_only=not allow_download))
    except Exception as exc:  # LocalEntryNotFoundError, GatedRepoError, connection errors, ...
        raise MissingWeightsError(
            local_hint + f"the weights of {model} are not available locally ({type(exc).__name__}). "
            + _download_hint(str(model))
        ) from None


def read_model_index(folder: Path) -> dict[str, Any]:
    path = folder / "model_index.json"
    try:
        with open(path) as f:
            index = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object (a diffusers pipeline index), got {type(index).__name__}.")
    return index


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


# what a component folder must hold besides weights, by the library that loads it
_CONFIG_FILES = {"scheduler": ("scheduler_config.json",), "tokenizer": ("tokenizer_config.json", "vocab.json",
                 "tokenizer.json", "spiece.model"), "tokenizer_2": ("tokenizer_config.json", "vocab.json",
                 "tokenizer.json", "spiece.model"), "tokenizer_3": ("tokenizer_config.json", "spiece.model",
                 "tokenizer.json")}
_WEIGHTED = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _check_safetensors(path: Path) -> None:
    """Read a safetensors file's header only (cheap): a truncated or foreign file fails here."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise MissingWeightsError(f"{path} is not a readable safetensors file ({exc}); the download is incomplete or "
                                  "corrupt: download it again.") from None
    del keys


def check_snapshot(folder: Path) -> None:
    """Every component ``model_index.json`` names is present: its folder, its config and (for networks) weights
    whose safetensors headers parse. Cheap (no tensor is read); run before any loading."""
    index = read_model_index(folder)
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or not entry or entry[0] is None:
            continue
        d = folder / name
        if not d.is_dir():
            raise MissingWeightsError(f"{folder} has no `{name}` folder although model_index.json lists it: the "
                                      "snapshot is incomplete; download it again.")
        if name in _CONFIG_FILES:
            if not any((d / f).is_file() for f in _CONFIG_FILES[name]):
                raise MissingWeightsError(f"{d} has none of {', '.join(_CONFIG_FILES[name])}: the snapshot is "
                                          "incomplete; download it again.")
        elif name in _WEIGHTED:
            if not (d / "config.json").is_file():
                raise MissingWeightsError(f"{d} has no config.json: the snapshot is incomplete; download it again.")
            check_weights_present(folder, [name])
            shards = sorted(d.glob("*.safetensors"))
            for index_file in d.glob("*.safetensors.index.json"):
                with open(index_file) as f:
                    needed = set(json.load(f).get("weight_map", {}).values())
                missing = sorted(n for n in needed if not (d / n).is_file())
                if missing:
                    raise MissingWeightsError(f"{d} lacks the weight shards {missing[:3]}: the download is incomplete.")
            for shard in shards:
                _check_safetensors(shard)


def absent_components(cls, folder: Path) -> dict[str, None]:
    """Components saved as None (e.g. SD3 without T5: ``[null, null]`` in model_index.json), to pass
    explicitly so that ``from_pretrained`` accepts the folder."""
    index = read_model_index(folder)
    return {name: None for name in cls._get_signature_keys(cls)[0] if not index.get(name) or index[name][0] is None}


def checked_local_folder(cls, model, family: str) -> Path | None:
    """For ``from_pretrained``: the local pipeline folder ``model`` after the snapshot checks (its family
    must be ``family``), or None when ``model`` is not a local path (a hub id)."""
    path = Path(str(model)).expanduser()
    if not path.exists():
        return None
    folder = locate_model(path)
    found = model_family(folder)
    if found != family:
        raise ValueError(f"{folder} holds a {found.upper()} pipeline; load it with the "
                         f"{'StableDiffusion3EMAGPipeline' if found == 'sd3' else 'DiTEMAGPipeline'}.")
    check_snapshot(folder)
    return folder


def hub_load_error(model, exc: Exception) -> MissingWeightsError:
    return MissingWeightsError(f"Could not load {model} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                               "If it is a hub id, its weights are not available locally. " + _download_hint(str(model)))


def load_pipeline(folder: Path, family: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from .pipelines import DiTEMAGPipeline, StableDiffusion3EMAGPipeline

    cls = StableDiffusion3EMAGPipeline if family == "sd3" else DiTEMAGPipeline
    check_snapshot(folder)
    absent = absent_components(cls, folder)
    try:
        pipe = cls.from_pretrained(str(folder), dtype=dtype, **absent)
    except (OSError, ValueError, RuntimeError, NotImplementedError, KeyError) as exc:
        raise ModelLoadError(f"Could not load the {family.upper()} pipeline in {folder}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''} (is the snapshot complete and "
                             "are its components from one model?)") from exc
    return pipe.to(device)
