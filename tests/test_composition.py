"""The composable guidance API: engine invariants, PAG and SLG against diffusers' own implementations."""

import pytest
import torch
from diffusers import StableDiffusion3PAGPipeline

import emag
from tiny_models import dit_latents, sd3_embeds, sd3_latents, tiny_dit_pipeline, tiny_sd3_pipeline

N = 6


@pytest.fixture(scope="module")
def base():
    p = tiny_sd3_pipeline(num_layers=6)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def pipe(base):
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def kw(**extra):
    d = dict(**sd3_embeds(2), latents=sd3_latents(2), num_inference_steps=N, guidance_scale=5.0, output_type="latent")
    d.update(extra)
    return d


def test_cfg_term_is_the_base_pipeline_and_guidance_scale_still_works(base, pipe):
    expected = base(**kw()).images
    assert torch.equal(pipe(**kw(guidance=[emag.CFG(5.0)])).images, expected)
    assert torch.equal(pipe(**kw()).images, expected)
    # CFG(1) is neutral: no unconditional pass, the conditional prediction exactly
    assert torch.equal(pipe(**kw(guidance=[emag.CFG(1.0)])).images, base(**kw(guidance_scale=1.0)).images)


@pytest.mark.parametrize("term", [emag.PAG(0.0, layers=[2]), emag.SLG(0.0, layers=[2]), emag.STG(0.0, layers=[1]),
                                  emag.EMAG(scale=1.0, layers=[1, 2])])
def test_neutral_perturbation_terms_give_cfg_exactly(base, pipe, term):
    assert torch.equal(pipe(**kw(guidance=[emag.CFG(5.0), term])).images, base(**kw()).images)


@pytest.mark.parametrize("term", [emag.PAG(3.0, layers=[2]), emag.SLG(2.0, layers=[2], window=(0, 1)),
                                  emag.STG(2.0, layers=[1], mode="attention"), emag.STG(2.0, layers=[3])])
def test_perturbation_really_changes_the_prediction(base, pipe, term):
    assert not torch.equal(pipe(**kw(guidance=[emag.CFG(5.0), term])).images, base(**kw()).images)


def test_pag_equals_diffusers_sd3_pag_pipeline(base):
    """diffusers' SD3 PAG pipeline masks image->image to the identity with text keys visible."""
    ref_pipe = StableDiffusion3PAGPipeline.from_pipe(base, pag_applied_layers=["blocks.2"])
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe(**kw(pag_scale=3.0)).images
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    # diffusers batches [uncond, cond, perturbed] in one pass: batching="all" is the same layout
    out = p(**kw(guidance=[emag.CFG(5.0), emag.PAG(3.0, layers=[2])], batching="all")).images
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_pag_layer_1_never_matches_10():
    """The diffusers regex "blocks.1" also hits blocks 10-19 (#13594); integer layers cannot."""
    big = tiny_sd3_pipeline(num_layers=12)
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(big)
    p.set_progress_bar_config(disable=True)
    p(**kw(num_inference_steps=2, guidance=[emag.CFG(5.0), emag.PAG(3.0, layers="1")]))
    pag = [r for r in p.guidance_runtimes if r.name == "pag"][0]
    assert pag.layers == (1,)
    calls = []
    for i, blk in enumerate(big.transformer.transformer_blocks):
        blk.attn.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    try:
        p(**kw(num_inference_steps=1, guidance=[emag.PAG(3.0, layers=[1])], guidance_scale=1.0))
    finally:
        for blk in big.transformer.transformer_blocks:
            blk.attn._forward_pre_hooks.clear()
    assert sorted(calls) == sorted(list(range(12)) * 2)  # cond pass + PAG pass, every block once each


def test_slg_equals_diffusers_builtin_skip_layer_guidance(base, pipe):
    """Same steps: diffusers' strict (0.05, 0.45) at N=10 is our half-open Window(0.1, 0.5) = steps 1-4."""
    ref = base(**kw(num_inference_steps=10, skip_guidance_layers=[2, 3], skip_layer_guidance_scale=2.8,
                    skip_layer_guidance_start=0.05, skip_layer_guidance_stop=0.45)).images
    out = pipe(**kw(num_inference_steps=10, guidance=[emag.CFG(5.0), emag.SLG(2.8, layers=[2, 3], window=(0.1, 0.5))])).images
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


