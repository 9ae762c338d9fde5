"""The ``emag`` command line: a thin click layer over :mod:`emag.generate`."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import click
import torch
from tqdm.auto import tqdm

from .demo.app import gradio, launch
from .demo.session import DemoSession
from .dtypes import MODEL_DTYPES
from .engine import BATCHING
from .evaluation import PROTOCOLS, FolderError, plan_sampling, process_group, run_sampling
from .evaluation.sampling import describe
from .evaluation.report import write_report
from .evaluation.scoring import markdown_row, score_folder, scoring_networks
from .evaluation.sweep import plan_sweep, run_sweep
from .families import FAMILIES
from .generate import check_output_folder, output_path, plan_generation, prepare_pipeline, run_job
from .generate import generate as run
from .guidance.emag import COMBINATIONS, EMA_STORAGES, PRESETS, TRACKED_ROWS, VARIANTS
from .guidance.registry import METHODS, parameters
from .io import save_grid, save_png
from .loading import MissingWeightsError
from .negatives import Watcher, choice_plot, figure, save_figure, trace_rows
from .threads import torch_threads
from .math.selection import SELECTION_MODES

EXAMPLES = """
\b
Examples:
  # Offline, in seconds: EMAG-guided digits from the bundled model, one row per class (outputs/grid.png):
  emag generate --out outputs/
\b
  # Weights first (SD3-Medium is gated: accept its licence on the hub, then `hf auth login`):
  hf download stabilityai/stable-diffusion-3-medium-diffusers --local-dir ./models/stable-diffusion-3-medium-diffusers
  hf download facebook/DiT-XL-2-256 --local-dir ./models/DiT-XL-2-256
\b
  # SD3-Medium with the paper's EMAG settings:
  emag generate --model ./models/stable-diffusion-3-medium-diffusers \\
      --prompt "a red fox standing in fresh snow, golden hour" --preset sd3-medium --out outputs/sd3/
\b
  # EMAG-Q, stronger guidance, other candidate blocks:
  emag generate --model ./models/stable-diffusion-3-medium-diffusers --prompt "a lighthouse" \\
      --variant q --scale 2.0 --layers 6-8 --cfg 5.0 --steps 28 --seed 8 --out outputs/sd3-q/
\b
  # DiT-XL/2 with the paper's 250-step DDPM sampler, classes by id or name:
  emag generate --model ./models/DiT-XL-2-256 --class-label 207 --class-label "golden retriever" \\
      --preset dit-xl-2 --out outputs/dit/
\b
  # Plain CFG on the same noise, for comparison (each run in its own folder; rerunning one resumes it):
  emag generate --model ./models/DiT-XL-2-256 --class-label 207 --method cfg --cfg 1.5 --out outputs/dit-cfg/
