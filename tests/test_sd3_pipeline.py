"""StableDiffusion3EMAGPipeline against diffusers and against the independent reference in the tests."""

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

import emag
from reference_emag import ref_sd3_sample
from tiny_models import sd3_embeds, sd3_latents, tiny_sd3_pipeline

N = 8  # k2idx: EMA at steps 0..6, replacement at 1..6, nothing at 7: crosses every boundary
LAYERS = [1, 2, 4]


@pytest.fixture(scope="module")
def base():
    pipe = tiny_sd3_pipeline(num_layers=6)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(base):
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def call_kwargs(batch=2, **extra):
    kw = dict(**sd3_embeds(batch), latents=sd3_latents(batch), num_inference_steps=N, guidance_scale=5.0,
              output_type="latent")
    kw.update(extra)
    return kw


def no_hooks_left(p):
    mods = [b.attn for b in p.transformer.transformer_blocks]
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in mods) and \
        not _get_current_function_mode_stack()


def test_emag_none_is_the_base_pipeline(base, pipe):
    assert torch.equal(pipe(**call_kwargs()).images, base(**call_kwargs()).images)


@pytest.mark.parametrize("combination, neutral, guidance", [("nested", 1.0, 5.0), ("additive", 0.0, 5.0),
                                                            ("emag_only", 1.0, 1.0)])
@pytest.mark.parametrize("variant", ["full", "q"])
def test_neutral_scale_is_the_base_pipeline_exactly(base, pipe, combination, neutral, guidance, variant):
    kw = call_kwargs(guidance_scale=guidance)
    expected = base(**kw).images
    out = pipe(**kw, emag=emag.EMAG(scale=neutral, layers=LAYERS, variant=variant, combination=combination)).images
    assert torch.equal(out, expected)
    assert any(r.chosen for r in pipe.emag_trace)  # the machinery really ran
    assert no_hooks_left(pipe)


CASES = [
    ("full", "image_rows", "adaptive", 2, "nested", "No"),
    ("full", "image_rows", "all", 0, "nested", "No"),
    ("full", "image_rows", "adaptive", 2, "additive", "CFG"),
    ("full", "image_rows", "adaptive", 2, "emag_only", "Only_EMAG"),
    ("full", "img2img", "adaptive", 2, "nested", "No"),
    ("full", "img2txt", "adaptive", 2, "nested", "No"),
    ("full", "img2img", "all", 0, "additive", "CFG"),
    ("q", "image_rows", "adaptive", 2, "nested", "No"),
    ("q", "image_rows", "all", 0, "nested", "No"),
    ("q", "image_rows", "adaptive", 2, "additive", "CFG"),
    ("q", "image_rows", "adaptive", 2, "emag_only", "Only_EMAG"),
]


@pytest.mark.parametrize("variant, rows, selection, mode, combination, combo", CASES)
def test_equals_the_straightforward_reference(pipe, variant, rows, selection, mode, combination, combo):
    ref, _ = ref_sd3_sample(pipe, sd3_embeds(2), sd3_latents(2), N, 5.0, 2.0, LAYERS, variant=variant, rows=rows,
                            mode=mode, combo=combo)
    out = pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS, variant=variant, rows=rows,
                                               selection=selection, combination=combination)).images
    assert not torch.equal(out, pipe(**call_kwargs()).images)  # EMAG really changed the result
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("variant, rows", [("full", "image_rows"), ("full", "img2txt"), ("q", "image_rows")])
def test_feeding_the_ema_by_head_chunks_equals_the_reference(pipe, monkeypatch, variant, rows):
    """Large maps are fed one chunk of heads at a time (bounded temporaries): same result."""
    from emag.guidance.emag import state as emag_attention

    monkeypatch.setattr(emag_attention, "FEED_CHUNK_ELEMENTS", 1)  # one head per chunk
    ref, _ = ref_sd3_sample(pipe, sd3_embeds(2), sd3_latents(2), N, 5.0, 2.0, LAYERS, variant=variant, rows=rows)
    out = pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS, variant=variant, rows=rows)).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("variant", ["full", "q"])