def test_branches_only_when_needed_and_batching_policies(pipe):
    g = [emag.CFG(5.0, window=(0.5, 1.0)), emag.PAG(3.0, layers=[2], window=(0.0, 0.5))]
    seen = []
    pipe(**kw(guidance=g, callback_on_step_end=lambda p, i, t, k: seen.append(
        [list(x) for x in p.guidance_engine.last_passes]) or {}))
    assert seen[0] == [["cond"], ["pag:2"]]  # no unconditional pass outside the CFG window
    assert seen[-1] == [["uncond", "cond"]]  # no PAG pass outside its window
    outs = {b: pipe(**kw(guidance=[emag.CFG(5.0), emag.PAG(3.0, layers=[2]), emag.SLG(1.0, layers=[3], window=(0, 1))],
                          batching=b, num_inference_steps=2)).images for b in ("normal", "all", "none")}
    for b in ("all", "none"):
        # batch composition changes fused-kernel rounding only
        torch.testing.assert_close(outs[b], outs["normal"], rtol=1e-5, atol=1e-5 * outs["normal"].abs().max().item())


def test_guidance_interval_skips_uncond_by_sigma(pipe):
    seen = []
    pipe(**kw(num_inference_steps=10, guidance=[emag.CFG(5.0, interval=(0.28, 5.42))],
              callback_on_step_end=lambda p, i, t, k: seen.append(p.guidance_engine.last_passes[0]) or {}))
    sig = pipe.scheduler.sigmas[:10].tolist()
    expected = [0.28 < s / (1 - s) <= 5.42 if s < 1 else False for s in sig]
    assert [("uncond" in x) for x in seen] == expected and any(expected) and not all(expected)


def test_cfg_rescale_matches_formula(base, pipe):
    """One step from identical noise: rescale by hand from the plain CFG branches."""
    out = pipe(**kw(num_inference_steps=1, guidance=[emag.CFG(5.0, rescale=0.7)])).images
    plain = base(**kw(num_inference_steps=1)).images
    assert not torch.equal(out, plain)
    x = sd3_latents(2)
    # v = (x_prev - x) / (sigma_next - sigma) for Euler
    s = pipe.scheduler.sigmas
    v_plain = (plain - x) / (s[1] - s[0])
    v_out = (out - x) / (s[1] - s[0])
    uc = base.transformer(hidden_states=torch.cat([x, x]), timestep=(s[0] * 1000).expand(4),
                          encoder_hidden_states=torch.cat([sd3_embeds(2)["negative_prompt_embeds"], sd3_embeds(2)["prompt_embeds"]]),
                          pooled_projections=torch.cat([sd3_embeds(2)["negative_pooled_prompt_embeds"],
                                                        sd3_embeds(2)["pooled_prompt_embeds"]]), return_dict=False)[0]
    c = uc.chunk(2)[1]
    std_c = c.std(dim=[1, 2, 3], keepdim=True)
    std_g = v_plain.std(dim=[1, 2, 3], keepdim=True)
    expected = 0.7 * v_plain * std_c / std_g + 0.3 * v_plain
    torch.testing.assert_close(v_out, expected, rtol=1e-3, atol=1e-3)