"""


@click.group(epilog=EXAMPLES)
@click.version_option(package_name="emag")
def cli() -> None:
    """EMAG: Exponential Moving Average Guidance for diffusion transformers (arXiv 2512.17303)."""


def _window(value: str | None):
    if value is None:
        return None
    try:
        start, stop = (float(x) for x in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected START,STOP fractions like 0.2,0.8, got {value!r}") from None
    return (start, stop)


def guidance_options(command):
    """The options of a generation (model-independent parts): guidance methods and their parameters,
    sampling, numerics and device; shared by ``generate``, ``sample`` and ``sweep``."""
    for option in reversed(_GUIDANCE_OPTIONS):
        command = option(command)
    return command


_GUIDANCE_OPTIONS = [
    click.option("--negative-prompt", metavar="TEXT", default=None, help="Negative prompt (SD3)."),
    click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None, help="Settings preset (default: the paper's for the model family)."),
    click.option("--method", default="emag", show_default=True, metavar="NAME[,NAME...]",
                 help="Guidance method(s) to combine, e.g. 'emag', 'cfg', 'cfg,pag', 'apg,emag' (see `emag methods`)."),
    click.option("--param", "params", multiple=True, metavar="METHOD.FIELD=VALUE",
                 help="A method's parameter, e.g. pag.scale=3 pag.layers=13 seg.sigma=inf (repeatable)."),
    click.option("--scale", type=click.FloatRange(min=0), default=None, help="EMAG scale w_e."),
    click.option("--layers", metavar="SPEC", default=None, help="Candidate blocks, e.g. '6,7,8' or '12-15'."),
    click.option("--beta", type=click.FloatRange(0, 1, max_open=True), default=None, help="EMA decay in [0, 1)."),
    click.option("--blend", type=click.FloatRange(0, 1), default=None, help="Replacement strength lambda."),
    click.option("--variant", type=click.Choice(VARIANTS), default=None, help="EMA of attention maps (full) or queries (q)."),
    click.option("--rows", type=click.Choice(TRACKED_ROWS), default=None, help="Tracked attention rows (full variant)."),
    click.option("--selection", type=click.Choice(SELECTION_MODES), default=None, help="Per-step block choice."),
    click.option("--per-sample/--global-selection", default=None, help="Choose blocks per sample (opt-in)."),
    click.option("--combination", type=click.Choice(COMBINATIONS), default=None, help="How EMAG combines with CFG."),
    click.option("--ema-dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default=None, help="EMA storage dtype."),
    click.option("--ema-storage", type=click.Choice(EMA_STORAGES), default=None,
                 help="Full-map EMA held dense (as the reference), factored (past Q, K) or chosen by size (auto)."),
    click.option("--batching", type=click.Choice(BATCHING), default="normal", show_default=True,
                 help="Forward-pass layout: normal (the reference's), all (one pass per step; EMAG's perturbed "
                      "rows join the normal pass: fastest), none (least memory), auto (all when it fits, CUDA)."),
    click.option("--explicit-attention", is_flag=True, default=None,
                 help="Full EMAG: explicit softmax(QK^T)V for every row at the candidate blocks, as the reference code "
                      "(its float16 rounding; slower)."),
    click.option("--straightforward", is_flag=True, default=False,
                 help="The reference's pass layout (a full perturbed pass on the doubled batch) instead of the exact "
                      "fast path; with --explicit-attention: the reference's arithmetic."),
    click.option("--guided-channels", type=click.IntRange(min=1), default=None, help="DiT: guide only the first N channels."),
    click.option("--ema-window", metavar="START,STOP", default=None, help="EMA window as step fractions [start, stop)."),
    click.option("--apply-window", metavar="START,STOP", default=None, help="Replacement window as step fractions."),
    click.option("--cfg", "guidance_scale", type=click.FloatRange(min=0), default=None, help="CFG scale w."),
    click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampling steps."),
    click.option("--height", type=click.IntRange(min=1), default=None, help="Image height (SD3)."),
    click.option("--width", type=click.IntRange(min=1), default=None, help="Image width (SD3)."),
    click.option("--sampler", type=click.Choice(["default", "ddpm-250"]), default=None, help="DiT sampler."),
    click.option("--num-frames", type=click.IntRange(min=1), default=None,
                 help="Video models (Wan): frames per video (default 81), saved as an animated PNG."),
    click.option("--dtype", type=click.Choice(MODEL_DTYPES), default="float32", show_default=True),
    click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda."),
    click.option("--threads", type=click.IntRange(min=1), default=None,
                 help="CPU threads (default: 1 for small models such as the bundled one, else torch's)."),
    click.option("--download/--no-download", default=False, show_default=True,
                 help="Allow downloading from the hub: a hub id into the Hugging Face cache, a missing folder named "
                      "like a known model (e.g. ./models/DiT-XL-2-256) into that folder."),
]


def _plan_kwargs(preset, method, params, scale, layers, beta, blend, variant, rows, selection, per_sample,
                 combination, ema_dtype, ema_storage, batching, explicit_attention, straightforward, guided_channels,
                 ema_window, apply_window, guidance_scale, steps, height, width, sampler, dtype, device, threads,
                 download, negative_prompt, num_frames=None) -> dict:
    """The keyword arguments of :func:`emag.generate.plan_generation` from the shared options."""
    overrides = {k: v for k, v in dict(
        scale=scale, layers=layers, beta=beta, blend=blend, variant=variant, rows=rows, selection=selection,
        per_sample=per_sample, combination=combination, ema_dtype=ema_dtype, ema_storage=ema_storage,
        guided_channels=guided_channels, explicit_attention=explicit_attention,
        ema_window=_window(ema_window), apply_window=_window(apply_window),
    ).items() if v is not None}
    method_params: dict[str, dict[str, str]] = {}
    for item in params:
        key, sep, value = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not name or not field:
            raise click.BadParameter(f"expected METHOD.FIELD=VALUE, got {item!r}", param_hint="--param")
        method_params.setdefault(name.strip(), {})[field.strip()] = value.strip()
    return dict(negative_prompt=negative_prompt, preset=preset, method=method, emag_overrides=overrides,
                method_params=method_params, guidance_scale=guidance_scale, num_inference_steps=steps, height=height,
                width=width, sampler=sampler, dtype=dtype, device=device, allow_download=download, batching=batching,
                fast=not straightforward, threads=threads,
                **({"num_frames": num_frames} if num_frames is not None else {}))


@cli.command(epilog=EXAMPLES)
@click.option("--model", "model", default=None, metavar="PATH|HUB_ID",
              help="Local diffusers folder or hub id (default: the bundled digits DiT, offline).")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT", help="Prompt (SD3); repeat for several.")
@click.option("--class-label", "class_labels", multiple=True, metavar="ID|NAME|null",
              help="Class (DiT): an id 0..N-1, a name from the model's id2label, or 'null' (the null class: "
                   "unconditional samples); repeat for several.")
@guidance_options
@click.option("--seed", type=int, default=None, help="Seed of the first image; image i uses seed + i.")
@click.option("--num-images", type=click.IntRange(min=1), default=None,
              help="Images per prompt/class (default 1; 6 for the bundled digits model).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="outputs", show_default=True)
@click.option("--overwrite", is_flag=True, default=False,
              help="Regenerate images already in --out (default: keep those made with the same parameters, i.e. "
                   "resume an interrupted run; an image made with other parameters is an error).")
def generate(model, prompts, class_labels, seed, num_images, out_dir, overwrite, **options):
    """Generate images with EMAG (or plain CFG) and save PNGs with their parameters."""
    try:
        plan = plan_generation(
            model, prompts=list(prompts), class_labels=list(class_labels), seed=seed,
            num_images=num_images or (6 if model is None else 1), **_plan_kwargs(**options))
    except (MissingWeightsError, ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    out = Path(out_dir)
    click.echo(f"{plan.family.label} model {plan.model}: {len(plan.jobs)} image(s), method {plan.method}, "
               f"preset {plan.preset.name}, {plan.num_inference_steps} steps, CFG {plan.guidance_scale} -> {out}/",
               err=True)
    if plan.threads_reason:
        click.echo(plan.threads_reason, err=True)
    try:
        if not overwrite:
            check_output_folder(plan, out)
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(_out_error(out, exc)) from None
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    rows: dict[object, list] = {}
    resumed = 0
    with click.progressbar(length=len(plan.jobs), label="images", file=sys.stderr) as bar:
        try:
            for index, image, params, done in run(plan, out_dir=None if overwrite else out):
                path = output_path(out, index, params)
                if done:
                    resumed += 1
                else:
                    save_png(image, path, params)
                rows.setdefault(str(params["condition"]), []).append(image[0] if isinstance(image, list) else image)
                click.echo(str(path))
                bar.update(1)
        except (ValueError, MissingWeightsError) as exc:  # e.g. a model that does not load
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # writing an image: the disk filled up, the folder's permissions changed, ...
            if not _inside(exc.filename, out):
                raise
            raise click.ClickException(_out_error(out, exc)) from None
    if resumed:
        click.echo(f"{resumed} image(s) already in {out}/ with the same parameters were kept (resumed).", err=True)
    if len(plan.jobs) > 1:
        click.echo(str(save_grid(list(rows.values()), out / "grid.png")))

SAMPLE_EXAMPLES = """
\b
Examples:
  # The whole chain offline on any CPU: 1,000 digits with EMAG, then their scores:
  emag sample --protocol digits --num-samples 1000 --out runs/digits-emag/
  emag score runs/digits-emag/