def test_only_emag_scores_the_unconditional_rows_while_the_cfg_flag_is_on(pipe, variant):
    """docs/method.md sections 4 and 7.1: "Only_EMAG" keeps the reference's doubled batch when its CFG flag is on, so the
    unconditional rows enter the batch-global score (their output is unused); at w = 1 the batch is single."""
    scores = {}
    for w in (5.0, 1.0):
        ref, _ = ref_sd3_sample(pipe, sd3_embeds(2), sd3_latents(2), N, w, 2.0, LAYERS, variant=variant,
                                combo="Only_EMAG")
        e = emag.EMAG(scale=2.0, layers=LAYERS, variant=variant, combination="emag_only")
        out = pipe(**call_kwargs(guidance_scale=w), emag=e).images
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        scores[w] = [r.scores for r in pipe.emag_trace]
    # the unconditional rows really enter the score at w > 1 (whether that changes a choice depends on
    # the model's numbers; that the choices follow the reference is checked above)
    first = next(i for i, s in enumerate(scores[1.0]) if s and any(s.values()))
    assert scores[5.0][first] != scores[1.0][first]
    # the straightforward path keeps the reference's normal call on [uncond ; cond] at every step
    e = emag.EMAG(scale=2.0, layers=LAYERS, variant=variant, combination="emag_only")
    normal = []
    pipe(**call_kwargs(guidance_scale=5.0), emag=e, fast=False,
         callback_on_step_end=lambda p, i, t, k: normal.append(list(p.guidance_engine.last_passes[0])) or {})
    assert len(normal) == N and all(sorted(x) == ["cond", "uncond"] for x in normal)


@pytest.mark.parametrize("extra, ref_extra", [(dict(per_sample=True), dict(per_sample=True)),
                                               (dict(blend=0.5), dict(lam=0.5))])
def test_maps_built_by_one_head_equal_the_reference_with_row_masks_and_blends(pipe, monkeypatch, extra, ref_extra):
    """The map built one head at a time (FEED_CHUNK_ELEMENTS = 1) with per-sample replacement masks and a
    partial blend: still the straightforward reference."""
    from emag.guidance.emag import state as emag_attention
    from emag.plumbing import edits

    monkeypatch.setattr(emag_attention, "FEED_CHUNK_ELEMENTS", 1)
    heads, real = [], edits.attention_probs
    monkeypatch.setattr(edits, "attention_probs", lambda q, *a, **k: heads.append(q.shape[1]) or real(q, *a, **k))
    ref, _ = ref_sd3_sample(pipe, sd3_embeds(2), sd3_latents(2), N, 5.0, 2.0, LAYERS, **ref_extra)
    out = pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS, **extra)).images
    assert set(heads) == {1}
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_equals_reference_with_per_sample_selection(pipe, monkeypatch):
    """Per-sample selection: at every step each EMA row replaces the block of its own largest score (ties to
    the lowest block), the reference's choices, and the result is the reference's. Whether a row's choice
    differs from the batch-global one depends on the model's numbers (another CPU, other choices): the
    result differs from global selection's exactly when the choices do."""
    import reference_emag
    from emag.guidance.emag import state as emag_attention

    ref_masks, lib_rows = [], []
    real_ref, real_lib = reference_emag._choose, emag_attention.select_layers_per_row

    def ref_spy(*args, **kwargs):
        chosen = real_ref(*args, **kwargs)
        ref_masks.append({l: m.tolist() for l, m in chosen.items()})
        return chosen

    def lib_spy(candidates, row_scores, *args, **kwargs):
        masks = real_lib(candidates, row_scores, *args, **kwargs)
        lib_rows.append(({l: None if v is None else v.tolist() for l, v in row_scores.items()},
                         {l: m.tolist() for l, m in masks.items()}))
        return masks

    monkeypatch.setattr(reference_emag, "_choose", ref_spy)
    monkeypatch.setattr(emag_attention, "select_layers_per_row", lib_spy)
    ref, _ = ref_sd3_sample(pipe, sd3_embeds(2), sd3_latents(2), N, 5.0, 2.0, LAYERS, per_sample=True)
    out = pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS, per_sample=True)).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    apply_steps = [r.index for r in pipe.emag_trace if r.apply]
    assert len(lib_rows) == len(ref_masks) == len(apply_steps) == 6  # N = 8: replacement at steps 1-6
    per_row = []  # per step, the block each EMA row replaces
    for (scores, masks), ref_chosen in zip(lib_rows, ref_masks):
        assert {l: m for l, m in masks.items() if any(m)} == ref_chosen  # the reference's choices
        rows = len(next(iter(masks.values())))
        choice = []
        for r in range(rows):
            mine = {l: v[r] for l, v in scores.items() if v is not None}
            assert mine  # the EMA has had an update before the first replacement
            best = min(l for l in mine if mine[l] == max(mine.values()))  # its own argmax, ties to the lowest
            assert [l for l in LAYERS if masks[l][r]] == [best], (r, mine, masks)
            choice.append(best)
        per_row.append(choice)
    glob = pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS)).images
    glob_chosen = [r.chosen for r in pipe.emag_trace if r.apply]
    # up to the first step where a row's choice differs from the global one both runs are the same run
    assert len(glob_chosen) == len(per_row) and all(len(g) == 1 for g in glob_chosen)
    differs = [any(b != g[0] for b in rows) for rows, g in zip(per_row, glob_chosen)]
    if any(differs):
        assert not torch.equal(out, glob)
    else:
        torch.testing.assert_close(out, glob, rtol=1e-5, atol=1e-5 * glob.abs().max().item())


