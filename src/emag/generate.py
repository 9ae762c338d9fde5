"""The main job as a library: validate a request cheaply, then yield images one by one.

``plan_generation`` reads only JSON configs (model index, transformer and VAE configs) and fails
with a clear message on anything wrong (missing weights, unknown family, layers out of range,
resolutions the model cannot take, unknown class names) before any weights are loaded.
``generate`` then loads the pipeline once and yields ``(index, image, params)``: one pipeline call
per image with its own generator seeded ``seed + index``, so every image is reproducible alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL import Image

from . import __version__
from .digits import bundled_model_path
from .dtypes import FLOAT_DTYPES, MODEL_DTYPES
from .engine import BATCHING
from .families import ModelFamily
from .guidance.base import GuidanceConfig, Setup
from .guidance.call import (
    guided_channels_of,
    make_runtimes,
    uses_uncond,
    with_defaults,
    with_paired_cfg,
)
from .guidance.emag import EMAG, PRESETS, Preset, get_preset, resolve
from .guidance.registry import build_term, get_method
from .inputs import check_count
from .io import read_png_params, repair_sidecar
from .loading import (
    check_snapshot,
    load_pipeline,
    locate_model,
    model_family,
    read_component_config,
    read_model_index,
)
from .schedulers import dit_reference_scheduler
from .threads import choose_threads, torch_threads, transformer_parameters

NULL_LABEL = "null"  # --class-label null: the model's null class, i.e. unconditional samples


@dataclass
class GenerationPlan:
    folder: Path
    model: str
    family: ModelFamily
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
    num_frames: int | None = None  # video models: frames per video (None for image models)
    threads: int | None = None  # torch CPU threads for the run (None: torch's setting); see emag.threads
    threads_reason: str = ""

    @property
    def jobs(self) -> list[dict[str, Any]]:
        items = self.prompts if self.family.text_conditioned else self.class_labels
        return [{"condition": c, "repeat": r} for c in items for r in range(self.num_images)]


@dataclass(frozen=True)
class ModelFacts:
    """What the plan reads from a model folder's JSON configs (no weights)."""

    folder: Path
    name: str
    family: ModelFamily
    transformer: dict[str, Any]
    vae_scale_factor: int
    bundled: bool

    @property
    def block_counts(self) -> tuple[int, ...]:
        return self.family.config_block_counts(self.transformer)

    @property
    def num_blocks(self) -> int:
        return sum(self.block_counts)

    @property
    def patch(self) -> int:
        """Latent pixels per token side (the transformer's spatial patch size, times the family's packing)."""
        patch = self.transformer.get("patch_size", 2)
        return int(patch[-1] if isinstance(patch, (list, tuple)) else patch) * self.family.packing

    @property
    def num_classes(self) -> int:
        """Classes of a class-conditional model (its null class is this id)."""
        return int(self.transformer.get("num_embeds_ada_norm") or 1000)

    @property
    def native_size(self) -> int | None:
        """The model's native image side in pixels, where its config says (None: the preset's)."""
        size = self.transformer.get("sample_size")
        return None if size is None else int(size) * self.vae_scale_factor


