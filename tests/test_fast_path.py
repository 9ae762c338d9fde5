"""EMAG's fast path (the exact savings of docs/speed-and-memory.md section 2) equals the straightforward path."""

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
    p = emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=6, bounded=True), scheduler=emag.dit_reference_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def sd3_run(p, fast, steps=8, batching="normal", **e):
    return p(**sd3_embeds(2), latents=sd3_latents(2), num_inference_steps=steps, guidance_scale=5.0,
             output_type="latent", fast=fast, batching=batching,
             emag=emag.EMAG(**{"scale": 2.0, "layers": LAYERS, **e})).images


def block_rows(p, run):
    """Batch rows entering each block, per forward call, while ``run()`` runs."""
    rows = {i: [] for i in range(len(p.transformer.transformer_blocks))}
    hooks = [blk.register_forward_pre_hook(lambda m, a, k, i=i: rows[i].append(k["hidden_states"].shape[0]),
                                           with_kwargs=True) for i, blk in enumerate(p.transformer.transformer_blocks)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return rows


@pytest.mark.parametrize("e", [
    dict(variant="full"), dict(variant="q"), dict(selection="all"), dict(rows="img2img"), dict(rows="img2txt"),
    dict(per_sample=True), dict(combination="additive"), dict(combination="emag_only"), dict(layers=[0, 3]),
    dict(ema_window=(0.0, 0.8), apply_window=(0.25, 0.6)), dict(explicit_attention=True),
])
def test_sd3_fast_equals_straightforward(sd3, e):
    slow = sd3_run(sd3, False, **e)
    slow_trace = [(r.index, r.chosen) for r in sd3.emag_trace]
    fast = sd3_run(sd3, True, **e)
    assert [(r.index, r.chosen) for r in sd3.emag_trace] == slow_trace
    close(fast, slow)


@pytest.mark.parametrize("batching", ["none", "all"])
@pytest.mark.parametrize("e", [dict(variant="full"), dict(variant="q"), dict(combination="additive")])
def test_sd3_batching_layouts_equal_straightforward(sd3, e, batching):
    """The EMA rows [uncond ; cond] form ONE update even when their rows run in separate passes
    ("none"): the score covers both halves, so every layout makes the same choices."""
    slow = sd3_run(sd3, False, **e)
    slow_trace = [(r.index, r.chosen) for r in sd3.emag_trace]
    for fast in (False, True):
        out = sd3_run(sd3, fast, batching=batching, **e)
        assert [(r.index, r.chosen) for r in sd3.emag_trace] == slow_trace
        close(out, slow)


def test_sd3_fast_skips_work(sd3):
    """Per step: no perturbed pass without a replacement; the perturbed rows start at the chosen block and
    the unconditional perturbed rows stop after the last candidate block."""
    rows = block_rows(sd3, lambda: sd3_run(sd3, True, steps=4))
    trace = {r.index: r.chosen for r in sd3.emag_trace}
    replaced = [i for i in range(4) if trace.get(i)]
    assert replaced == [1, 2]  # N = 4: EMA at 0-2, replacement at 1-2
    # block 0 (before every candidate) only ever runs the normal pass: 4 rows (uncond+cond x 2 samples)
    assert rows[0] == [4] * 4
    # block 5 (after the last candidate) sees the normal rows plus the conditional perturbed rows only
    assert rows[5] == [4, 4, 2, 4, 2, 4]


@pytest.mark.parametrize("e", [dict(variant="full"), dict(variant="q"), dict(combination="additive"),
                               dict(layers=[0, 3]), dict(per_sample=True, ema_storage="factored"),
                               dict(explicit_attention=True)])
def test_sd3_joined_pass_equals_straightforward(sd3, e):
    """batching="all": the perturbed rows join the normal pass at the chosen block (one pass per step)."""
    slow = sd3_run(sd3, False, **e)
    slow_trace = [(r.index, r.chosen) for r in sd3.emag_trace]
    layouts, joined = [], []

    def run():
        joined.append(sd3(**sd3_embeds(2), latents=sd3_latents(2), num_inference_steps=8, guidance_scale=5.0,
                          output_type="latent", fast=True, batching="all",
                          emag=emag.EMAG(**{"scale": 2.0, "layers": LAYERS, **e}),
                          callback_on_step_end=lambda p, i, t, k: layouts.append(
                              [list(x) for x in p.guidance_engine.last_passes]) or {}).images)

    rows = block_rows(sd3, run)
    assert [(r.index, r.chosen) for r in sd3.emag_trace] == slow_trace
    close(joined[0], slow)
    replaced = [r.index for r in sd3.emag_trace if r.chosen]
    assert replaced and all(len(layouts[i]) == 1 and "emag:cond" in layouts[i][0] for i in replaced)
    # the last block runs once per step: normal rows (4) plus, on replacement steps, the perturbed
    # conditional rows (2; both halves in the additive mode)
    extra = 4 if e.get("combination") == "additive" else 2
    assert rows[5] == [4 + (extra if i in replaced else 0) for i in range(8)]


def sd3_passes_run(p, fast=True, **e):
    """``sd3_run`` that also records, per step, the names of the branches in the step's passes."""
    passes = []
    out = p(**sd3_embeds(2), latents=sd3_latents(2), num_inference_steps=8, guidance_scale=5.0, output_type="latent",
            fast=fast, emag=emag.EMAG(**{"scale": 2.0, "layers": LAYERS, **e}),
            callback_on_step_end=lambda pipe, i, t, k: passes.append(
                [n for x in pipe.guidance_engine.last_passes for n in x]) or {}).images
    return out, passes, list(p.emag_trace)


def test_sd3_cond_only_score_is_opt_in_and_cheaper(sd3):
    """cond_only_score (opt-in): the score averages the conditional rows only, so the perturbed unconditional
    rows never run. Whether the other score changes a choice (hence the output) depends on the model's
    numbers: the scores differ on any machine, and the outputs differ exactly where a choice does."""
    out, passes, trace = sd3_passes_run(sd3, cond_only_score=True)
    ref, ref_passes, ref_trace = sd3_passes_run(sd3)
    assert out.shape == ref.shape
    # cheaper: no perturbed unconditional row at any step; the default runs them at step 1 (its first
    # replacement: every D = 0, so block 1 is chosen by the tie rule and blocks 2 and 4 still need them)
    assert not any("emag:uncond" in x for x in passes)
    assert ref_trace[1].chosen == [1] and "emag:uncond" in ref_passes[1]
    # the score really leaves the unconditional rows out: at the first step with nonzero scores (the choices
    # before it are the tie's, the same in both runs) the scores differ
    first = next(i for i, r in enumerate(ref_trace) if r.scores and any(r.scores.values()))
    assert [r.chosen for r in trace[:first]] == [r.chosen for r in ref_trace[:first]]
    assert trace[first].scores != ref_trace[first].scores
    if [r.chosen for r in trace] != [r.chosen for r in ref_trace]:
        assert not torch.equal(out, ref)  # another block replaced at some step: another result
    else:  # the same blocks at every step: the same EMA of the conditional rows, the same result
        close(out, ref)
    with pytest.raises(ValueError, match="cond_only_score"):
        sd3_run(sd3, True, cond_only_score=True, combination="additive")


def dit_run(p, fast, batching="normal", **e):
    labels = [1000, 1000] if e.get("combination") == "emag_only" else [1, 2]
    windows = dict(ema_window=emag.RemainingStepsWindow(3, 8), apply_window=emag.RemainingStepsWindow(3, 6))
    return p(class_labels=labels, latents=dit_latents(2), num_inference_steps=12, guidance_scale=1.5,
             output_type="latent", fast=fast, batching=batching, generator=torch.Generator().manual_seed(5),
             emag=emag.EMAG(**{"scale": 3.0, "layers": LAYERS, **windows, **e})).images


@pytest.mark.parametrize("e", [dict(), dict(variant="q"), dict(selection="all"), dict(selection="entropy"),
                               dict(per_sample=True), dict(combination="additive"), dict(combination="emag_only"),
                               dict(explicit_attention=True)])
def test_dit_fast_equals_straightforward(dit, e):
    _dit_equal(dit, e, "normal")


@pytest.mark.parametrize("e", [dict(), dict(combination="additive")])
def test_dit_batching_layouts_equal_straightforward(dit, e):
    _dit_equal(dit, e, "none")
    _dit_equal(dit, e, "all")


def _dit_equal(dit, e, batching):
    slow = dit_run(dit, False, **e)
    slow_trace = [(r.index, r.chosen) for r in dit.emag_trace]
    for fast in (False, True) if batching != "normal" else (True,):
        out = dit_run(dit, fast, batching=batching, **e)
        assert [(r.index, r.chosen) for r in dit.emag_trace] == slow_trace
        close(out, slow)


def test_observers_of_image_rows_get_only_those_rows():
    """An observer that reads only the image-query rows gets the map of those rows (the text-query rows
    are never built), equal to the full map's image rows; the pass's output is unchanged."""
    from emag.families import family_of
    from emag.plumbing.edits import AttentionEdit, EditScope, ForwardPlan, RowGroup
    from tiny_models import tiny_sd3_transformer

    class Observer(AttentionEdit):
        needs_probs, modifies_output = True, False

        def __init__(self, image_rows_only):
            self.image_rows_only, self.seen = image_rows_only, []

        def probs(self, p, info, rows):
            self.seen.append((p.clone(), info.num_image_tokens))
            return p

    tr = tiny_sd3_transformer(num_layers=3)
    embeds = sd3_embeds(1)
    args = dict(hidden_states=sd3_latents(1), timestep=torch.tensor([500.0]), encoder_hidden_states=embeds["prompt_embeds"],
                pooled_projections=embeds["pooled_prompt_embeds"], return_dict=False)
    clean = tr(**args)[0]
    maps = {}
    for flag in (True, False):
        obs = Observer(flag)
        scope = EditScope(tr, family_of(tr), {1}, set())
        with scope.installed(), scope.forward(ForwardPlan([RowGroup("cond", 0, 1, {1: [obs]})], (4, 4))):
            out = tr(**args)[0]
        assert torch.equal(out, clean)
        (maps[flag], n_img), = obs.seen
        assert n_img == 16 and maps[flag].shape[-1] == 16 + 5
    assert maps[True].shape[2] == 16 and maps[False].shape[2] == 21
    torch.testing.assert_close(maps[True], maps[False][:, :, :16])


def test_image_row_edits_keep_fused_attention_for_text_rows():
    """An edit that rewrites only image-query rows of the map: those rows' output is the edited map times V,
    the text-query rows' output is the live attention, the same as editing the full map."""
    from emag.families import family_of
    from emag.plumbing.edits import AttentionEdit, EditScope, ForwardPlan, RowGroup
    from tiny_models import tiny_sd3_transformer

    class Uniform(AttentionEdit):
        needs_probs = True

        def __init__(self, image_rows_only):
            self.image_rows_only = image_rows_only

        def probs(self, p, info, rows):
            p = p.clone()
            p[:, :, :info.num_image_tokens] = 1.0 / p.shape[-1]
            return p

    tr = tiny_sd3_transformer(num_layers=3)
    embeds = sd3_embeds(1)
    args = dict(hidden_states=sd3_latents(1), timestep=torch.tensor([500.0]), encoder_hidden_states=embeds["prompt_embeds"],
                pooled_projections=embeds["pooled_prompt_embeds"], return_dict=False)
    clean = tr(**args)[0]
    outs = {}
    for flag in (True, False):
        scope = EditScope(tr, family_of(tr), {1}, set())
        with scope.installed(), scope.forward(ForwardPlan([RowGroup("cond", 0, 1, {1: [Uniform(flag)]})], (4, 4))):
            outs[flag] = tr(**args)[0]
    assert not torch.allclose(outs[True], clean, atol=1e-3)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-6)


