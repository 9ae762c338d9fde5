"""The main job as a library: validate a request cheaply, then yield images one by one.

``plan_generation`` reads only JSON configs (model index, transformer and VAE configs) and fails
with a clear message on anything wrong (missing weights, unknown family, layers out of range,
resolutions the model cannot take, unknown class names) before any weights are loaded.
``generate`` then loads the pipeline once and yields ``(index, image, params)``: one pipeline call
per image with its own generator seeded ``seed + index``, so every image is reproducible alone.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import EMAG, resolve
from .loading import (check_snapshot, locate_model, model_family, read_component_config, read_model_index,
                      transformer_class_name)
from .presets import PRESETS, Preset, get_preset
from .threads import choose_threads, torch_threads, transformer_parameters

BASE_KINDS = ("cfg", "cfg-zero-star", "apg")
SAMPLERS = ("default", "ddpm-250")
DEFAULT_PRESET = {"sd3": "sd3-medium", "dit": "dit-xl-2"}


@dataclass
class GenerationPlan:
    folder: Path
    model: str
    family: str
    preset: Preset
    method: str
    emag: EMAG | None
    terms: list[Any] = field(default_factory=list)
    term_params: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str | None = None
    class_labels: list[int] = field(default_factory=list)
    guidance_scale: float = 7.0
    num_inference_steps: int = 28
    height: int = 1024
    width: int = 1024
    seed: int = 0
    num_images: int = 1
    sampler: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    batching: str = "normal"
    fast: bool = True
    resolved_emag: dict[str, Any] | None = None
    threads: int | None = None  # torch CPU threads for the run (None: torch's setting); see emag.threads
    threads_reason: str = ""

    @property
    def jobs(self) -> list[dict[str, Any]]:
        items = self.prompts if self.family == "sd3" else self.class_labels
        return [{"condition": c, "repeat": r} for c in items for r in range(self.num_images)]


def _vae_scale_factor(folder: Path) -> int:
    vae = read_model_index(folder).get("vae")
    if not vae or vae[0] is None:
        return 1  # pixel-space model
    return 2 ** (len(read_component_config(folder, "vae").get("block_out_channels", [0, 0, 0, 0])) - 1)


NULL_LABEL = "null"  # --class-label null: the model's null class, i.e. unconditional samples


def _resolve_labels(folder: Path, labels: list[str], num_classes: int) -> list[int]:
    """Class ids from ids, names in the model's id2label, or ``"null"`` (the null class ``num_classes``, for
    unconditional samples; its id itself is refused, so that a typo never samples unconditionally)."""
    id2label = read_model_index(folder).get("id2label") or {}
    by_name = {}
    for k, v in id2label.items():
        for name in str(v).split(","):
            by_name[name.strip().lower()] = int(k)
    ids = f"ids 0..{num_classes - 1}"
    out = []
    for lab in labels:
        s = str(lab).strip()
        if s.lower() == NULL_LABEL:
            out.append(num_classes)
            continue
        if s.lstrip("-").isdigit():
            idx = int(s)
        elif s.lower() in by_name:
            idx = by_name[s.lower()]
        else:
            raise ValueError(f"Unknown class label {lab!r}: give a class id ({ids}), a class name from the model's "
                             f"id2label, or '{NULL_LABEL}' for unconditional samples.")
        if idx == num_classes:
            raise ValueError(f"Class id {idx} is this model's null (unconditional) class, not one of its {num_classes} "
                             f"classes ({ids}). To sample unconditionally, ask for it explicitly: --class-label "
                             f"{NULL_LABEL} (class_labels=['{NULL_LABEL}']).")
        if not 0 <= idx < num_classes:
            raise ValueError(f"Class id {idx} is out of range: this model has {num_classes} classes, {ids} "
                             f"(unconditional samples: --class-label {NULL_LABEL}).")
        out.append(idx)
    return out


def plan_generation(
    model: str | None = None,
    *,
    prompts: list[str] | None = None,
    negative_prompt: str | None = None,
    class_labels: list[str | int] | None = None,
    preset: str | None = None,
    method: str = "emag",
    emag_overrides: dict[str, Any] | None = None,
    method_params: dict[str, dict[str, str]] | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    num_images: int = 1,
    sampler: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    allow_download: bool = False,
    batching: str = "normal",
    fast: bool = True,
    threads: int | None = None,
) -> GenerationPlan:
    """Check a generation request against the model's configs; no weights are loaded."""
    from .engine import BATCHING
    from .guidance.registry import get_method

    if batching not in BATCHING:
        raise ValueError(f"Unknown batching {batching!r}; expected one of {BATCHING}.")
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(class_labels, (str, int)):
        class_labels = [class_labels]
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}.")
    _check_device(device)
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))
                                       or not math.isfinite(guidance_scale) or guidance_scale < 0):
        raise ValueError(f"The CFG scale (--cfg, guidance_scale) must be a finite number >= 0, got {guidance_scale!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [-2^63, 2^63), got {seed!r}.")

    names = [get_method(m).name for m in method.split(",") if m.strip()]
    if not names:
        raise ValueError("Give at least one guidance method, e.g. --method emag or --method cfg,pag.")
    if len(set(names)) != len(names):
        raise ValueError(f"A method is listed twice in {method!r}.")
    method_params = {get_method(k).name: v for k, v in (method_params or {}).items()}
    unused = set(method_params) - set(names)
    if unused:
        raise ValueError(f"--param given for {sorted(unused)} but --method is {','.join(names)}.")
    bundled = model is None
    if bundled:
        from .digits import bundled_model_path

        folder, model = bundled_model_path(), "bundled:digits"
    else:
        folder = locate_model(model, allow_download)
    family = model_family(folder)
    check_snapshot(folder)  # every listed component present, weights readable (headers only)
    p = get_preset(preset or ("digits" if bundled else DEFAULT_PRESET[family]))
    if p.family != family:
        raise ValueError(f"Preset {p.name!r} is for {p.family.upper()} models but {model} is a {family.upper()} model.")
    tcfg = read_component_config(folder, "transformer")
    cls_name = transformer_class_name(tcfg)
    n_blocks = int(tcfg.get("num_layers", 0))
    w = p.guidance_scale if guidance_scale is None else guidance_scale
    terms, emag, resolved = _build_terms(names, method_params, p, emag_overrides or {}, w, family, n_blocks, cls_name)
    from .pipelines._guided import with_defaults

    terms = with_defaults(terms, family, w)  # recorded as they run (CFG's scale, APG's backbone defaults)
    from .pipelines._inputs import check_count

    check_count("num_images", num_images, "images per prompt or class, --num-images")
    vsf = _vae_scale_factor(folder)
    patch = int(tcfg.get("patch_size", 2))
    sample = int(tcfg.get("sample_size", 64))
    plan = GenerationPlan(
        folder=folder, model=str(model), family=family, preset=p, method=",".join(names), emag=emag,
        terms=terms, term_params=[_describe(t) for t in terms], guidance_scale=w,
        num_inference_steps=p.num_inference_steps if num_inference_steps is None else num_inference_steps,
        seed=p.seed if seed is None else seed, num_images=num_images, dtype=dtype, device=device,
        batching=batching, fast=fast, resolved_emag=resolved,
    )
    check_count("num_inference_steps", plan.num_inference_steps, "the number of sampling steps, --steps")
    if family == "sd3":
        if not prompts:
            raise ValueError("An SD3 model needs at least one --prompt.")
        for text, what in [(t, "prompt") for t in prompts] + [(negative_prompt, "negative prompt")]:
            if not isinstance(text, str) and not (what == "negative prompt" and text is None):
                raise ValueError(f"Each {what} (--{what.replace(' ', '-')}) must be one text string, got {text!r}.")
        if class_labels:
            raise ValueError("Class labels are for class-conditional (DiT) models; SD3 takes --prompt.")
        encoder = read_model_index(folder).get("text_encoder")
        if not encoder or encoder[0] is None:
            raise ValueError(f"{model} has no text encoders saved; it cannot encode prompts.")
        native = sample * vsf
        plan.height = native if height is None else height
        plan.width = native if width is None else width
        mult = vsf * patch
        max_latent = int(tcfg.get("pos_embed_max_size") or sample) * patch
        for name, v in (("height", plan.height), ("width", plan.width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % mult:
                raise ValueError(f"{name}={v!r}: must be a positive multiple of {mult} (pixels) for this model.")
            if v // vsf > max_latent:
                raise ValueError(f"{name}={v}: larger than this model's positional embedding allows ({max_latent * vsf}).")
        plan.prompts, plan.negative_prompt = list(prompts), negative_prompt
        if sampler not in (None, "default"):
            raise ValueError("SD3 uses its flow-matching Euler scheduler: --sampler only applies to DiT.")
    else:
        if prompts:
            raise ValueError("A DiT model is class-conditional: give --class-label, not --prompt.")
        if negative_prompt is not None:
            raise ValueError("A DiT model has no text condition: --negative-prompt applies to SD3 only.")
        if not class_labels and bundled:
            class_labels = [str(i) for i in range(10)]  # the bundled digits: one row per class
        if not class_labels:
            raise ValueError("A DiT model needs at least one --class-label (an id or a class name).")
        native = sample * vsf
        for name, v in (("height", height), ("width", width)):
            if v is not None and v != native:
                raise ValueError(f"{name}={v}: this DiT model only generates {native}x{native} images.")
        plan.height = plan.width = native
        num_classes = int(tcfg.get("num_embeds_ada_norm") or 1000)
        plan.class_labels = _resolve_labels(folder, [str(c) for c in class_labels], num_classes)
        plan.sampler = sampler or ("ddpm-250" if p.num_inference_steps == 250 else "default")
        if plan.sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {plan.sampler!r}; expected one of {SAMPLERS}.")
    _check_terms(plan, tcfg, cls_name, n_blocks)
    tokens = (plan.height // (vsf * patch)) * (plan.width // (vsf * patch))
    plan.threads, plan.threads_reason = choose_threads(device, threads, transformer_parameters(folder), tokens)
    return plan


def _check_terms(plan: GenerationPlan, tcfg: dict[str, Any], cls_name: str, n_blocks: int) -> None:
    """Build every term's per-call runtime against the model's shape and the schedule, as the pipeline
    will: windows that select no step, methods the model family cannot take, too many base terms and
    guided channels beyond the model's are reported before any weights are loaded."""
    from .guidance.base import Setup
    from .pipelines._guided import check_distinct, guided_channels_of, uses_uncond
    from .plumbing.architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(cls_name)
    if arch is None:
        raise ValueError(f"emag does not support the transformer class {cls_name}; supported: {', '.join(ARCHITECTURES)}.")
    channels = int(tcfg.get("in_channels", 4))
    guided = guided_channels_of(plan.terms, channels, plan.family)
    steps = plan.num_inference_steps
    emags = [t for t in plan.terms if isinstance(t, EMAG)]
    if plan.family == "dit":  # as the pipelines decide it
        kept = any(e.combination == "nested" and not e.cond_only_score for e in emags)
    else:
        kept = plan.guidance_scale > 1 and any(e.combination == "emag_only" and not e.cond_only_score for e in emags)
    setup = Setup(family=plan.family, arch=arch, num_blocks=n_blocks, num_steps=steps, batch_size=1,
                  prediction="flow" if plan.family == "sd3" else "epsilon", guided_channels=guided,
                  uses_uncond=uses_uncond(plan.terms) or kept, fast=plan.fast)
    check_distinct([t.runtime(setup) for t in plan.terms])


def _build_terms(names, method_params, preset, emag_overrides, cfg_scale, family, n_blocks, cls_name):
    """Guidance terms from method names: ``emag`` takes the preset and the EMAG options; ``cfg`` takes
    ``--cfg``; EMAG without a CFG-like term gets the preset's CFG (the paper's pairing) unless its
    combination is ``emag_only``."""
    from .guidance.registry import build_term
    from .layers import check_layers_in_range

    terms, emag, resolved = [], None, None
    for name in names:
        params = method_params.get(name, {})
        if name == "emag":
            emag = build_term("emag", params, replace(preset.emag, **emag_overrides))
            resolved = resolve(emag, family, n_blocks, cls_name).to_dict()
            term = emag
        elif name == "cfg":
            term = build_term("cfg", {"scale": str(cfg_scale), **params})
        elif name == "autoguidance":
            raise ValueError("Autoguidance needs a weak model; use the Python API (emag.Autoguidance(model=...)).")
        else:
            term = build_term(name, params)
        layers = getattr(term, "layers", None)
        if layers is not None and name != "emag":
            check_layers_in_range(layers, n_blocks, cls_name)
        terms.append(term)
    if emag is not None and emag.combination != "emag_only" and not any(n in BASE_KINDS for n in names):
        from .guidance.cfg import CFG

        terms.insert(0, CFG(cfg_scale))
    if emag_overrides and emag is None:
        raise ValueError("EMAG options (--scale, --layers, ...) were given but --method does not include emag.")
    return terms, emag, resolved


def _describe(term) -> dict[str, Any]:
    import dataclasses

    out = {"method": type(term).__name__}
    for f in dataclasses.fields(term):
        if f.name.startswith("_") or f.name == "preset_name":
            continue
        v = getattr(term, f.name)
        out[f.name] = v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)
    return out


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {"emag": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"Unknown device {device!r} ({exc}).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build or machine has no CUDA GPU (torch {torch.__version__}).")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available here.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: expected cpu, cuda[:N] or mps.")


def job_params(plan: GenerationPlan, index: int) -> dict[str, Any]:
    """Every parameter of job ``index`` (what its PNG records), before it runs."""
    job = plan.jobs[index]
    return {
        "model": plan.model, "family": plan.family, "method": plan.method, "preset": plan.preset.name,
        "condition": job["condition"], "negative_prompt": plan.negative_prompt, "seed": plan.seed + index,
        "steps": plan.num_inference_steps, "guidance_scale": plan.guidance_scale,
        "height": plan.height, "width": plan.width, "sampler": plan.sampler, "dtype": plan.dtype,
        "batching": plan.batching, "fast": plan.fast,
        "emag": plan.resolved_emag, "guidance": plan.term_params, "versions": _versions(),
    }


def output_path(out_dir, index: int, params: dict[str, Any]) -> Path:
    return Path(out_dir) / f"{index:05d}_seed{params['seed']}.png"


def _comparable(params: dict[str, Any]) -> dict[str, Any]:
    """The parameters that decide an image (library versions and what "auto" chose at run time aside)."""
    d = json.loads(json.dumps({k: v for k, v in params.items() if k != "versions"}, sort_keys=True, default=str))
    if isinstance(d.get("emag"), dict):
        d["emag"].pop("ema_storage_used", None)
    return d


def finished_image(path: Path, params: dict[str, Any]):
    """The image already at ``path`` if it was made with ``params`` (a resumed run keeps it), None if
    there is none; ``ValueError`` if it was made with other parameters (finished work is never
    overwritten silently). The PNG is written last (it marks a finished image): a sidecar that an
    interruption left missing, unreadable or different is rewritten from the PNG's parameters."""
    from .io import read_png_params, repair_sidecar

    if not path.exists():
        return None
    try:
        stored = read_png_params(path)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise ValueError(f"{path} exists but is not a finished emag image ({exc}); remove it or use --overwrite.") from None
    if _comparable(stored) != _comparable(params):
        raise ValueError(f"{path} exists and was made with other parameters; use another --out folder or "
                         "--overwrite.")
    repair_sidecar(path, stored)
    from PIL import Image

    with Image.open(path) as im:
        return im.copy()


def check_output_folder(plan: GenerationPlan, out_dir) -> int:
    """Before any work: ``out_dir`` is writable, every image of the plan already there was made with the
    plan's parameters, and it holds no emag image of another run (other seeds or settings, whose grid
    this run would replace). Returns how many of the plan's images are already done; ``ValueError``
    (``OSError`` for an unwritable folder) otherwise."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".emag-write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
    planned, done = set(), 0
    for index in range(len(plan.jobs)):
        params = job_params(plan, index)
        path = output_path(out, index, params)
        planned.add(path.name)
        done += finished_image(path, params) is not None
    foreign = sorted(p.name for p in out.glob("[0-9]*_seed*.png") if p.name not in planned)
    if foreign:
        raise ValueError(f"{out} holds images of another run ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): "
                         "use another --out folder, or --overwrite to write this run's images beside them.")
    return done


def generate(plan: GenerationPlan, pipe=None, out_dir=None) -> Iterator[tuple[int, Any, dict[str, Any], bool]]:
    """Yield ``(index, PIL image, params, resumed)`` for every job, loading the pipeline (unless given)
    only if some job has to run. With ``out_dir``, a job whose image is already there with the same
    parameters is not run again (``resumed`` True): an interrupted run picks up where it stopped."""
    from .loading import load_pipeline
    from .schedulers import dit_reference_scheduler

    dtype = DTYPES[plan.dtype]
    ready = False
    for index, job in enumerate(plan.jobs):
        params = job_params(plan, index)
        if out_dir is not None:
            done = finished_image(output_path(out_dir, index, params), params)
            if done is not None:
                yield index, done, params, True
                continue
        with torch_threads(plan.threads):  # the run's CPU threads, not the caller's between images
            if not ready:
                if pipe is None:
                    pipe = load_pipeline(plan.folder, plan.family, dtype, plan.device)
                if len(plan.jobs) > 1:
                    pipe.set_progress_bar_config(disable=True)  # the caller shows one bar over all images
                if plan.family == "dit" and plan.sampler == "ddpm-250":
                    pipe.scheduler = dit_reference_scheduler(pipe.scheduler.config.get("num_train_timesteps", 1000))
                ready = True
            generator = torch.Generator(device="cpu").manual_seed(params["seed"])
            common = dict(num_inference_steps=plan.num_inference_steps, guidance_scale=plan.guidance_scale,
                          generator=generator, guidance=plan.terms, batching=plan.batching, fast=plan.fast)
            if plan.family == "sd3":
                out = pipe(prompt=job["condition"], negative_prompt=plan.negative_prompt, height=plan.height,
                           width=plan.width, **common)
            else:
                out = pipe(class_labels=[job["condition"]], **common)  # noise layout: the pipeline's default
        state = next((r.state for r in getattr(pipe, "guidance_runtimes", None) or [] if r.name == "emag"), None)
        if state is not None and state.storage is not None and params["emag"] is not None:
            params["emag"] = {**params["emag"], "ema_storage_used": state.storage}  # what "auto" chose
        yield index, out.images[0], params, False


__all__ = ["PRESETS", "GenerationPlan", "check_output_folder", "finished_image", "generate", "job_params", "output_path", "plan_generation"]
