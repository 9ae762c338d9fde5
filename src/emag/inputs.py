"""Checks of a pipeline call's arguments, run before any expensive work (text encoding, model passes).

A bad value is an error that names the argument and what it accepts, never a silent fallback (diffusers
reads ``guidance_scale=nan`` as "no CFG", ``height=0`` as the default size, and only fails inside the
model on latents of the wrong shape). Every check here is cheap: no tensor is computed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from ._warnings import warn as _warn
from .combination import COMBINE_SPACES
from .engine import BATCHING

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_guidance_scale(value: Any) -> float:
    """``guidance_scale``: a finite number >= 0 (values <= 1 mean no CFG in the legacy arguments)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`guidance_scale` must be a number >= 0 (the CFG scale; <= 1 turns CFG off), got {value!r}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`guidance_scale` must be a finite number >= 0 (the CFG scale; <= 1 turns CFG off), "
                         f"got {value!r}.")
    return float(value)


def check_count(name: str, value: Any, what: str) -> int:
    """A whole number >= 1 (``num_inference_steps``, ``num_images_per_prompt``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be a whole number >= 1 ({what}), got {value!r}.")
    return int(value)


def check_options(batching: Any, combine_space: Any, fast: Any) -> None:
    if not isinstance(fast, bool):
        raise TypeError(f"`fast` must be True (the exact fast path) or False (the reference's pass layout), got "
                        f"{fast!r}.")
    if batching not in BATCHING:
        raise ValueError(f"Unknown `batching` {batching!r}; expected one of {BATCHING}.")
    if combine_space not in COMBINE_SPACES:
        raise ValueError(f"Unknown `combine_space` {combine_space!r}; expected one of {COMBINE_SPACES}.")


def check_generator(generator: Any, samples: int, what: str) -> None:
    """A list of generators has one generator per sample."""
    if isinstance(generator, list) and len(generator) != samples:
        raise ValueError(f"`generator` is a list of {len(generator)} generator(s) but the call makes {samples} "
                         f"sample(s) ({what}): give one generator per sample, or a single torch.Generator.")


def check_latents(latents: Any, shape: tuple[int, ...], how: str) -> None:
    """``latents`` (when given) is a tensor of exactly ``shape``."""
    if latents is None:
        return
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"`latents` must be a torch.Tensor of shape {shape}, got {type(latents).__name__}.")
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"`latents` must have shape {tuple(shape)} ({how}), got {tuple(latents.shape)}.")


NEGATIVES = ("negative_prompt", "negative_prompt_2", "negative_prompt_3", "negative_prompt_embeds",
             "negative_pooled_prompt_embeds")


def warn_unused_negative(uses_uncond: bool, args: dict[str, Any]) -> None:
    """A negative condition given to a call that runs no unconditional prediction has no effect: say so."""
    given = [name for name in NEGATIVES if args.get(name) is not None]
    if given and not uses_uncond:
        verb = "has" if len(given) == 1 else "have"
        _warn(f"{', '.join(f'`{n}`' for n in given)} {verb} no effect: this call runs no unconditional "
              "prediction (guidance_scale <= 1 and no guidance term uses one).")


def check_sd3_call(pipe, *, guided: bool, prompt=None, prompt_embeds=None, negative_prompt=None, height=None,
                   width=None, num_inference_steps=28, sigmas=None, guidance_scale=7.0, num_images_per_prompt=1,
                   generator=None, latents=None, batching="normal", fast=True, combine_space="auto",
                   **args: Any) -> None:
    """The SD3 call's arguments that diffusers accepts silently or rejects only after encoding the prompt
    or inside the model (sizes, counts, scales, batch and latent shapes). ``guided``: the call has guidance
    terms (``emag`` or ``guidance``); without, the unused negative condition is reported here."""
    check_guidance_scale(guidance_scale)
    if sigmas is None:  # with custom sigmas the schedule's length comes from them
        check_count("num_inference_steps", num_inference_steps, "the number of sampling steps")
    check_count("num_images_per_prompt", num_images_per_prompt, "images generated per prompt")
    check_options(batching, combine_space, fast)
    for name, texts in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if isinstance(texts, list) and not all(isinstance(t, str) for t in texts):
            raise TypeError(f"`{name}` must be a string or a list of strings, got {texts!r}.")
    if not guided:
        warn_unused_negative(guidance_scale > 1, {"negative_prompt": negative_prompt, **args})
    vsf, cfg = pipe.vae_scale_factor, pipe.transformer.config
    patch = int(cfg.patch_size)
    limit = cfg.get("pos_embed_max_size", None)
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
            raise ValueError(f"`{name}` must be a positive whole number of pixels (a multiple of {vsf * patch}), "
                             f"got {value!r}.")
        if limit is not None and value // vsf // patch > limit:
            raise ValueError(f"`{name}`={value} is larger than this model's positional embedding allows: at most "
                             f"{limit * patch * vsf} pixels (pos_embed_max_size {limit} x patch size {patch} x VAE "
                             f"scale factor {vsf}).")
    if isinstance(prompt, list) and not prompt:
        raise ValueError("`prompt` is an empty list: give at least one prompt.")
    if isinstance(prompt, str):
        batch, source = 1, "one prompt"
    elif isinstance(prompt, list):
        batch, source = len(prompt), f"{len(prompt)} prompts"
    elif prompt is None and isinstance(prompt_embeds, torch.Tensor):
        batch, source = int(prompt_embeds.shape[0]), f"prompt_embeds of batch {int(prompt_embeds.shape[0])}"
        if batch == 0:
            raise ValueError("`prompt_embeds` has batch size 0: give at least one prompt.")
    else:
        return  # diffusers' check_inputs names the missing or mistyped prompt
    if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
        raise ValueError(f"`negative_prompt` is a list of {len(negative_prompt)} but the call has {source}: give one "
                         "negative prompt per prompt, or a single string.")
    samples = batch * num_images_per_prompt
    if latents is None:
        check_generator(generator, samples, f"{source} x num_images_per_prompt={num_images_per_prompt}")
        return
    how = f"{source} x num_images_per_prompt={num_images_per_prompt}, {cfg.in_channels} latent channels"
    if height is None and width is None and isinstance(latents, torch.Tensor) and latents.dim() == 4:
        # as in diffusers, the latents' own size sets the image size: it must suit the model
        h, w = (int(n) for n in latents.shape[-2:])
        check_latents(latents, (samples, cfg.in_channels, h, w), how)
        if h % patch or w % patch or (limit is not None and max(h, w) // patch > limit):
            raise ValueError(f"`latents` of size {h}x{w} do not suit this model: each side must be a multiple of the "
                             f"patch size {patch}" + (f" and at most {limit * patch}" if limit is not None else "")
                             + " (positional embedding).")
        return
    h = height or pipe.default_sample_size * vsf
    w = width or pipe.default_sample_size * vsf
    check_latents(latents, (samples, cfg.in_channels, h // vsf, w // vsf),
                  f"{how}, height {h} and width {w} pixels / {vsf}")


def check_output_type(output_type: Any) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"Unknown `output_type` {output_type!r}; expected one of {OUTPUT_TYPES}.")


def class_ids(class_labels: Any, names: dict[str, int] | None, num_classes: int) -> list[int]:
    """``class_labels`` (an id, a class name, or a list of them) as class ids.

    Names are looked up in the pipeline's ``labels`` (its ``id2label``, as diffusers'
    ``DiTPipeline.get_label_ids`` does). Ids are ``0..num_classes - 1``; ``num_classes`` itself is the
    null (unconditional) class the model was trained with, for unconditional samples.
    """
    if isinstance(class_labels, torch.Tensor):
        if class_labels.dtype == torch.bool or class_labels.dtype.is_floating_point or class_labels.is_complex():
            raise TypeError(f"`class_labels` must hold integer class ids, got a {class_labels.dtype} tensor.")
        items: list[Any] = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (str, numbers.Integral)):
        items = [class_labels]
    else:
        try:
            items = list(class_labels)
        except TypeError:
            raise TypeError(f"`class_labels` must be a class id, a class name or a list of them, got "
                            f"{class_labels!r}.") from None
    if not items:
        raise ValueError("`class_labels` is empty: give at least one class id or class name.")
    names = names or {}
    allowed = (f"class ids 0..{num_classes - 1}, or {num_classes} for the null (unconditional) class"
               + (", or class names from the model's id2label" if names else ""))
    out = []
    for item in items:
        if isinstance(item, str):
            idx = names.get(item)
            if idx is None:
                folded = {k.lower(): v for k, v in names.items()}
                idx = folded.get(item.strip().lower())
            if idx is None:
                examples = ", ".join(repr(k) for k in list(names)[:3])
                raise ValueError(f"Unknown class name {item!r} in `class_labels`: "
                                 + (f"not in this model's id2label (e.g. {examples}); " if names else
                                    "this pipeline has no id2label, so give class ids; ")
                                 + f"`class_labels` takes {allowed}.")
            out.append(int(idx))
            continue
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"`class_labels` takes {allowed}; got {item!r} ({type(item).__name__}).")
        if not 0 <= item <= num_classes:
            raise ValueError(f"Class ids in `class_labels` must be in 0..{num_classes - 1} (this model's "
                             f"{num_classes} classes), or {num_classes}, the null (unconditional) class, for "
                             f"unconditional samples; got {item}.")
        out.append(int(item))
    return out