def test_equals_reference_numerics_with_explicit_attention_everywhere(pipe):
    """The reference code computes P V explicitly in every pass at the candidate blocks."""
    ref, _ = ref_sd3_sample(pipe, sd3_embeds(2), sd3_latents(2), N, 5.0, 2.0, LAYERS, fused_when_idle=False)
    out = pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS)).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # opt-in: the same arithmetic layout (explicit P V for every row at the candidate blocks, every pass)
    e = emag.EMAG(scale=2.0, layers=LAYERS, explicit_attention=True)
    exact = pipe(**call_kwargs(), emag=e, fast=False).images
    torch.testing.assert_close(exact, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    assert (exact - ref).abs().max() <= (out - ref).abs().max()
    torch.testing.assert_close(pipe(**call_kwargs(), emag=e).images, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_explicit_attention_in_float16_reproduces_the_reference_layout(base):
    """In float16 fused and explicit attention round differently; explicit_attention with fast=False
    computes what the reference code computes, in its order."""
    half = emag.StableDiffusion3EMAGPipeline.from_pipe(base).to(torch.float16)
    half.set_progress_bar_config(disable=True)
    embeds = {k: v.half() for k, v in sd3_embeds(2).items()}
    latents = sd3_latents(2).half()
    try:
        ref, _ = ref_sd3_sample(half, embeds, latents, N, 5.0, 2.0, LAYERS, fused_when_idle=False)
        kw = dict(**embeds, latents=latents, num_inference_steps=N, guidance_scale=5.0, output_type="latent")
        exact = half(**kw, emag=emag.EMAG(scale=2.0, layers=LAYERS, explicit_attention=True), fast=False).images
        fused = half(**kw, emag=emag.EMAG(scale=2.0, layers=LAYERS), fast=False).images
    finally:
        half.to(torch.float32)
    scale = ref.float().abs().max()
    assert (exact.float() - ref.float()).abs().max() <= 1e-6 * scale
    assert (fused.float() - ref.float()).abs().max() > (exact.float() - ref.float()).abs().max()


def test_explicit_attention_is_checked():
    with pytest.raises(ValueError, match="full variant"):
        emag.EMAG(variant="q", explicit_attention=True)
    with pytest.raises(ValueError, match="dense"):
        emag.EMAG(ema_storage="factored", explicit_attention=True)


def test_qk_norm_model_sd35_like():
    base = tiny_sd3_pipeline(num_layers=5, seed=3, qk_norm="rms_norm")
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    for variant in ("q", "full"):
        ref, _ = ref_sd3_sample(p, sd3_embeds(1), sd3_latents(1), N, 4.0, 1.5, [0, 2], variant=variant)
        out = p(**call_kwargs(batch=1, guidance_scale=4.0),
                emag=emag.EMAG(scale=1.5, layers=[0, 2], variant=variant)).images
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_trace_follows_the_reference_windows(pipe):
    pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS))
    assert [r.index for r in pipe.emag_trace] == list(range(0, 7))
    assert [r.index for r in pipe.emag_trace if r.apply] == list(range(1, 7))
    first_apply = pipe.emag_trace[1]
    assert first_apply.chosen == [1] and set(first_apply.scores.values()) == {0.0}  # D = 0 after 1st update


