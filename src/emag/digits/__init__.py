"""A small class-conditional DiT trained on scikit-learn's 8x8 digits, bundled with the package.

EMAG on a real (if tiny) trained model, offline, on any CPU, in seconds::

    import torch, emag
    from emag.digits import load_digits_pipeline, DEFAULT_EMAG_LAYERS

    pipe = load_digits_pipeline()
    out = pipe(class_labels=[3, 7], num_inference_steps=50, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="pt",
               emag=emag.EMAG(scale=2.0, layers=DEFAULT_EMAG_LAYERS, ema_window=(0.0, 1.0),
                              apply_window=(0.2, 1.0)))
    out.images  # [2, 1, 8, 8] in [0, 1]

The weights are produced by ``scripts/train_digits.py`` (recipe in ``emag/digits/train_config.json``);
the digit classifier used for features and accuracies is in :mod:`emag.digits.classifier`.
"""

from __future__ import annotations

import pathlib
from importlib import resources

from ..families import DIT
from .data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES

NULL_CLASS = NUM_CLASSES  # the unconditional class id of the bundled DiT
NUM_BLOCKS = 8
DEFAULT_EMAG_LAYERS = (3, 4)  # the middle blocks of the 8-block model (DiT-XL/2's 12-15 of 28, scaled)
ID2LABEL = {i: name for i, name in enumerate(CLASS_NAMES)}


def assets_path() -> pathlib.Path:
    """The package's ``emag/assets`` folder."""
    return pathlib.Path(str(resources.files("emag").joinpath("assets")))


def bundled_model_path() -> pathlib.Path:
    """The folder of the bundled digits pipeline (``model_index.json``, transformer, scheduler)."""
    return assets_path() / "digits-dit"


def load_digits_pipeline(device="cpu"):
    """The bundled :class:`emag.DiTEMAGPipeline` (pixel space, ``vae=None``), on ``device``, float32."""
    folder = bundled_model_path()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The bundled digits model is missing from {folder}; regenerate it with `python scripts/train_digits.py`."
        )
    pipe = DIT.pipeline_class().from_pretrained(str(folder))  # imports diffusers' pipelines on first use
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


__all__ = [
    "CLASS_NAMES",
    "DEFAULT_EMAG_LAYERS",
    "ID2LABEL",
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_BLOCKS",
    "NUM_CLASSES",
    "assets_path",
    "bundled_model_path",
    "load_digits_pipeline",
]
