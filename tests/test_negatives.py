"""emag negatives: the branch predictions of chosen steps decoded from x0, and EMAG's choice plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

import emag
from emag.cli import cli
from emag.digits import load_digits_pipeline
from emag.negatives import GUIDED, Watcher, choice_plot, columns, figure, trace_rows
from tiny_models import sd3_embeds, sd3_latents, tiny_sd3_pipeline

EMAG_DIGITS = dict(layers=[3, 4], ema_window=(0.0, 1.0), apply_window=(0.5, 1.0))


def test_the_watcher_decodes_each_branch_from_its_x0_estimate_and_changes_nothing():
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(class_labels=[3, 7], num_inference_steps=10, guidance=[emag.CFG(2.0), emag.EMAG(2.0, **EMAG_DIGITS)],
              output_type="pt")
    raw = {}

    def keep(step, guided):  # an independent record of the raw predictions
        raw[step.ctx.index] = (step.x.clone(), {k: v.clone() for k, v in step.outputs.items()})

    plain = pipe(generator=torch.Generator().manual_seed(0), on_step_outputs=keep, **kw).images
    watcher = Watcher(pipe, [2, 8])
    watched = pipe(generator=torch.Generator().manual_seed(0), on_step_outputs=watcher, **kw).images
    assert torch.equal(plain, watched)  # watching changes nothing
    early, late = watcher.steps
    assert (early.index, late.index) == (2, 8)
    assert "emag:cond" not in early.images  # before the replacement window: no perturbed pass
    assert {"cond", "uncond", "emag:cond", GUIDED} <= set(late.images)
    # the x0 estimate by the epsilon formula, written out here, decoded as the pixel-space model's pixels
    x, outs = raw[8]
    abar = float(pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[8])])
    c = x.shape[1]
    for name in ("cond", "emag:cond"):
        x0 = (x - math.sqrt(1 - abar) * outs[name][:, :c]) / math.sqrt(abar)
        torch.testing.assert_close(late.images[name], (x0 / 2 + 0.5).clamp(0, 1))
    assert (late.images["emag:cond"] - late.images["cond"]).abs().max() > 1e-3  # the perturbation acts
    assert columns(watcher.steps) == ["cond", "uncond", "emag:cond", GUIDED]
    grid = figure(watcher.steps, size=32)
    assert grid.size[0] >= 4 * 32 and grid.size[1] >= 2 * 32


def test_sd3_negatives_of_pag_go_through_the_vae():
    base = tiny_sd3_pipeline(num_layers=4)
    pipe = emag.StableDiffusion3EMAGPipeline(**base.components)
    pipe.set_progress_bar_config(disable=True)
    watcher = Watcher(pipe, [1])
    raw = {}

    def both(step, guided):
        name = next(n for n in step.outputs if n.startswith("pag"))  # e.g. "pag:1"
        raw[step.ctx.index] = (name, step.x.clone(), step.outputs[name].clone(), step.ctx.param.sigma)
        watcher(step, guided)

    pipe(**sd3_embeds(), latents=sd3_latents(), height=16, width=16, num_inference_steps=3, output_type="latent",
         guidance=[emag.CFG(4.0), emag.PAG(2.0, layers=[1])], on_step_outputs=both)
    name, x, v, sigma = raw[1]
    expected = pipe.decode_latents(x - sigma * v)  # flow matching: x0 = x - sigma v
    assert watcher.steps[0].images[name].shape == (1, 3, 16, 16)
    torch.testing.assert_close(watcher.steps[0].images[name], expected)


def test_trace_rows_and_the_choice_plot(tmp_path):
    pipe = load_digits_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe(class_labels=[1], num_inference_steps=8, guidance=[emag.CFG(2.0), emag.EMAG(2.0, **EMAG_DIGITS)],
         generator=torch.Generator().manual_seed(0), output_type="pt")
    rows = trace_rows(pipe.emag_trace)
    applied = [r for r in rows if r["apply"]]
    assert applied and all(r["chosen"] for r in applied)
    for r in applied:  # the chosen block is the highest-scoring candidate (the default selection)
        scores = {k: v for k, v in r["scores"].items() if v is not None}
        assert r["chosen"] == [max(scores, key=scores.get)]
    paths = choice_plot(rows, tmp_path / "choices")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)
    with pytest.raises(ValueError, match="no EMAG scores"):
        choice_plot([], tmp_path / "none")


def test_cli_negatives_on_the_bundled_model(tmp_path):
    r = CliRunner().invoke(cli, ["negatives", "--class-label", "5", "--steps", "6", "--at", "0,5",
                                 "--out", str(tmp_path / "n")])
    assert r.exit_code == 0, r.output
    for name in ("negatives.png", "image.png", "emag_trace.json", "emag_choices.png", "emag_choices.svg"):
        assert (tmp_path / "n" / name).exists(), name
    assert len(json.loads((tmp_path / "n" / "emag_trace.json").read_text())) == 6
    r = CliRunner().invoke(cli, ["negatives", "--steps", "6", "--at", "0,9", "--out", str(tmp_path / "m")])
    assert r.exit_code != 0 and "steps must be in 0..5" in r.output and "Traceback" not in r.output