def model_facts(model: str | None, allow_download: bool = False) -> ModelFacts:
    """The model folder (the bundled digits model when ``model`` is None), checked: every listed component
    present, weights readable (headers only), the transformer of the pipeline's family."""
    if model is None:
        folder, name = bundled_model_path(), "bundled:digits"
    else:
        folder, name = locate_model(model, allow_download), str(model)
    family = model_family(folder)
    check_snapshot(folder)
    vae = read_model_index(folder).get("vae")
    vsf = 1
    if vae and vae[0] is not None:  # AutoencoderKL: block_out_channels; Sana's DC-AE: encoder_block_out_channels
        config = read_component_config(folder, "vae")
        blocks = config.get("block_out_channels") or config.get("encoder_block_out_channels") or [0, 0, 0, 0]
        vsf = 2 ** (len(blocks) - 1)
    return ModelFacts(folder, name, family, read_component_config(folder, "transformer"), vsf, model is None)


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
    num_frames: int | None = None,
) -> GenerationPlan:
    """Check a generation request against the model's configs; no weights are loaded. ``model``: a folder
    or hub id (None: the bundled digits model); the rest as the command line's options."""
    _check_request(batching, dtype, device, guidance_scale, seed)
    names = _method_names(method, method_params)
    m = model_facts(model, allow_download)
    p = get_preset(preset or ("digits" if m.bundled else _default_preset(m.family)))
    if p.family is not m.family:
        raise ValueError(f"Preset {p.name!r} is for {p.family.label} models but {m.name} is a {m.family.label} model.")
    w = p.guidance_scale if guidance_scale is None else guidance_scale
    terms, emag = _build_terms(names, method_params or {}, p, emag_overrides or {}, w, m.family)
    check_count("num_images", num_images, "images per prompt or class, --num-images")
    plan = GenerationPlan(
        folder=m.folder, model=m.name, family=m.family, preset=p, method=",".join(names), emag=emag,
        terms=terms, term_params=[_describe(t) for t in terms], guidance_scale=w,
        num_inference_steps=p.num_inference_steps if num_inference_steps is None else num_inference_steps,
        seed=p.seed if seed is None else seed, num_images=num_images, dtype=dtype, device=device,
        batching=batching, fast=fast,
        resolved_emag=None if emag is None else resolve(emag, m.family, m.block_counts).to_dict(),
    )
    check_count("num_inference_steps", plan.num_inference_steps, "the number of sampling steps, --steps")
    if m.family.video:
        plan.num_frames = check_count("num_frames", 81 if num_frames is None else num_frames,
                                      "frames per video, --num-frames")
    elif num_frames is not None:
        raise ValueError(f"--num-frames is for video models; {m.name} is a {m.family.label} image model.")
    if m.family.text_conditioned:
        _plan_prompts(plan, m, prompts, negative_prompt, class_labels, height, width, sampler)
    else:
        _plan_classes(plan, m, prompts, negative_prompt, class_labels, height, width, sampler)
    _check_terms(plan, m)
    tokens = (plan.height // (m.vae_scale_factor * m.patch)) * (plan.width // (m.vae_scale_factor * m.patch))
    plan.threads, plan.threads_reason = choose_threads(device, threads, transformer_parameters(m.folder), tokens)
    return plan


def _check_request(batching: str, dtype: str, device: str, guidance_scale: Any, seed: Any) -> None:
    if batching not in BATCHING:
        raise ValueError(f"Unknown batching {batching!r}; expected one of {BATCHING}.")
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; expected one of {MODEL_DTYPES}.")
    _check_device(device)
    if guidance_scale is not None and (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float))
                                       or not math.isfinite(guidance_scale) or guidance_scale < 0):
        raise ValueError(f"The CFG scale (--cfg, guidance_scale) must be a finite number >= 0, got {guidance_scale!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [-2^63, 2^63), got {seed!r}.")


def _method_names(method: str, method_params: dict[str, dict[str, str]] | None) -> list[str]:
    names = [get_method(m).name for m in method.split(",") if m.strip()]
    if not names:
        raise ValueError("Give at least one guidance method, e.g. --method emag or --method cfg,pag.")
    if len(set(names)) != len(names):
        raise ValueError(f"A method is listed twice in {method!r}.")
    unused = {get_method(k).name for k in (method_params or {})} - set(names)
    if unused:
        raise ValueError(f"--param given for {sorted(unused)} but --method is {','.join(names)}.")
    return names


def _default_preset(family: ModelFamily) -> str:
    """The family's first preset (the paper's settings for its reference model)."""
    return next(name for name, p in PRESETS.items() if p.family is family)