\b
  # SD3-Medium on COCO-2014 captions (the paper's protocol), on 8 GPUs:
  torchrun --nproc_per_node 8 -m emag sample --protocol coco2014 --source captions_val2014.json \\
      --model ./models/stable-diffusion-3-medium-diffusers --preset sd3-medium --device cuda --dtype float16 \\
      --batch-size 4 --out runs/sd3-emag/
\b
  # DiT-XL/2, 50,000 balanced ImageNet classes, 250 DDPM steps (also writes samples.npz):
  torchrun --nproc_per_node 8 -m emag sample --protocol imagenet --model ./models/DiT-XL-2-256 \\
      --preset dit-xl-2 --device cuda --batch-size 32 --out runs/dit-emag/
"""


@cli.command("sample", epilog=SAMPLE_EXAMPLES)
@click.option("--protocol", type=click.Choice(PROTOCOLS), required=True,
              help="coco2014 (captions file), imagenet (balanced labels), prompts (text file), digits (bundled model).")
@click.option("--source", default=None, metavar="FILE", help="coco2014: captions_val2014.json; prompts: a text file.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None,
              help="Samples (default: coco2014 40,000; imagenet 50,000; prompts one per line; digits 1,000).")
@click.option("--model", "model", default=None, metavar="PATH|HUB_ID", help="Local diffusers folder or hub id.")
@guidance_options
@click.option("--seed", type=int, default=None,
              help="Global seed; sample i draws its noise from its own seed, derived from (seed, i).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Global batch: samples per pipeline call (part of the configuration: EMAG's block choice is "
                   "batch-global, as in the paper).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Sample folder; rerunning the same command resumes it.")
def sample_cmd(protocol, source, num_samples, model, seed, batch_size, out_dir, **options):
    """Generate an evaluation set into a resumable sample folder (one process, or many with torchrun)."""
    try:
        plan = plan_sampling(model, protocol, source=source, num_samples=num_samples, batch_size=batch_size, seed=seed,
                             **_plan_kwargs(**options))
    except (MissingWeightsError, ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    with process_group(plan.generation.device) as ranks:
        if ranks.main:
            click.echo(f"{describe(plan)} -> {out_dir}/ ({ranks.world} process(es))", err=True)
        bar = tqdm(total=plan.num_samples, unit="sample", disable=not ranks.main, file=sys.stderr, smoothing=0.1)
        try:
            summary = run_sampling(plan, out_dir, ranks,
                                   progress=lambda n: bar.update(min(n, bar.total - bar.n)))
        except (FolderError, MissingWeightsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(_out_error(Path(out_dir), exc)) from None
        finally:
            bar.close()
        if ranks.main:
            click.echo(summary.line(), err=True)


@cli.command("score")
@click.argument("folder", type=click.Path(file_okay=False, exists=True))
@click.option("--reference", default=None, type=click.Path(exists=True), metavar="NPZ|FOLDER",
              help="imagenet: the ADM reference batch (VIRTUAL_imagenet256_labeled.npz); coco2014 / prompts: a folder "
                   "of real images (e.g. val2014/). The digits protocol has its own.")
@click.option("--reference-size", type=click.IntRange(min=8), default=512, show_default=True,
              help="Folder references: centre crop to a square, Lanczos resize to this size.")
@click.option("--weights-dir", type=click.Path(file_okay=False), default=None,
              help="Where the scoring networks' weights are (default: $EMAG_WEIGHTS_DIR, then torch's hub cache).")
@click.option("--hps/--no-hps", default=True, show_default=True, help="HPS v2.1 (text protocols).")
@click.option("--clip-score/--no-clip-score", default=True, show_default=True, help="CLIPScore (text protocols).")
@click.option("--device", default="cpu", show_default=True, help="Device of the scoring networks.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where reference statistics are cached (default: ~/.cache/emag/reference).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--k", "k", type=click.IntRange(min=1), default=None,
              help="Nearest neighbours of precision / recall / density / coverage (default: 5 for digits, 3 (ADM) otherwise).")
def score_cmd(folder, reference, reference_size, weights_dir, hps, clip_score, device, cache_dir, batch_size, k):
    """Score a sample folder made by `emag sample`; writes results.json and results.md into it."""
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "emag" / "reference"
    with process_group(device) as ranks:
        try:
            extractor, scorers, k = scoring_networks(folder, reference, weights_dir, hps, clip_score,
                                                     ranks.device(device), k)
            results = score_folder(folder, ranks, extractor=extractor, scorers=scorers, reference=reference,
                                   reference_size=reference_size, cache_dir=cache, batch_size=batch_size, k=k)
        except (FolderError, FileNotFoundError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        if ranks.main:
            click.echo(markdown_row(results, header=True), nl=False)

@cli.command("sweep")
@click.option("--protocol", type=click.Choice(PROTOCOLS), required=True, help="As `emag sample`.")
@click.option("--source", default=None, metavar="FILE", help="As `emag sample`.")
@click.option("--num-samples", type=click.IntRange(min=1), default=None, help="Samples per grid point.")
@click.option("--model", "model", default=None, metavar="PATH|HUB_ID", help="Local diffusers folder or hub id.")
@click.option("--grid", "grids", multiple=True, required=True, metavar="METHODS[:FIELD=V1,V2[;...]]",
              help="Grid points, e.g. 'cfg:cfg=1.5,2,3', 'emag:emag.scale=1,2,3', 'cfg,pag:pag.scale=1,3' (repeatable).")
@guidance_options
@click.option("--seed", type=int, default=None, help="Global seed (the same noise at every point).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--score/--no-score", default=True, show_default=True, help="Score each point after sampling it.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="As `emag score`.")
@click.option("--k", "k", type=click.IntRange(min=1), default=5, show_default=True, help="As `emag score`.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="One sample folder per point under it, and sweep.json; rerunning resumes.")
def sweep_cmd(protocol, source, num_samples, model, grids, seed, batch_size, score, cache_dir, k, out_dir, **options):
    """Sample and score a grid of guidance configurations as one resumable job."""
    base = _plan_kwargs(**options)
    try:
        plan = plan_sweep(list(grids), model, protocol, source=source, num_samples=num_samples, batch_size=batch_size,
                          seed=seed, **base)
    except (MissingWeightsError, ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    cache = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "emag" / "reference"
    with process_group(base["device"]) as ranks:
        log = (lambda line: click.echo(line, err=True)) if ranks.main else (lambda line: None)
        log(f"{len(plan.points)} grid point(s) -> {out_dir}/")
        try:
            run_sweep(plan, out_dir, ranks, score=score, log=log, cache_dir=cache, k=k)
        except (FolderError, MissingWeightsError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None


@cli.command("report")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--quality", default=None, help="Quality axis of the plane (default: hps, clip_score, precision or accuracy).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
def report_cmd(results, quality, out_dir):
    """Tables (Markdown, CSV), plots and the matched-guidance view from sweep folders or results files."""
    try:
        report = write_report(list(results), out_dir, quality)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(Path(report["table"]).read_text(), nl=False)
    for p in report.get("plots", []):
        click.echo(p)


@cli.command("negatives")
@click.option("--model", "model", default=None, metavar="PATH|HUB_ID",
              help="Local diffusers folder or hub id (default: the bundled digits DiT, offline).")
@click.option("--prompt", default=None, metavar="TEXT", help="The prompt (text-conditioned models).")
@click.option("--class-label", "class_label", default=None, metavar="ID|NAME", help="The class (class-conditional models).")
@guidance_options
@click.option("--seed", type=int, default=None, help="Seed of the image.")
@click.option("--at", "at", default=None, metavar="STEPS",
              help="Steps to show, e.g. '0,10,20' (default: four evenly spaced steps, the last included).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
def negatives_cmd(model, prompt, class_label, seed, at, out_dir, **options):
    """Show what guidance compares: the positive, unconditional and negative (perturbed) predictions decoded
    from x0 at chosen steps, and EMAG's block choice per step."""
    try:
        plan = plan_generation(model, prompts=[prompt] if prompt else [], seed=seed, num_images=1,
                               class_labels=[class_label] if class_label is not None else [], **_plan_kwargs(**options))
        if plan.num_frames is not None:
            raise ValueError(f"`emag negatives` draws images; {plan.model} is a {plan.family.label} video model.")
        n = plan.num_inference_steps
        steps = sorted({round(i * (n - 1) / 3) for i in range(4)}) if at is None else _steps(at, n)
    except (MissingWeightsError, ValueError, TypeError) as exc:
        raise click.ClickException(str(exc)) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    condition = plan.jobs[0]["condition"]
    with torch_threads(plan.threads):
        pipe = prepare_pipeline(plan, quiet=True)
        watcher = Watcher(pipe, steps)
        result = run_job(pipe, plan, [condition], torch.Generator().manual_seed(plan.seed), on_step_outputs=watcher)
    save_png(result.images[0], out / "image.png", {"condition": condition, "seed": plan.seed, "method": plan.method,
                                                  "guidance": plan.term_params})
    click.echo(str(save_figure(figure(watcher.steps), out / "negatives.png")))
    rows = trace_rows(pipe.emag_trace)
    if rows:
        (out / "emag_trace.json").write_text(json.dumps(rows, indent=2) + "\n")
        try:
            for path in choice_plot(rows, out / "emag_choices"):
                click.echo(str(path))
        except ValueError as exc:
            click.echo(str(exc), err=True)


