"""EMAG's fast path (exact savings of emag.md section 6) equals the straightforward path."""

import pytest
import torch

import emag
from tiny_models import dit_latents, sd3_embeds, sd3_latents, tiny_dit_pipeline, tiny_sd3_pipeline

LAYERS = [1, 2, 4]


@pytest.fixture(scope="module")
def sd3():
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(tiny_sd3_pipeline(num_layers=6))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def dit():
    p = emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=6), scheduler=emag.dit_reference_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def sd3_run(p, fast, steps=8, **e):
    return p(**sd3_embeds(2), latents=sd3_latents(2), num_inference_steps=steps, guidance_scale=5.0,
             output_type="latent", fast=fast, emag=emag.EMAG(**{"scale": 2.0, "layers": LAYERS, **e})).images


@pytest.mark.parametrize("e", [
    dict(variant="full"), dict(variant="q"), dict(selection="all"), dict(rows="img2img"), dict(rows="img2txt"),
    dict(per_sample=True), dict(combination="additive"), dict(combination="emag_only"), dict(layers=[0, 3]),
    dict(ema_window=(0.0, 0.8), apply_window=(0.25, 0.6)),
])
def test_sd3_fast_equals_straightforward(sd3, e):
    slow = sd3_run(sd3, False, **e)
    slow_trace = [(r.index, r.chosen) for r in sd3.emag_trace]
    fast = sd3_run(sd3, True, **e)
    assert [(r.index, r.chosen) for r in sd3.emag_trace] == slow_trace
    close(fast, slow)


def test_sd3_fast_skips_work(sd3):
    """Per step: no perturbed pass without a replacement; the perturbed rows start at the chosen block and
    the unconditional perturbed rows stop after the last candidate block."""
    rows = {i: [] for i in range(6)}
    hooks = [blk.register_forward_pre_hook(lambda m, a, k, i=i: rows[i].append(k["hidden_states"].shape[0]),
                                           with_kwargs=True) for i, blk in enumerate(sd3.transformer.transformer_blocks)]
    try:
        sd3_run(sd3, True, steps=4)
    finally:
        for h in hooks:
            h.remove()
    trace = {r.index: r.chosen for r in sd3.emag_trace}
    replaced = [i for i in range(4) if trace.get(i)]
    assert replaced == [1, 2]  # N = 4: EMA at 0-2, replacement at 1-2
    # block 0 (before every candidate) only ever runs the normal pass: 4 rows (uncond+cond x 2 samples)
    assert rows[0] == [4] * 4
    # block 5 (after the last candidate) sees the normal rows plus the conditional perturbed rows only
    assert rows[5] == [4, 4, 2, 4, 2, 4]


def test_sd3_cond_only_score_is_opt_in_and_cheaper(sd3):
    out = sd3_run(sd3, True, cond_only_score=True)
    ref = sd3_run(sd3, True)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    with pytest.raises(ValueError, match="cond_only_score"):
        sd3_run(sd3, True, cond_only_score=True, combination="additive")


def dit_run(p, fast, **e):
    labels = [1000, 1000] if e.get("combination") == "emag_only" else [1, 2]
    windows = dict(ema_window=emag.RemainingStepsWindow(3, 8), apply_window=emag.RemainingStepsWindow(3, 6))
    return p(class_labels=labels, latents=dit_latents(2), num_inference_steps=12, guidance_scale=1.5,
             output_type="latent", fast=fast, generator=torch.Generator().manual_seed(5),
             emag=emag.EMAG(**{"scale": 3.0, "layers": LAYERS, **windows, **e})).images


@pytest.mark.parametrize("e", [dict(), dict(variant="q"), dict(selection="all"), dict(selection="entropy"),
                               dict(per_sample=True), dict(combination="additive"), dict(combination="emag_only")])
def test_dit_fast_equals_straightforward(dit, e):
    slow = dit_run(dit, False, **e)
    slow_trace = [(r.index, r.chosen) for r in dit.emag_trace]
    fast = dit_run(dit, True, **e)
    assert [(r.index, r.chosen) for r in dit.emag_trace] == slow_trace
    close(fast, slow)