def test_cfg_rescale_runs_in_its_own_space_whatever_the_combine_space(base, pipe):
    """The std matching is not affine (docs/guidance.md section 2.2): by default it runs on the velocity (diffusers'),
    also when another term makes the call combine in x0 space; rescale_space="x0" rescales x0 estimates."""
    g = [emag.CFG(5.0, rescale=0.7)]
    native = pipe(**kw(num_inference_steps=1, guidance=g)).images
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipe(**kw(num_inference_steps=1, guidance=g, combine_space="x0")).images, native, **close)
    sag_off = [emag.CFG(5.0, rescale=0.7), emag.SAG(1e-9)]  # SAG asks for x0 space; its term is ~0
    torch.testing.assert_close(pipe(**kw(num_inference_steps=1, guidance=sag_off)).images, native, **close)
    # rescale_space="x0": the formula on x0 = x - sigma v, by hand
    out = pipe(**kw(num_inference_steps=1, guidance=[emag.CFG(5.0, rescale=0.7, rescale_space="x0")])).images
    plain = base(**kw(num_inference_steps=1)).images
    x, s = sd3_latents(2), pipe.scheduler.sigmas
    v_g = (plain - x) / (s[1] - s[0])
    e = sd3_embeds(2)
    uc = base.transformer(hidden_states=torch.cat([x, x]), timestep=(s[0] * 1000).expand(4),
                          encoder_hidden_states=torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]]),
                          pooled_projections=torch.cat([e["negative_pooled_prompt_embeds"], e["pooled_prompt_embeds"]]),
                          return_dict=False)[0]
    x0_g, x0_c = x - s[0] * v_g, x - s[0] * uc.chunk(2)[1]
    dims = [1, 2, 3]
    x0_r = 0.7 * x0_g * x0_c.std(dim=dims, keepdim=True) / x0_g.std(dim=dims, keepdim=True) + 0.3 * x0_g
    torch.testing.assert_close((out - x) / (s[1] - s[0]), (x - x0_r) / s[0], rtol=1e-3, atol=1e-3)
    assert (out - native).abs().max() > 1e-3  # the space matters
    with pytest.raises(ValueError, match="rescale_space"):
        emag.CFG(5.0, rescale=0.7, rescale_space="eps")


@pytest.mark.parametrize("make", [lambda **r: emag.APG(5.0, **r), lambda **r: emag.CFGZeroStar(5.0, zero_init_steps=0, **r)])
def test_rescale_after_apg_and_cfg_zero_star(base, pipe, make):
    """diffusers applies CFG rescale after APG and CFG-Zero* too: phi D_g std(c) / std(D_g) + (1 - phi) D_g on the
    velocity, D_g the method's own output (one step from identical noise, by hand)."""
    x, s = sd3_latents(2), pipe.scheduler.sigmas
    plain = pipe(**kw(num_inference_steps=1, guidance=[make()])).images
    out = pipe(**kw(num_inference_steps=1, guidance=[make(rescale=0.7)])).images
    e = sd3_embeds(2)
    c = base.transformer(hidden_states=x, timestep=(s[0] * 1000).expand(2), encoder_hidden_states=e["prompt_embeds"],
                         pooled_projections=e["pooled_prompt_embeds"], return_dict=False)[0]
    v_g = (plain - x) / (s[1] - s[0])
    dims = [1, 2, 3]
    expected = 0.7 * v_g * c.std(dim=dims, keepdim=True) / v_g.std(dim=dims, keepdim=True) + 0.3 * v_g
    torch.testing.assert_close((out - x) / (s[1] - s[0]), expected, rtol=1e-3, atol=1e-3)
    assert (out - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rescale"):
        make(rescale=1.5)


def test_cfg_without_a_scale_takes_the_calls_guidance_scale(pipe):
    assert torch.equal(pipe(**kw(guidance=[emag.CFG()], guidance_scale=3.0)).images,
                       pipe(**kw(guidance=[emag.CFG(3.0)])).images)
    d = emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=6))
    d.set_progress_bar_config(disable=True)
    k = dict(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=4, output_type="latent")
    assert torch.equal(d(**k, guidance=[emag.CFG()]).images, d(**k, guidance=[emag.CFG(4.0)]).images)  # diffusers' 4
    em = emag.EMAG(layers=[1, 2], ema_window=(0, 1), apply_window=(0.25, 1))
    with pytest.warns(UserWarning, match="250-step"):  # the tiny DiT is ImageNet-shaped, default scheduler
        ref = d(**k, guidance=[emag.CFG(1.5), em]).images
        assert torch.equal(d(**k, guidance=[emag.CFG(), em]).images, ref)  # the EMAG protocol's 1.5