def _steps(text: str, n: int) -> list[int]:
    try:
        steps = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--at takes step indices like '0,10,20', got {text!r}.") from None
    bad = [s for s in steps if not 0 <= s < n]
    if not steps or bad:
        raise ValueError(f"--at: steps must be in 0..{n - 1} (the schedule has {n} steps), got {text!r}.")
    return steps


def _inside(filename, folder: Path) -> bool:
    try:
        return filename is not None and Path(filename).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, TypeError):
        return False


def _out_error(out: Path, exc: OSError) -> str:
    """An OS error on the output folder, as a message naming --out and what it takes."""
    where = exc.filename or out
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        why = f"{where} is a file, not a folder"
    elif isinstance(exc, PermissionError):
        why = f"no permission to write in {where}"
    else:
        why = f"{exc.strerror or exc} ({where})"
    return (f"--out {out}: cannot write the images there: {why}. --out takes a folder that exists or can be "
            "created, and that is writable.")


@cli.command("demo")
@click.option("--model", "model", default=None, metavar="PATH|HUB_ID",
              help="Local diffusers folder or hub id (default: the bundled digits DiT, offline).")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cuda.")
@click.option("--dtype", type=click.Choice(MODEL_DTYPES), default="float32", show_default=True)
@click.option("--port", type=click.IntRange(min=1, max=65535), default=7860, show_default=True)
@click.option("--share", is_flag=True, default=False, help="Also make a public gradio.live link (off by default).")
def demo_cmd(model, device, dtype, port, share) -> None:
    """A local web page comparing guidance methods side by side on the same noise (needs emag[demo])."""
    try:
        gradio()  # the optional demo extra
        session = DemoSession(model, device=device, dtype=dtype)
    except (ImportError, MissingWeightsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"emag demo: {session.facts.name} ({session.family.label}) on http://127.0.0.1:{port}/", err=True)
    launch(session, port=port, share=share)


