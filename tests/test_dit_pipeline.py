"""DiTEMAGPipeline against diffusers, against the independent reference, and the paper's sampler."""

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

import emag
from emag.windows import RemainingStepsWindow
from reference_emag import ref_dit_sample, ref_respaced_ddpm
from tiny_models import dit_latents, tiny_dit_pipeline

N = 12
LAYERS = [1, 2, 4]
EMA, APPLY = (3, 8), (3, 6)  # steps remaining, inclusive: crosses both window boundaries at N = 12


def gen(seed=5):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def base():
    p = tiny_dit_pipeline(num_layers=6, bounded=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe(base):
    p = emag.DiTEMAGPipeline.from_pipe(base, scheduler=emag.dit_reference_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def windows(combination="nested"):
    apply = RemainingStepsWindow(0 if combination == "additive" else APPLY[0], APPLY[1])
    return dict(ema_window=RemainingStepsWindow(*EMA), apply_window=apply)


def run(pipe, labels=(1, 2), fast=True, **emag_kwargs):
    e = emag.EMAG(**{**dict(scale=3.0, layers=LAYERS, guided_channels=3), **windows(emag_kwargs.get(
        "combination", "nested")), **emag_kwargs})
    return pipe(class_labels=list(labels), latents=dit_latents(len(labels)), num_inference_steps=N,
                guidance_scale=1.5, output_type="latent", generator=gen(), emag=e, fast=fast).images


def test_emag_none_is_the_base_pipeline(base):
    p = emag.DiTEMAGPipeline.from_pipe(base)
    for scale in (4.0, 1.0):
        a = base(class_labels=[1, 2], guidance_scale=scale, generator=gen(0), num_inference_steps=10, output_type="pt")
        b = p(class_labels=[1, 2], guidance_scale=scale, generator=gen(0), num_inference_steps=10, output_type="pt")
        assert torch.equal(a.images, b.images)


def test_neutral_additive_is_the_base_pipeline_exactly(base):
    """Additive EMAG at w_e = 0 on all channels is DiTPipeline's CFG, with EMAG's machinery running."""
    p = emag.DiTEMAGPipeline.from_pipe(base)
    lat = dit_latents(2)
    expected = base(class_labels=[1, 2], guidance_scale=4.0, generator=gen(0), num_inference_steps=10, output_type="pt")
    e = emag.EMAG(scale=0.0, layers=LAYERS, combination="additive", guided_channels=4,
                  ema_window=RemainingStepsWindow(2, 8), apply_window=RemainingStepsWindow(0, 6))
    out = p(class_labels=[1, 2], guidance_scale=4.0, generator=gen(0), num_inference_steps=10, output_type="pt",
            emag=e)
    assert torch.equal(out.images, expected.images) and any(r.chosen for r in p.emag_trace)
    del lat


@pytest.mark.parametrize("variant", ["full", "q"])
def test_neutral_nested_is_plain_cfg_on_the_same_rows(pipe, variant):
    cfg = pipe(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=N, guidance_scale=1.5,
               output_type="latent", generator=gen(), noise_layout="samples").images
    out = run(pipe, scale=1.0, variant=variant, guided_channels=4)
    assert torch.equal(out, cfg)


def test_emag_guides_three_of_four_channels_by_default_as_the_reference(pipe):
    """docs/method.md section 7.2: the DiT combination is applied to the first 3 latent channels; the 4th and the
    variance channels come from the conditional prediction. Default EMAG at w_e = 1 is therefore the
    original DiT sampler's CFG, not diffusers' 4-channel one."""
    kw = dict(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=N, guidance_scale=1.5,
              output_type="latent", noise_layout="samples")
    three = pipe(**kw, generator=gen(), guidance=[emag.CFG(1.5, guided_channels=3)]).images
    four = pipe(**kw, generator=gen()).images
    assert not torch.equal(three, four)
    assert torch.equal(run(pipe, scale=1.0, guided_channels=None), three)


CASES = [
    ("full", "adaptive", 2, "nested", "cond", (1, 2)),
    ("full", "all", 0, "nested", "cond", (1, 2)),
    ("full", "entropy", 1, "nested", "cond", (1, 2)),
    ("full", "entropy_adaptive", 3, "nested", "cond", (1, 2)),
    ("full", "adaptive", 2, "additive", "additive", (1, 2)),
    ("full", "entropy", 1, "additive", "additive", (1, 2)),
    ("full", "adaptive", 2, "emag_only", "uncond", (1000, 1000)),
    ("q", "adaptive", 2, "nested", "cond", (1, 2)),
    ("q", "all", 0, "additive", "additive", (1, 2)),
    ("q", "adaptive", 2, "emag_only", "uncond", (1000, 1000)),
]


@pytest.mark.parametrize("variant, selection, mode, combination, combo, labels", CASES)
def test_equals_the_straightforward_reference(pipe, variant, selection, mode, combination, combo, labels):
    ref, _ = ref_dit_sample(pipe, list(labels), dit_latents(2), N, 1.5, 3.0, LAYERS, gen(), ema=EMA, apply=APPLY,
                            mode=mode, combo=combo, variant=variant)
    out = run(pipe, labels, variant=variant, selection=selection, combination=combination)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    cfg_only = run(pipe, labels, scale=1.0 if combination != "additive" else 0.0, variant=variant,
                   selection=selection, combination=combination)
    assert not torch.equal(out, cfg_only)


@pytest.mark.parametrize("w", [1.0, 0.5])
def test_cfg_scale_at_or_below_one_follows_the_reference_formula(pipe, w):
    """The DiT reference runs cond, uncond (both feed the EMA) and perturbed passes every step and returns
    u + w (eps' - u) for any w (docs/method.md section 7.2): at w = 1 the unconditional pass still feeds the EMA, and
    w < 1 is not diffusers' "no CFG"."""
    ref, _ = ref_dit_sample(pipe, [1, 2], dit_latents(2), N, w, 3.0, LAYERS, gen(), ema=EMA, apply=APPLY)
    e = emag.EMAG(scale=3.0, layers=LAYERS, guided_channels=3, **windows())
    out = pipe(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=N, guidance_scale=w,
               output_type="latent", generator=gen(), emag=e).images
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    if w == 1.0:  # opt-in: the EMA fed by the conditional pass alone (no unconditional pass at all)
        e1 = emag.EMAG(scale=3.0, layers=LAYERS, guided_channels=3, cond_only_score=True, **windows())
        cond_only = pipe(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=N, guidance_scale=w,
                         output_type="latent", generator=gen(), emag=e1).images
        assert pipe.guidance_engine.last_passes and not any(
            "uncond" in p for p in pipe.guidance_engine.last_passes)
        assert (cond_only - ref).abs().max() > 1e-4 * ref.abs().max()


@pytest.mark.parametrize("variant", ["full", "q"])
def test_feeding_the_ema_by_head_chunks_equals_the_reference(pipe, monkeypatch, variant):
    """Large maps are fed one chunk of heads at a time (bounded temporaries): same result."""
    from emag.guidance.emag import state as emag_attention

    monkeypatch.setattr(emag_attention, "FEED_CHUNK_ELEMENTS", 1)  # one head per chunk
    ref, _ = ref_dit_sample(pipe, [1, 2], dit_latents(2), N, 1.5, 3.0, LAYERS, gen(), ema=EMA, apply=APPLY,
                            variant=variant)
    out = run(pipe, (1, 2), variant=variant)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_equals_reference_with_per_sample_selection(pipe):
    ref, _ = ref_dit_sample(pipe, [1, 2], dit_latents(2), N, 1.5, 3.0, LAYERS, gen(), ema=EMA, apply=APPLY,
                            per_sample=True)
    out = run(pipe, per_sample=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_equals_reference_numerics_with_explicit_attention_everywhere(pipe):
    ref, _ = ref_dit_sample(pipe, [1, 2], dit_latents(2), N, 1.5, 3.0, LAYERS, gen(), ema=EMA, apply=APPLY,
                            fused_when_idle=False)
    out = run(pipe)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    exact = run(pipe, explicit_attention=True, fast=False)
    torch.testing.assert_close(exact, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    assert (exact - ref).abs().max() <= (out - ref).abs().max()


def test_reference_windows_and_preset_at_250_steps(pipe):
    pipe(class_labels=[3], num_inference_steps=250, guidance_scale=1.5, output_type="latent", generator=gen(),
         emag=emag.EMAG.preset("dit-xl-2", layers=[2, 3]))
    trace = pipe.emag_trace
    assert [r.index for r in trace] == list(range(99, 200))
    assert [r.index for r in trace if r.apply] == list(range(149, 200))
    assert all(len(r.chosen) == 1 for r in trace if r.apply)


def test_ddpm_sampler_matches_the_original_respacing():
    s = emag.dit_reference_scheduler()
    s.set_timesteps(250)
    ts, betas, post_var = ref_respaced_ddpm()
    assert torch.equal(s.timesteps, ts)
    assert s.timesteps[:3].tolist() == [999, 995, 991] and s.timesteps[-1] == 0
    for i, t in enumerate(s.timesteps[:-1].tolist()):
        v_min = s._get_variance(t, predicted_variance=torch.tensor(-1.0))  # log posterior variance
        v_max = s._get_variance(t, predicted_variance=torch.tensor(1.0))  # log beta of the respaced chain
        assert v_min.item() == pytest.approx(post_var[i].log().item(), rel=1e-4)
        assert v_max.item() == pytest.approx(betas[i].log().item(), rel=1e-4)


def test_same_seed_twice_is_identical(pipe):
    kw = dict(class_labels=[1, 2], num_inference_steps=N, guidance_scale=1.5, output_type="latent",
              emag=emag.EMAG(scale=3.0, layers=LAYERS, **windows()))
    assert torch.equal(pipe(**kw, generator=gen(8)).images, pipe(**kw, generator=gen(8)).images)


def test_hooks_removed_after_success_and_error(pipe):
    def boom(p, i, t, kw):
        if i == 5:
            raise RuntimeError("stop here")
        return {}

    with pytest.raises(RuntimeError, match="stop here"):
        pipe(class_labels=[1], num_inference_steps=N, output_type="latent", callback_on_step_end=boom,
             emag=emag.EMAG(scale=3.0, layers=LAYERS, **windows()))
    mods = [b.attn1 for b in pipe.transformer.transformer_blocks]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in mods)
    assert not _get_current_function_mode_stack()


def test_callback_gets_latents_of_the_samples(pipe):
    shapes = []
    pipe(class_labels=[1, 2, 3], num_inference_steps=4, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: shapes.append(tuple(kw["latents"].shape)) or {})
    assert shapes == [(3, 4, 8, 8)] * 4


def test_noise_layouts_differ_under_ddpm_and_agree_under_ddim(base, pipe):
    kw = dict(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=6, guidance_scale=3.0,
              output_type="latent")
    a = pipe(**kw, generator=gen(), noise_layout="doubled").images
    b = pipe(**kw, generator=gen(), noise_layout="samples").images
    assert not torch.equal(a, b)
    ddim = emag.DiTEMAGPipeline.from_pipe(base)
    assert torch.equal(ddim(**kw, noise_layout="doubled").images, ddim(**kw, noise_layout="samples").images)


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_labels=[1001]), "Class ids"),
    (dict(class_labels=[]), "empty"),
    (dict(class_labels=[1], latents=torch.zeros(2, 4, 8, 8)), "shape"),
    (dict(class_labels=[1], noise_layout="pairs"), "noise_layout"),
    (dict(class_labels=[1], emag=emag.EMAG(layers=[9])), "out of range"),
    (dict(class_labels=[1], emag=emag.EMAG(layers=[1], guided_channels=5, ema_window=(0, 1), apply_window=(0.5, 1))),
     "guided_channels"),
    # the reference's absolute DiT windows never open at 3 steps: an error, not a silent no-op
    (dict(class_labels=[1], emag=emag.EMAG(layers=[1])), "selects none of the 3 sampling steps.*num_inference_steps=250"),
    (dict(class_labels=[1], guidance=[emag.CFGZeroStar(2.0)]), "flow-matching"),
])
def test_bad_inputs(pipe, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(num_inference_steps=3, output_type="latent", **kwargs)


def test_emag_defaults_are_the_reference_protocol(pipe, base):
    """docs/method.md section 7.2: with EMAG the DiT pipeline defaults to CFG 1.5 and the 250-step sampler (whose absolute
    windows then open); without EMAG it keeps diffusers' 4.0 and 50 steps."""
    pipe(class_labels=[1], output_type="latent", generator=gen(), emag=emag.EMAG(layers=LAYERS))
    assert pipe.scheduler.num_inference_steps == 250 and any(r.apply for r in pipe.emag_trace)
    cfg = next(r for r in pipe.guidance_runtimes if r.name == "cfg")
    assert cfg.config.scale == 1.5
    pipe(class_labels=[1], output_type="latent", generator=gen())
    assert [r.config.scale for r in pipe.guidance_runtimes] == [4.0] and pipe.scheduler.num_inference_steps == 50
    with pytest.warns(UserWarning, match="dit_reference_scheduler"):  # the hub's DDIM is not the reference sampler
        emag.DiTEMAGPipeline.from_pipe(base)(class_labels=[1], output_type="latent", num_inference_steps=N,
                                             emag=emag.EMAG(layers=LAYERS, **windows()))


def test_additive_emag_draws_noise_for_the_doubled_batch_in_either_api(pipe):
    """docs/method.md section 7.2: the additive reference variant draws ancestral noise for all 2B rows."""
    e = emag.EMAG(scale=3.0, layers=LAYERS, combination="additive", **windows("additive"))
    kw = dict(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=N, guidance_scale=1.5,
              output_type="latent")
    legacy = pipe(**kw, generator=gen(), emag=e).images
    listed = pipe(**kw, generator=gen(), guidance=[emag.CFG(1.5), e]).images
    assert torch.equal(listed, legacy)
    assert not torch.equal(pipe(**kw, generator=gen(), emag=e, noise_layout="samples").images, legacy)