def _plan_prompts(plan: GenerationPlan, m: ModelFacts, prompts, negative_prompt, class_labels, height, width,
                  sampler) -> None:
    """A text-conditioned model: prompts, and an image size its positional embedding takes."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError(f"An {m.family.label} model needs at least one --prompt.")
    for text, what in [(t, "prompt") for t in prompts] + [(negative_prompt, "negative prompt")]:
        if not isinstance(text, str) and not (what == "negative prompt" and text is None):
            raise ValueError(f"Each {what} (--{what.replace(' ', '-')}) must be one text string, got {text!r}.")
    if class_labels:
        raise ValueError(f"Class labels are for class-conditional models; {m.family.label} takes --prompt.")
    encoder = read_model_index(m.folder).get("text_encoder")
    if not encoder or encoder[0] is None:
        raise ValueError(f"{m.name} has no text encoders saved; it cannot encode prompts.")
    native = m.native_size or plan.preset.resolution
    plan.height = native if height is None else height
    plan.width = native if width is None else width
    mult, vsf = m.vae_scale_factor * m.patch, m.vae_scale_factor
    # absolute position embeddings bound the size; rotary ones (Flux) or none (Sana) do not
    max_latent = None if m.family.positions else \
        int(m.transformer.get("pos_embed_max_size") or m.transformer.get("sample_size", 64)) * m.patch
    for name, v in (("height", plan.height), ("width", plan.width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % mult:
            raise ValueError(f"{name}={v!r}: must be a positive multiple of {mult} (pixels) for this model.")
        if max_latent is not None and v // vsf > max_latent:
            raise ValueError(f"{name}={v}: larger than this model's positional embedding allows ({max_latent * vsf}).")
    plan.prompts, plan.negative_prompt = list(prompts), negative_prompt
    plan.sampler = _sampler(m.family, sampler, plan.preset)


def _plan_classes(plan: GenerationPlan, m: ModelFacts, prompts, negative_prompt, class_labels, height, width,
                  sampler) -> None:
    """A class-conditional model: class ids (names resolved, the null class explicit) at its one size."""
    if isinstance(class_labels, (str, int)):
        class_labels = [class_labels]
    if prompts:
        raise ValueError(f"A {m.family.label} model is class-conditional: give --class-label, not --prompt.")
    if negative_prompt is not None:
        raise ValueError(f"A {m.family.label} model has no text condition: --negative-prompt applies to "
                         "text-conditioned models only.")
    if not class_labels and m.bundled:
        class_labels = [str(i) for i in range(10)]  # the bundled digits: one row per class
    if not class_labels:
        raise ValueError(f"A {m.family.label} model needs at least one --class-label (an id or a class name).")
    for name, v in (("height", height), ("width", width)):
        if v is not None and v != m.native_size:
            raise ValueError(f"{name}={v}: this {m.family.label} model only generates {m.native_size}x{m.native_size} "
                             "images.")
    plan.height = plan.width = m.native_size
    plan.class_labels = _resolve_labels(m.folder, [str(c) for c in class_labels], m.num_classes)
    plan.sampler = _sampler(m.family, sampler, plan.preset)


def _sampler(family: ModelFamily, sampler: str | None, preset: Preset) -> str:
    """The sampler: the model's own scheduler (``"default"``) or the reference sampler its family offers
    (DiT: ``"ddpm-250"``, which the 250-step presets use)."""
    offered = ("default", *family.samplers)
    if sampler is None:
        return "ddpm-250" if "ddpm-250" in offered and preset.num_inference_steps == 250 else "default"
    if sampler not in offered:
        raise ValueError(f"Unknown sampler {sampler!r} for {family.label} models; expected one of {offered}.")
    return sampler


def _check_terms(plan: GenerationPlan, m: ModelFacts) -> None:
    """Build every term's per-call runtime against the model's shape, as the pipeline will (the same
    functions decide): methods the model family cannot take, layers it does not have, a term twice, two
    CFG-like terms and guided channels beyond the model's are reported before any weights are loaded."""
    guided_channels_of(plan.terms, m.family, int(m.transformer.get("in_channels", 4)))
    setup = Setup(family=m.family, num_blocks=m.num_blocks, num_steps=plan.num_inference_steps, batch_size=1,
                  uses_uncond=uses_uncond(plan.terms, m.family, plan.guidance_scale), fast=plan.fast,
                  block_counts=m.block_counts)
    make_runtimes(plan.terms, setup)


def _build_terms(names: list[str], method_params: dict, preset: Preset, emag_overrides: dict[str, Any],
                 cfg_scale: float, family: ModelFamily) -> tuple[list[GuidanceConfig], EMAG | None]:
    """Guidance terms from method names: ``emag`` takes the preset and the EMAG options; ``cfg`` takes
    ``--cfg``; EMAG without a CFG-like term comes with ``CFG(--cfg)`` (the paper's pairing, as a pipeline's
    ``emag=`` argument) unless its combination is ``emag_only``. Defaults are written in as they run."""
    params = {get_method(k).name: v for k, v in method_params.items()}
    terms, emag = [], None
    for name in names:
        if name == "emag":
            emag = build_term("emag", params.get(name, {}), replace(preset.emag, **emag_overrides))
            terms.append(emag)
        elif name == "cfg":
            terms.append(build_term("cfg", {"scale": str(cfg_scale), **params.get(name, {})}))
        elif name == "autoguidance":
            raise ValueError("Autoguidance needs a weak model; use the Python API (emag.Autoguidance(model=...)).")
        else:
            terms.append(build_term(name, params.get(name, {})))
    if emag_overrides and emag is None:
        raise ValueError("EMAG options (--scale, --layers, ...) were given but --method does not include emag.")
    # a guidance-distilled model's --cfg is its embedded guidance value: EMAG comes with no true CFG there
    terms = with_paired_cfg(terms, 1.0 if family.distilled_guidance else cfg_scale, family)
    return with_defaults(terms, family, cfg_scale), emag