def test_fraction_windows_work_at_other_step_counts(pipe):
    e = emag.EMAG(scale=2.0, layers=LAYERS, ema_window=(0.0, 0.6), apply_window=(0.2, 0.6))
    pipe(**call_kwargs(num_inference_steps=10), emag=e)
    assert [r.index for r in pipe.emag_trace] == list(range(0, 6))
    assert [r.index for r in pipe.emag_trace if r.apply] == [2, 3, 4, 5]


def test_same_seed_twice_is_identical_and_state_is_per_call(pipe):
    e = emag.EMAG(scale=2.0, layers=LAYERS)
    kw = dict(**sd3_embeds(1), num_inference_steps=N, guidance_scale=5.0, output_type="latent")
    a = pipe(**kw, emag=e, generator=torch.Generator().manual_seed(8)).images
    b = pipe(**kw, emag=e, generator=torch.Generator().manual_seed(8)).images
    assert torch.equal(a, b)


def test_hooks_removed_after_an_exception(pipe):
    def boom(p, i, t, kw):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS), callback_on_step_end=boom)
    assert no_hooks_left(pipe)


def test_callback_receives_and_can_replace_latents(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append(kw["latents"].shape)
        return {"latents": kw["latents"] * 0}

    out = pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS), callback_on_step_end=cb).images
    assert len(seen) == N and out.abs().max() == 0


def test_layer_never_reached_is_an_error(pipe):
    """A processor that does not call SDPA would make EMAG a silent no-op: it must raise."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class NoSDPA(JointAttnProcessor2_0):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *a, **k):
            sdpa = torch.nn.functional.scaled_dot_product_attention
            try:
                torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, **kw: torch.softmax(
                    q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask)
            finally:
                torch.nn.functional.scaled_dot_product_attention = sdpa

    attn = pipe.transformer.transformer_blocks[2].attn
    original = attn.processor
    attn.set_processor(NoSDPA())
    try:
        with pytest.raises(RuntimeError, match="block 2"):
            pipe(**call_kwargs(), emag=emag.EMAG(scale=2.0, layers=LAYERS, selection="all"))
    finally:
        attn.set_processor(original)
    assert no_hooks_left(pipe)


@pytest.mark.parametrize("bad, match", [
    (dict(emag=emag.EMAG(layers=[6])), "out of range"),
    (dict(emag=emag.EMAG(layers=LAYERS), guidance=[emag.CFG(5.0)]), "not both"),
    (dict(guidance=[emag.CFG(5.0), "pag"]), "not a guidance term"),
    (dict(guidance=[emag.CFG(5.0), emag.CFG(3.0)]), "At most one"),
    (dict(emag=emag.EMAG(layers=LAYERS, apply_window=(0.0, 1.0), ema_window=(0.5, 1.0))), "before the EMA"),
    (dict(emag="emag"), "EMAG instance"),
    (dict(emag=emag.EMAG(layers=LAYERS, selection="entropy")), "DiT"),
])
def test_bad_inputs_fail_before_work(pipe, bad, match):
    kw = call_kwargs()
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**kw)


def test_unsupported_family_is_a_clear_error():
    from emag.families import family_of

    class HunyuanDiT2DModel(torch.nn.Module):  # a DiT family emag does not support
        pass

    with pytest.raises(ValueError, match="does not support the model family HunyuanDiT2DModel.*FluxTransformer2DModel"):
        family_of(HunyuanDiT2DModel())