def test_cfg_zero_star_zero_init_ignores_the_window_and_zeroes_every_term(pipe):
    """diffusers' guider tests step < zero_init_steps before its window; the step's output is 0 (docs/guidance.md section 4.4)."""
    def stays(p, i, t, k):
        if i == 0:
            torch.testing.assert_close(k["latents"], sd3_latents(2), rtol=0, atol=0)
        return {}

    for g in ([emag.CFGZeroStar(4.0, zero_init_steps=1, window=(0.5, 1.0))],
              [emag.CFGZeroStar(4.0, zero_init_steps=1), emag.PAG(3.0, layers=[2])]):
        pipe(**kw(num_inference_steps=3, guidance=g, callback_on_step_end=stays))
    assert pipe.guidance_engine.last_passes  # with PAG the passes still ran (their result is discarded)


def test_cfg_zero_star_zero_init_and_scale(pipe):
    out1 = pipe(**kw(num_inference_steps=3, guidance=[emag.CFGZeroStar(4.0, zero_init_steps=1)],
                     callback_on_step_end=lambda p, i, t, k: {"latents": k["latents"]} if i else
                     (torch.testing.assert_close(k["latents"], sd3_latents(2)) or {}))).images
    assert out1.shape == sd3_latents(2).shape


@pytest.mark.parametrize("original", [False, True])
def test_cfg_zero_star_combination_against_the_formula(original):
    """docs/guidance.md section 4.4: s* = <c, u> / (||u||^2 + 1e-8) per sample; D = s* u + w (c - s* u), or in the
    original formulation D = c + w (c - s* u); zero output for the first zero_init_steps steps."""
    from emag.families import SD3
    from emag.guidance.base import Setup
    from emag.windows import StepContext

    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    cfg = emag.CFGZeroStar(3.0, zero_init_steps=1, original_formulation=original)
    rt = cfg.runtime(Setup(SD3, 4, 10, 2))
    s = torch.stack([(c[i].double() * u[i].double()).sum() / (u[i].double().pow(2).sum() + 1e-8) for i in range(2)])
    s = s.view(2, 1, 1, 1)
    expected = c + 3.0 * (c - s * u) if original else s * u + 3.0 * (c - s * u)
    got = rt.combine(c, u, {}, StepContext(1, 10))
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(rt.combine(c, u, {}, StepContext(0, 10)), torch.zeros_like(c))


def test_cfg_zero_star_zero_init_step_runs_no_model_pass(pipe, monkeypatch):
    """docs/guidance.md section 4.4: a zero-init step can skip the model entirely: no pass, the same latents."""
    from emag.guidance.cfg import CFGZeroStarRuntime

    g = [emag.CFGZeroStar(4.0, zero_init_steps=1)]
    pipe(**kw(num_inference_steps=1, guidance=g))
    assert pipe.guidance_engine.last_passes == []
    fast = pipe(**kw(num_inference_steps=3, guidance=g)).images
    real = CFGZeroStarRuntime.zero_output
    monkeypatch.setattr(CFGZeroStarRuntime, "zero_output", lambda self, ctx: False)  # run the passes
    monkeypatch.setattr(CFGZeroStarRuntime, "combine", lambda self, c, u, p, ctx, _c=CFGZeroStarRuntime.combine:
                        torch.zeros_like(c) if real(self, ctx) else _c(self, c, u, p, ctx))
    assert torch.equal(pipe(**kw(num_inference_steps=3, guidance=g)).images, fast)
    pipe(**kw(num_inference_steps=1, guidance=g))
    assert pipe.guidance_engine.last_passes != []


def test_dit_composition_pag_and_neutral(tmp_path):
    base = tiny_dit_pipeline(num_layers=6, bounded=True)
    p = emag.DiTEMAGPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    k = dict(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=5, guidance_scale=3.0, output_type="latent")
    cfg = p(**k).images
    assert torch.equal(p(**k, guidance=[emag.CFG(3.0), emag.PAG(0.0)], noise_layout="doubled").images, cfg)
    assert not torch.equal(p(**k, guidance=[emag.CFG(3.0), emag.PAG(2.0, layers=[3])]).images, cfg)