def test_one_update_may_span_passes_but_not_feed_rows_twice():
    """SD3's EMA rows [uncond ; cond] fed in two passes form one update: no score until both halves are
    in, then the score over all rows; feeding a half twice before the update is complete raises."""
    from emag.guidance.emag import resolve
    from emag.guidance.emag.state import EMAGState

    state = EMAGState(resolve(emag.EMAG(layers=[0]), "sd3", 2), 2, "before")
    state.storage = "dense"
    g = torch.Generator().manual_seed(0)
    first, second = torch.rand(2, 2, 4, 6, generator=g), torch.rand(2, 2, 4, 6, generator=g)
    for live in (first, second):
        state.feed(0, live[:1], slice(0, 1))
        state.finish(0)
        if live is first:
            assert state.states[0].score is None  # half an update: nothing to score yet
        state.feed(0, live[1:], slice(1, 2))
        state.finish(0)
    expected = (first.half() - second.half()).abs().float().mean()  # before the update: |E - R| with E = R_1
    torch.testing.assert_close(state.states[0].score.float(), expected, rtol=1e-3, atol=1e-4)
    state.feed(0, second[:1], slice(0, 1))
    with pytest.raises(RuntimeError, match="twice"):
        state.feed(0, second[:1], slice(0, 1))


@pytest.mark.parametrize("batching", ["normal", "all"])
def test_maps_built_by_one_head_keep_fast_equal_to_straightforward(sd3, dit, monkeypatch, batching):
    """With every explicit map built one head at a time, the fast path (two-pass and joined) still makes
    the straightforward path's choices and outputs, on SD3 and on DiT (per-sample selection)."""
    from emag.guidance.emag import state as emag_attention

    monkeypatch.setattr(emag_attention, "FEED_CHUNK_ELEMENTS", 1)
    slow = sd3_run(sd3, False, variant="full")
    slow_trace = [(r.index, r.chosen) for r in sd3.emag_trace]
    out = sd3_run(sd3, True, batching=batching, variant="full")
    assert [(r.index, r.chosen) for r in sd3.emag_trace] == slow_trace
    close(out, slow)
    _dit_equal(dit, dict(per_sample=True), batching)


