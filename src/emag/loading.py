"""Finding and loading models: a hub id or a local folder, with clear errors when weights are missing.

Nothing is downloaded unless asked (``allow_download=True``); a missing model fails before any
expensive work with a message that says what to download and where to put it.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.constants import is_offline_mode
from huggingface_hub.utils import validate_repo_id
from safetensors import safe_open

from .families import (
    FAMILIES,
    ModelFamily,
    family_of_pipeline,
    family_of_transformer_config,
    hub_models,
)


class MissingWeightsError(FileNotFoundError):
    """The model folder or hub snapshot is not available locally."""


class ModelLoadError(ValueError):
    """A model folder that is present could not be loaded (components that do not fit together, ...)."""


def looks_like_hub_id(model) -> bool:
    """``owner/name`` as the hub spells repo ids (a path object, ``./x``, ``/x``, ``~/x`` or ``a/b/c`` is a path)."""
    if isinstance(model, os.PathLike):
        return False
    text = str(model)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or "\\" in text:
        return False
    try:
        validate_repo_id(text)
    except Exception:  # noqa: BLE001 - HFValidationError
        return False
    return True


def known_hub_id(model) -> str | None:
    """The hub id of a model emag knows (the families' ``hub_models``) that ``model`` names: the id itself, or
    a folder named like it (``./models/DiT-XL-2-256`` -> ``facebook/DiT-XL-2-256``)."""
    HUB_MODELS = hub_models()
    text = os.fspath(model) if isinstance(model, os.PathLike) else str(model)
    if text in HUB_MODELS:
        return text
    name = text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    return next((hub_id for hub_id in HUB_MODELS if hub_id.split("/")[-1].lower() == name), None)


def _reason(exc: BaseException) -> str:
    """Why a download or load failed, in one line: the type and the first line of the message (GatedRepoError,
    OfflineModeIsEnabled, ...); through a plain ``OSError`` wrapper (diffusers' "not fully cached ... see the
    stacktrace above") to its cause."""
    root = exc
    for _ in range(10):
        if type(root) is not OSError or root.__cause__ is None:
            break
        root = root.__cause__
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


def missing_model_message(model, *, api: str | None = None, failure: BaseException | None = None,
                          cached: bool = False) -> str:
    """What to say when ``model`` (a local folder or a hub id) is not available: what is missing, the
    download command (``hf download ID --local-dir FOLDER``) and how to use the folder then.

    ``api``: the pipeline class name when ``from_pretrained`` asks (the answer names that call; otherwise the
    command line's ``--model`` / ``--download``). ``failure``: the error of a download that was attempted
    (``cached``: of loading a snapshot found in the Hugging Face cache)."""
    text = os.fspath(model) if isinstance(model, os.PathLike) else str(model)
    hub = looks_like_hub_id(model)
    repo = known_hub_id(model) or (text if hub else None)
    where = "" if Path(text).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
    if hub:
        folder = f"./models/{text.split('/')[-1]}" if text == repo else text
        lines = [f"{text} is not a local folder{where}; as a hub id, its snapshot in the Hugging Face cache is "
                 "incomplete." if cached else
                 f"{text} is not a local folder{where}, and as a hub id its weights are not in the Hugging Face cache"
                 + ("." if failure is not None else
                    " (nothing is downloaded without --download)." if api is None else
                    " (offline: HF_HUB_OFFLINE=1 or local_files_only=True, so nothing is downloaded).")]
    else:
        folder = text
        lines = [f"Model folder {text} does not exist{where}."]
    if failure is not None:
        what = "Loading the cached snapshot of" if cached else "Downloading"
        lines.append(f"{what} {repo or text} {'failed' if cached else 'from the hub was attempted and failed'}: "
                     f"{_reason(failure)}")
    if repo is None:
        HUB_MODELS = hub_models()
        takes = "--model takes" if api is None else f"{api}.from_pretrained takes"
        example = next(iter(HUB_MODELS))
        gated = [m for m, g in HUB_MODELS.items() if g]
        lines += [f"{takes} a diffusers pipeline folder (one holding model_index.json) or a hub id (owner/name). "
                  "Download a pipeline into a folder with e.g.",
                  f"    hf download {example} --local-dir ./models/{example.split('/')[-1]}",
                  f"(models emag knows: {', '.join(HUB_MODELS)}; gated, i.e. accept the licence on the hub and "
                  f"`hf auth login` first: {', '.join(gated)})."]
        if api is None:
            lines.append("Then pass that folder with --model.")
        else:
            lines.append(f"Then {api}.from_pretrained('<that folder>').")
        return "\n".join(lines)
    HUB_MODELS = hub_models()
    lines += ["Download it first:" if failure is None else "Download it again:" if cached else
              "Download it yourself once that is fixed:",
              f"    hf download {repo} --local-dir {shlex.quote(folder)}"]
    if HUB_MODELS.get(repo):
        lines.append(f"{repo} is gated: accept its licence at https://huggingface.co/{repo} and log in with "
                     "`hf auth login` before downloading.")
    elif repo not in HUB_MODELS:
        lines.append("(A gated model needs its licence accepted on the hub and `hf auth login` first.)")
    if api is not None:
        then = f"Then {api}.from_pretrained({folder!r})."
        if hub and failure is None and not cached:
            then += f" Online (HF_HUB_OFFLINE unset), {api}.from_pretrained({text!r}) downloads it into the cache itself."
    else:
        then = f"Then run again with --model {shlex.quote(folder)}"
        if failure is None and not cached:
            then += (", or add --download to let emag download it into the Hugging Face cache" if hub else
                     ", or add --download to let emag download it into that folder")
        then += "."
    lines.append(then)
    return "\n".join(lines)


def locate_model(model: str | os.PathLike, allow_download: bool = False) -> Path:
    """A local folder holding ``model_index.json`` for ``model`` (a local path or a hub id). With
    ``allow_download``, a hub id is fetched into the Hugging Face cache and a missing folder named like a
    known model (``./models/DiT-XL-2-256``) is downloaded into; a failure says why."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise MissingWeightsError(
                f"{path} exists but has no model_index.json: it is not a diffusers pipeline folder. "
                f"Save one with `pipe.save_pretrained('{path}')` or download a full snapshot from the hub."
            )
        return path
    error = None
    if not looks_like_hub_id(model):
        repo = known_hub_id(model)
        if not (allow_download and repo):
            raise MissingWeightsError(missing_model_message(model))
        try:
            snapshot_download(repo, local_dir=str(path))
        except Exception as exc:  # noqa: BLE001 - offline, gated, not logged in, connection errors, ...
            error = MissingWeightsError(missing_model_message(model, failure=exc))
        if error is not None:
            raise error
        return locate_model(path)
    try:
        return Path(snapshot_download(str(model), local_files_only=not allow_download))
    except Exception as exc:  # noqa: BLE001 - LocalEntryNotFoundError, GatedRepoError, connection errors, ...
        error = MissingWeightsError(missing_model_message(model, failure=exc if allow_download else None))
    raise error  # outside the handler: no chained traceback


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


def model_family(folder: Path) -> ModelFamily:
    """The model family of the pipeline class recorded in ``model_index.json``."""
    name = read_model_index(folder).get("_class_name", "?")
    family = family_of_pipeline(name)
    if family is None:
        known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
        raise ValueError(f"{folder} holds a {name}; emag supports {', '.join(known)} "
                         f"({', '.join(f.label for f in FAMILIES.values())}).")
    return family


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
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise MissingWeightsError(f"{path} is not a readable safetensors file ({exc}); the download is incomplete or "
                                  "corrupt: download it again.") from None
    del keys


def check_transformer_family(folder: Path, index: dict[str, Any] | None = None) -> None:
    """The transformer saved in ``folder`` is one the pipeline named in ``model_index.json`` loads (an SD3
    transformer under a DiT index fails only after loading the weights otherwise). Reads JSON only."""
    index = read_model_index(folder) if index is None else index
    family = family_of_pipeline(index.get("_class_name"))
    cfg = folder / "transformer" / "config.json"
    if family is None or not cfg.is_file():
        return  # model_family / the component checks name these
    try:
        with open(cfg) as f:
            config = json.load(f)
        found = family_of_transformer_config(config)
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ValueError(f"{cfg} is not a valid transformer config ({exc}).") from None
    if found is not family:
        holds = f"the transformer of {found.label} pipelines" if found else "a transformer emag does not support"
        raise ValueError(f"{folder}: model_index.json names a {index['_class_name']} ({family.label}), but "
                         f"transformer/config.json holds a {config.get('_class_name')}, {holds} (a {family.label} "
                         f"pipeline needs a {family.transformer_class}). The folder mixes two models: download the "
                         "model again, or fix model_index.json.")


def check_snapshot(folder: Path) -> None:
    """Every component ``model_index.json`` names is present: its folder, its config and (for networks) weights
    whose safetensors headers parse, and the transformer is of the pipeline's family. Cheap (no tensor is
    read); run before any loading."""
    index = read_model_index(folder)
    check_transformer_family(folder, index)
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


def checked_local_folder(cls, model, family: ModelFamily) -> Path | None:
    """For ``from_pretrained``: the local pipeline folder ``model`` after the snapshot checks (its family
    must be ``family``), or None when ``model`` is not a local path (a hub id)."""
    path = Path(str(model)).expanduser()
    if not path.exists():
        return None
    folder = locate_model(path)
    found = model_family(folder)
    if found is not family:
        raise ValueError(f"{folder} holds a {found.label} pipeline; load it with the "
                         f"{found.pipeline.rpartition(':')[2]}.")
    check_snapshot(folder)
    return folder


def from_pretrained_checked(cls, load, model, family: ModelFamily, kwargs: dict[str, Any]):
    """The body of the EMAG pipelines' ``from_pretrained`` (``load``: diffusers' ``from_pretrained``).

    A local folder is checked first (``checked_local_folder``; components saved as None are passed as
    None). A path that does not exist, or (offline: ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) a
    hub id that is not in the Hugging Face cache, raises :class:`MissingWeightsError` with the download
    command before diffusers is called. Online, diffusers downloads as usual; only when that fails is the
    failure explained. These errors carry no chained traceback: the message names the cause."""
    folder = checked_local_folder(cls, model, family)
    if folder is not None:
        return load(str(folder), **{**absent_components(cls, folder), **kwargs})
    if not looks_like_hub_id(model):
        raise MissingWeightsError(missing_model_message(model, api=cls.__name__))
    offline = bool(kwargs.get("local_files_only")) or is_offline_mode()
    error = None
    if offline:
        try:
            snapshot_download(str(model), local_files_only=True, revision=kwargs.get("revision"),
                              cache_dir=kwargs.get("cache_dir"))
        except Exception:  # noqa: BLE001 - LocalEntryNotFoundError: not in the cache
            error = MissingWeightsError(missing_model_message(model, api=cls.__name__))
        if error is not None:
            raise error  # outside the handler: no chained traceback
    try:
        return load(str(model), **kwargs)
    except OSError as exc:  # HfHubHTTPError, GatedRepoError, LocalEntryNotFoundError, an incomplete cache, ...
        error = MissingWeightsError(missing_model_message(model, api=cls.__name__, failure=exc, cached=offline))
    raise error


def load_pipeline(folder: Path, family: ModelFamily, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """This package's pipeline of ``family`` from a checked local folder, on ``device``."""
    cls = family.pipeline_class()
    check_snapshot(folder)
    absent = absent_components(cls, folder)
    try:
        pipe = cls.from_pretrained(str(folder), dtype=dtype, **absent)
    except (OSError, ValueError, RuntimeError, NotImplementedError, KeyError) as exc:
        raise ModelLoadError(f"Could not load the {family.label} pipeline in {folder}: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''} (is the snapshot complete and "
                             "are its components from one model?)") from exc
    return pipe.to(device)