@pytest.mark.parametrize("bad, match", [
    (dict(guidance=[emag.PAG(3.0, layers=[6])]), "out of range"),
    (dict(guidance=emag.CFG(3.0)), "list"),
])
def test_bad_guidance_lists(pipe, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        pipe(**kw(**bad))


@pytest.mark.parametrize("make, match", [
    (lambda: emag.PAG(-1.0), "scale"), (lambda: emag.PAG(float("nan")), "finite"),
    (lambda: emag.CFG(3.0, rescale=2.0), "rescale"), (lambda: emag.CFG(3.0, interval=(2.0, 1.0)), "lo < hi"),
    (lambda: emag.CFG(3.0, interval=(0.1, 1.0), window=(0, 1)), "not both"),
    (lambda: emag.STG(1.0, mode="x"), "mode"), (lambda: emag.SLG(1.0, layers="a"), "parse"),
    (lambda: emag.CFGZeroStar(2.0, zero_init_steps=-1), "zero_init"),
])
def test_bad_term_configs(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_auto_batching_is_normal_on_cpu(pipe):
    """`batching="auto"` measures memory on CUDA; on the CPU it is the "normal" layout exactly."""
    g = [emag.CFG(5.0), emag.PAG(3.0, layers=[2])]
    auto = pipe(**kw(guidance=g, batching="auto")).images
    assert [list(x) for x in pipe.guidance_engine.last_passes] == [["uncond", "cond"], ["pag:2"]]
    assert torch.equal(auto, pipe(**kw(guidance=g, batching="normal")).images)
    with pytest.raises(ValueError, match="batching"):
        pipe(**kw(guidance=g, batching="everything"))


def test_auto_batching_decision(pipe, monkeypatch):
    """The GPU side of `batching="auto"`, simulated: with a measured activation size per row, one pass
    over every branch when 1.25x its size fits in the free memory, the normal split otherwise."""
    from emag import engine as engine_module
    from emag.guidance.base import Branch

    g = [emag.CFG(5.0), emag.PAG(3.0, layers=[2])]
    pipe(**kw(guidance=g, batching="auto"))
    engine = pipe.guidance_engine
    todo = [Branch("uncond", "uncond"), Branch("cond", "cond"), Branch("pag:2", "cond")]
    rows = 3 * engine.conditions["cond"].embeds.shape[0]
    engine._bytes_per_row = 1000.0
    monkeypatch.setattr(engine_module, "free_accelerator_memory", lambda: int(1000 * rows * 1.25) + 1)
    assert [[b.name for b in p] for p in engine._passes(todo, ["uncond", "cond"])] == [["uncond", "cond", "pag:2"]]
    monkeypatch.setattr(engine_module, "free_accelerator_memory", lambda: int(1000 * rows * 1.25) - 1)
    assert [[b.name for b in p] for p in engine._passes(todo, ["uncond", "cond"])] == [["uncond", "cond"], ["pag:2"]]
    monkeypatch.setattr(engine_module, "free_accelerator_memory", lambda: None)  # no CUDA
    assert len(engine._passes(todo, ["uncond", "cond"])) == 2


def test_suffix_branches_join_the_pass_only_with_all(pipe):
    """batching="all" lets a branch resuming at block k join the pass of its source; "normal" and
    "none" keep it apart, and per-row embedding rewrites (DiT CADS) prevent joining."""
    from dataclasses import replace

    from emag.guidance.base import Branch

    pipe(**kw(guidance=[emag.CFG(5.0)], batching="all"))
    engine = pipe.guidance_engine
    todo = [Branch("uncond", "uncond"), Branch("cond", "cond"),
            Branch("emag:cond", "cond", start_block=2, source="cond")]
    names = lambda passes: [[b.name for b in p] for p in passes]  # noqa: E731
    assert names(engine._passes(todo, ["uncond", "cond"])) == [["uncond", "cond", "emag:cond"]]
    rewritten = {k: replace(v, embeds=v.embeds) for k, v in engine.conditions.items()}
    for v in rewritten.values():
        v.embedding = lambda e: e  # what CADS sets on DiT's class conditions
    assert names(engine._passes(todo, ["uncond", "cond"], rewritten)) == [["uncond", "cond"], ["emag:cond"]]
    engine.batching = "normal"
    assert names(engine._passes(todo, ["uncond", "cond"])) == [["uncond", "cond"], ["emag:cond"]]