@pytest.mark.parametrize("family, e", [("sd3", dict()), ("sd3", dict(combination="additive")),
                                       ("sd3", dict(layers=[0, 3])), ("dit", dict()), ("dit", dict(fast=False))])
def test_hard_replacement_multiplies_the_ema_without_building_the_live_map(sd3, dit, monkeypatch, family, e):
    """With lambda = 1 on all image-query rows the replaced map is E itself: E V is taken directly. The
    same images bit for bit as writing E into the live map, with fewer explicit maps built."""
    from emag.math import ema as ema_math
    from emag.guidance.emag import edits as emag_edits
    from emag.plumbing import edits

    fast = e.pop("fast", True)
    built = []
    real = ema_math.attention_probs
    monkeypatch.setattr(edits, "attention_probs", lambda *a, **k: built.append(1) or real(*a, **k))

    def go():
        built.clear()
        if family == "sd3":
            out = sd3_run(sd3, fast, **e)
        else:
            out = dit_run(dit, fast, **e)
        return out, len(built)

    direct, n_direct = go()
    monkeypatch.setattr(emag_edits.EMAGReplace, "given_map", lambda self, info: False)
    written, n_written = go()
    assert torch.equal(direct, written)
    assert n_direct < n_written


@pytest.mark.parametrize("forced", [None, 1, 2, 4])
def test_sd3_unconditional_observer_rows_run_only_while_a_later_candidate_needs_them(sd3, monkeypatch, forced):
    """The chosen block's input is the normal pass's: the normal pass feeds it, so the perturbed
    unconditional rows (nested: they only feed the score) run only when a candidate after it exists.

    Which block the scores pick depends on the model's numbers (another CPU, another choice), so the rule is
    checked at every replaced step of the adaptive run, and each candidate is also forced as the choice
    (``forced``): both cases occur on any machine, and the forced runs still equal the straightforward path."""
    from emag.guidance.emag.state import EMAGState

    if forced is not None:
        monkeypatch.setattr(EMAGState, "choose", lambda self: {forced: True})
    out, passes, trace = sd3_passes_run(sd3)
    replaced = [r for r in trace if r.chosen]
    assert [r.index for r in replaced] == list(range(1, 7))  # N = 8: EMA at steps 0-6, replacement at 1-6
    for r in replaced:
        later_candidate = r.ema and min(r.chosen) < max(LAYERS)
        assert ("emag:uncond" in passes[r.index]) == later_candidate, (r.index, r.chosen, passes[r.index])
    if forced is None:
        # the first replacement (every D = 0) chooses block 1 by the tie rule: the observer rows run there
        assert replaced[0].chosen == [1] and "emag:uncond" in passes[1]
    else:
        assert all(r.chosen == [forced] for r in replaced)
        slow, _, slow_trace = sd3_passes_run(sd3, fast=False)
        assert [(r.index, r.chosen) for r in slow_trace] == [(r.index, r.chosen) for r in trace]
        close(out, slow)