@cli.command("methods")
@click.option("--family", type=click.Choice(sorted(FAMILIES)), default=None, help="Only show defaults for this family.")
def methods_cmd(family) -> None:
    """List the guidance methods, their parameters, defaults and papers."""
    for info in METHODS.values():
        click.echo(f"{info.name} ({info.cls}) - {info.paper}")
        click.echo(f"    extra passes per step: {info.passes}; acts on: {info.acts_on}; kind: {info.kind}")
        fields = []
        for f in parameters(info):
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            fields.append(f"{f.name}={default!r}" if not isinstance(default, str) or default != "(required)"
                          else f"{f.name} (required)")
        click.echo("    parameters: " + ", ".join(fields))
        layers = {name: text for name, text in _layer_defaults(info.name).items() if family in (None, name)}
        if layers:
            click.echo("    default layers: " + "; ".join(f"{k}: {v}" for k, v in layers.items()))


def _layer_defaults(method: str) -> dict[str, str]:
    """Each family's default layers of ``method``, shown for its reference model's block counts."""
    out = {}
    for fam in FAMILIES.values():
        d = fam.default_layers(method)
        if d is None:
            continue
        counts = fam.reference_counts  # bands computed from the block count scale with the model
        names = [fam.address(p, counts) for p in fam.default_layer_positions(method, counts, method)]
        text = ",".join(names) if len(names) < 8 else f"{names[0]}-{names[-1]}"
        within = getattr(d, "within", None)
        of = f"{dict(zip((b.name for b in fam.block_lists), counts))[within]} {within}" if within else sum(counts)
        out[fam.name] = text + (f" (of {of}; scales with the model)" if callable(d) else "")
    return out


@cli.command("models")
def models_cmd() -> None:
    """List the model families: block lists, attention, positions, prediction, what is not defined."""
    for fam in FAMILIES.values():
        click.echo("\n".join(fam.describe()))


@cli.command("presets")
def presets_cmd() -> None:
    """List the presets and where their numbers come from."""
    for p in PRESETS.values():
        e = p.emag
        click.echo(f"{p.name}: {p.family.name} {p.model_id}; w_e={e.scale} layers={','.join(map(str, e.layers))} "
                   f"beta={e.beta} variant={e.variant} combination={e.combination} CFG={p.guidance_scale} "
                   f"steps={p.num_inference_steps} ({p.sampler})\n    source: {p.source}")


def main() -> None:
    cli(prog_name="emag")


if __name__ == "__main__":
    sys.exit(main())