def _describe(term) -> dict[str, Any]:
    out = {"method": type(term).__name__}
    for f in dataclasses.fields(term):
        if f.name.startswith("_") or f.name == "preset_name":
            continue
        v = getattr(term, f.name)
        out[f.name] = v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else str(v)
    return out


def _versions() -> dict[str, str]:
    return {"emag": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


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
        "model": plan.model, "family": plan.family.name, "method": plan.method, "preset": plan.preset.name,
        "condition": job["condition"], "negative_prompt": plan.negative_prompt, "seed": plan.seed + index,
        "steps": plan.num_inference_steps, "guidance_scale": plan.guidance_scale,
        "height": plan.height, "width": plan.width, "sampler": plan.sampler, "dtype": plan.dtype,
        "batching": plan.batching, "fast": plan.fast,
        "emag": plan.resolved_emag, "guidance": plan.term_params, "versions": _versions(),
        **({"num_frames": plan.num_frames} if plan.num_frames is not None else {}),
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


def run_job(pipe, plan: GenerationPlan, conditions: list, generator, **call_options: Any):
    """One pipeline call of the plan: one image per condition (a prompt or a class id) with the plan's
    guidance and sampling settings; ``generator``: one generator, or one per image; ``call_options``
    go to the pipeline (e.g. ``on_step_outputs``, ``noise_layout``)."""
    common = dict(num_inference_steps=plan.num_inference_steps, guidance_scale=plan.guidance_scale,
                  generator=generator, guidance=plan.terms, batching=plan.batching, fast=plan.fast, **call_options)
    if plan.num_frames is not None:  # a video model
        common.update(num_frames=plan.num_frames, output_type=call_options.get("output_type", "pil"))
    if plan.family.text_conditioned:
        negative = None if plan.negative_prompt is None else [plan.negative_prompt] * len(conditions)
        return pipe(prompt=list(conditions), negative_prompt=negative, height=plan.height, width=plan.width,
                    **common)
    return pipe(class_labels=list(conditions), **common)


def prepare_pipeline(plan: GenerationPlan, pipe=None, quiet: bool = False, device: str | None = None):
    """The plan's pipeline, loaded (unless given) on ``device`` (default: the plan's) with the plan's
    sampler; ``quiet`` turns its per-call progress bar off (the caller shows one over all images)."""
    if pipe is None:
        pipe = load_pipeline(plan.folder, plan.family, FLOAT_DTYPES[plan.dtype], device or plan.device)
    if quiet:
        pipe.set_progress_bar_config(disable=True)
    if plan.sampler == "ddpm-250":  # the reference DDPM sampler (DiT)
        pipe.scheduler = dit_reference_scheduler(pipe.scheduler.config.get("num_train_timesteps", 1000))
    return pipe


def generate(plan: GenerationPlan, pipe=None, out_dir=None) -> Iterator[tuple[int, Any, dict[str, Any], bool]]:
    """Yield ``(index, PIL image (a list of frames for a video model), params, resumed)`` for every job, loading the pipeline (unless given)
    only if some job has to run. With ``out_dir``, a job whose image is already there with the same
    parameters is not run again (``resumed`` True): an interrupted run picks up where it stopped."""
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
                pipe = prepare_pipeline(plan, pipe, quiet=len(plan.jobs) > 1)
                ready = True
            out = run_job(pipe, plan, [job["condition"]], torch.Generator(device="cpu").manual_seed(params["seed"]))
        emag_run = next((r for r in getattr(pipe, "guidance_runtimes", None) or [] if r.name == "emag"), None)
        if emag_run is not None and params["emag"] is not None:
            params["emag"] = {**params["emag"], **emag_run.run_record()}  # e.g. the storage "auto" chose
        yield index, out.frames[0] if plan.num_frames is not None else out.images[0], params, False


__all__ = ["GenerationPlan", "ModelFacts", "check_output_folder", "finished_image", "generate", "job_params", "model_facts",
           "output_path", "plan_generation", "prepare_pipeline", "run_job"]
