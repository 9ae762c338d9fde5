"""APG and CADS: equations against independent hand-written versions, composition, state and RNG hygiene."""

import dataclasses
import math

import pytest
import torch
from diffusers import DDPMScheduler

import emag
from emag.guidance.apg import apg_clamp, apg_project
from emag.guidance.base import GuidanceConfig, TermRuntime
from emag.guidance.cads import cads_anneal, cads_gamma
from emag.windows import AllSteps
from tiny_models import dit_latents, sd3_embeds, sd3_latents, tiny_dit_pipeline, tiny_sd3_pipeline

N = 4


@pytest.fixture(scope="module")
def pipe():
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(tiny_sd3_pipeline(num_layers=6))
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def dit():
    p = emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=6, bounded=True))
    p.set_progress_bar_config(disable=True)
    return p


def kw(**extra):
    d = dict(**sd3_embeds(2), latents=sd3_latents(2), num_inference_steps=N, guidance_scale=5.0, output_type="latent")
    d.update(extra)
    return d


def dkw(**extra):
    d = dict(class_labels=[1, 2], latents=dit_latents(2), num_inference_steps=N, guidance_scale=3.0, output_type="latent")
    d.update(extra)
    return d


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


#----------------------------------------------------------------------------
# An independent APG (paper Algorithm 1), written without the library's helpers.

def ref_apg_update(diff, cond, state, key, eta, beta, r, rms=False):
    """Momentum (state[key], unclamped), clamp, projection; returns the float64 update."""
    d = diff.double()
    m = d + beta * state[key] if key in state else d
    state[key] = m
    flat = m.reshape(m.shape[0], -1)
    if r > 0:
        norm = flat.norm(dim=1)
        if rms:
            norm = norm / math.sqrt(flat.shape[1])
        state.setdefault("clamped", []).append(bool((norm > r).any()))
        state.setdefault("norms", []).append(float(norm.max()))
        flat = flat * torch.clamp(r / norm, max=1.0)[:, None]
    cf = cond.double().reshape(cond.shape[0], -1)
    unit = cf / cf.norm(dim=1, keepdim=True)
    par = (flat * unit).sum(dim=1, keepdim=True) * unit
    return ((flat - par) + eta * par).reshape(diff.shape)


class HandBase(GuidanceConfig):
    """A test-only base term: ``fn(refined, u, p, state)`` is the whole combination."""

    def __init__(self, fn, space="x0"):
        self.fn, self.space, self.state = fn, space, {}

    def uses_uncond(self, family, guidance_scale):
        return True

    def runtime(self, setup):
        rt = TermRuntime(self, AllSteps())
        rt.kind, rt.space, rt.name = "base", self.space, "hand"
        self.state = {}
        rt.combine = lambda c, u, p, ctx: self.fn(c, u, p, self.state)
        return rt


#----------------------------------------------------------------------------
# APG: pure functions.

def test_apg_clamp_absolute_and_rms_and_projection():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(3, 4, 5, 5, generator=g) * torch.tensor([0.1, 1.0, 10.0])[:, None, None, None]
    norms = d.flatten(1).norm(dim=1)
    out = apg_clamp(d, 2.0)
    close(out.flatten(1).norm(dim=1), torch.clamp(norms, max=2.0))
    assert torch.equal(out[0], d[0])  # below the radius: untouched
    assert torch.equal(apg_clamp(d, 0.0), d)  # r = 0 disables
    rms = apg_clamp(d, 2.0, "rms")  # compares r with ||d|| / sqrt(100)
    close(rms.flatten(1).norm(dim=1), torch.clamp(norms, max=2.0 * 10))
    c = torch.randn(3, 4, 5, 5, generator=g)
    par, orth = apg_project(d, c)
    assert par.dtype == torch.float64
    assert (orth * c.double()).flatten(1).sum(1).abs().max() < 1e-10
    close(par + orth, d.double())


def test_apg_paper_convention_is_diffusers_original_formulation_with_w_minus_1():
    """docs/guidance.md section 5.3: paper ``c + (w - 1) update`` == diffusers(use_original_formulation, w - 1)."""
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

    w, eta, beta, r = 6.0, 0.4, -0.5, 3.0
    rt = emag.APG(w, eta=eta, momentum=beta, norm_threshold=r).runtime(type("S", (), {"family": "sd3"})())
    buf = MomentumBuffer(beta)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        c, u = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64)
        ref = normalized_guidance(c, u, w - 1, buf, eta, r, use_original_formulation=True)
        torch.testing.assert_close(rt.combine(c, u, {}, None), ref, rtol=1e-12, atol=1e-12)


#----------------------------------------------------------------------------
# APG in the pipelines.

@pytest.mark.parametrize("space", ["x0", "native"])
def test_apg_with_eta1_no_momentum_no_clamp_is_cfg(pipe, space):
    expected = pipe(**kw(guidance=[emag.CFG(5.0)])).images
    out = pipe(**kw(guidance=[emag.APG(5.0, eta=1.0, momentum=0.0, norm_threshold=0.0, space=space)])).images
    close(out, expected)


def test_apg_neutral_is_cfg_on_dit(dit):
    expected = dit(**dkw(guidance=[emag.CFG(3.0)])).images
    close(dit(**dkw(guidance=[emag.APG(3.0, eta=1.0, momentum=0.0, norm_threshold=0.0)])).images, expected)


def test_apg_one_step_by_hand_in_x0_space_sd3(pipe):
    """One Euler step from sigma = 1 (where the reference's x0 conversion gave a zero velocity):
    x0 = x - sigma v, APG on x0, back to v = (x - x0) / sigma, then the Euler update."""
    w, eta, r = 4.0, 0.25, 3.0
    out = pipe(**kw(num_inference_steps=1, guidance=[emag.APG(w, eta=eta, momentum=-0.5, norm_threshold=r)])).images
    x, e = sd3_latents(2), sd3_embeds(2)
    s = pipe.scheduler.sigmas
    v = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=(s[0] * 1000).expand(4),
                         encoder_hidden_states=torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]]),
                         pooled_projections=torch.cat([e["negative_pooled_prompt_embeds"], e["pooled_prompt_embeds"]]),
                         return_dict=False)[0]
    x0_u, x0_c = x - s[0] * v[:2], x - s[0] * v[2:]
    x0 = x0_c + (w - 1) * ref_apg_update(x0_c - x0_u, x0_c, {}, "cfg", eta, -0.5, r).float()
    v_g = (x - x0) / s[0]
    assert v_g.abs().max() > 0.1
    close(out, x + (s[1] - s[0]) * v_g, 1e-4)


def test_apg_momentum_clamp_projection_over_steps_match_hand_version(pipe):
    w, eta, beta = 4.0, 0.3, -0.5
    probe = HandBase(lambda c, u, p, st: c + (w - 1) * ref_apg_update(c - u, c, st, "cfg", eta, beta, 1e30).to(c.dtype))
    pipe(**kw(guidance=[probe]))
    norms = sorted(probe.state["norms"])
    r = norms[len(norms) // 2]  # a threshold the momentum norm crosses on some steps only

    def hand(c, u, p, state):
        return c + (w - 1) * ref_apg_update(c - u, c, state, "cfg", eta, beta, r).to(c.dtype)

    h = HandBase(hand)
    expected = pipe(**kw(guidance=[h])).images
    assert True in h.state["clamped"] and False in h.state["clamped"]  # the clamp acts on some steps only
    out1 = pipe(**kw(guidance=[emag.APG(w, eta=eta, momentum=beta, norm_threshold=r)])).images
    close(out1, expected)
    out2 = pipe(**kw(guidance=[emag.APG(w, eta=eta, momentum=beta, norm_threshold=r)])).images
    assert torch.equal(out1, out2)  # the momentum buffer starts from zero in every call
    # the RMS threshold mode against the hand version
    r_rms = r / 8.0  # numel per sample = 4 x 8 x 8 = 256
    h = HandBase(lambda c, u, p, st: c + (w - 1) * ref_apg_update(c - u, c, st, "cfg", eta, beta, r_rms, rms=True).to(c.dtype))
    close(pipe(**kw(guidance=[emag.APG(w, eta=eta, momentum=beta, norm_threshold=r_rms, threshold_mode="rms")])).images,
          pipe(**kw(guidance=[h])).images)


def test_apg_negative_momentum_is_honoured_and_space_matters(pipe):
    base = dict(eta=0.0, norm_threshold=0.0)
    neg = pipe(**kw(guidance=[emag.APG(5.0, momentum=-0.5, **base)])).images
    zero = pipe(**kw(guidance=[emag.APG(5.0, momentum=0.0, **base)])).images
    assert (neg - zero).abs().max() > 1e-3
    native = pipe(**kw(guidance=[emag.APG(5.0, momentum=-0.5, space="native", **base)])).images
    assert (neg - native).abs().max() > 1e-3  # projection is not affine: x0 vs velocity differ


def test_affine_terms_are_the_same_in_x0_and_native_space(pipe, dit):
    g = [emag.CFG(5.0), emag.PAG(2.0, layers=[2])]
    native = pipe(**kw(guidance=g)).images
    x0 = pipe(**kw(guidance=g, combine_space="x0")).images
    assert not torch.equal(native, x0)  # really combined elsewhere (rounding)
    close(x0, native, 1e-5)
    g = [emag.CFG(3.0), emag.PAG(2.0, layers=[3])]
    native = dit(**dkw(guidance=g)).images
    x0 = dit(**dkw(guidance=g, combine_space="x0")).images
    assert not torch.equal(native, x0)
    close(x0, native, 1e-4)
    with pytest.raises(ValueError, match="combine_space"):
        pipe(**kw(guidance=g, combine_space="eps"))


EMAG_TERM = dict(scale=1.5, layers=[1, 2])


def test_emag_plus_apg_is_apg_on_the_emag_refined_conditional(pipe):
    """The paper's EMAG + APG: c' = c + (w_e - 1)(c - c_e), then APG on (c', u), all in x0 space."""
    w, w_e, eta, beta, r = 4.0, 1.5, 0.2, -0.5, 45.0
    seen = []

    def hand(refined, u, p, state):
        c = p["cond"]
        c_e = p.get("emag:cond")
        c_ref = c if c_e is None else c + (w_e - 1) * (c - c_e)
        seen.append(c_e is not None)
        close(refined, c_ref)  # the base term receives c'
        return c_ref + (w - 1) * ref_apg_update(c_ref - u, c_ref, state, "cfg", eta, beta, r).to(c.dtype)

    expected = pipe(**kw(guidance=[HandBase(hand), emag.EMAG(**EMAG_TERM)])).images
    assert any(seen) and not all(seen)  # steps with and without the EMAG replacement
    out = pipe(**kw(guidance=[emag.APG(w, eta=eta, momentum=beta, norm_threshold=r), emag.EMAG(**EMAG_TERM)])).images
    close(out, expected, 1e-4)
    plain = pipe(**kw(guidance=[emag.APG(w, eta=eta, momentum=beta, norm_threshold=r)])).images
    assert (out - plain).abs().max() > 1e-3


def test_apg_target_both_gives_each_direction_its_own_buffer(pipe):
    w, s, eta, beta, r = 4.0, 2.0, 0.2, -0.5, 45.0

    def hand(c, u, p, state):
        pag = p["pag:2"]
        cfg_part = (w - 1) * ref_apg_update(c - u, c, state, "cfg", eta, beta, r).to(c.dtype)
        pag_part = s * ref_apg_update(c - pag, c, state, "pag", eta, beta, r).to(c.dtype)
        return c + cfg_part + pag_part - s * (c - pag)  # the engine then adds PAG's linear delta

    expected = pipe(**kw(guidance=[HandBase(hand), emag.PAG(s, layers=[2])])).images
    out = pipe(**kw(guidance=[emag.APG(w, eta=eta, momentum=beta, norm_threshold=r, target="both"),
                              emag.PAG(s, layers=[2])])).images
    close(out, expected, 1e-4)


def test_apg_target_pert_on_emag_keeps_cfg_plain(pipe):
    w, w_e, eta, beta, r = 4.0, 1.5, 0.2, -0.5, 45.0

    def hand(refined, u, p, state):
        c, c_e = p["cond"], p.get("emag:cond")
        # EMAG is inactive (and its buffer untouched) at the steps without its branch
        c2 = c if c_e is None else c + (w_e - 1) * ref_apg_update(c - c_e, c, state, "emag", eta, beta, r).to(c.dtype)
        return u + w * (c2 - u)

    expected = pipe(**kw(guidance=[HandBase(hand), emag.EMAG(**EMAG_TERM)])).images
    out = pipe(**kw(guidance=[emag.APG(w, eta=eta, momentum=beta, norm_threshold=r, target="pert"),
                              emag.EMAG(**EMAG_TERM)])).images
    close(out, expected, 1e-4)


def test_apg_target_pert_without_cfg_skips_uncond_and_rejects_unknown_deltas(pipe):
    seen = []
    pipe(**kw(num_inference_steps=2, guidance_scale=1.0,
              guidance=[emag.APG(1.0, target="pert", norm_threshold=1.0), emag.PAG(2.0, layers=[2])],
              callback_on_step_end=lambda p, i, t, k: seen.append(list(p.guidance_engine.last_passes)) or {}))
    assert seen[0] == [["cond"], ["pag:2"]]

    class Odd(GuidanceConfig):
        def runtime(self, setup):
            rt = TermRuntime(self, AllSteps())
            rt.kind, rt.name = "additive", "odd"
            rt.delta = lambda c, p, ctx: 0.0 * c
            return rt

    with pytest.raises(ValueError, match="cannot shape the additive term 'odd'"):
        pipe(**kw(num_inference_steps=1, guidance=[emag.APG(3.0, target="pert"), Odd()]))


def test_apg_config_errors_and_defaults():
    for bad in (dict(target="unknown"), dict(scale=-1.0), dict(momentum=1.0), dict(space="eps"),
                dict(threshold_mode="l2"), dict(norm_threshold=-1.0), dict(eta=float("nan")), dict(eta=-0.1)):
        with pytest.raises(ValueError):
            emag.APG(**bad)
    assert emag.APG().resolved("sd3") == {"scale": 12.0, "norm_threshold": 7.5}
    assert emag.APG().resolved("dit")["norm_threshold"] == 5.0
    assert emag.APG(threshold_mode="rms").resolved("sd3")["norm_threshold"] == pytest.approx(7.5 / 512)


#----------------------------------------------------------------------------
# CADS.

def test_cads_gamma_breakpoints():
    assert cads_gamma(0.0, 0.6, 0.9) == 1.0 and cads_gamma(0.6, 0.6, 0.9) == 1.0
    assert cads_gamma(0.9, 0.6, 0.9) == 0.0 and cads_gamma(1.0, 0.6, 0.9) == 0.0
    assert cads_gamma(0.75, 0.6, 0.9) == pytest.approx(0.5)
    assert cads_gamma(0.66, 0.6, 0.9) == pytest.approx(0.8)


def test_cads_rescale_preserves_per_sample_mean_and_std():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 7, 16, generator=g) * torch.tensor([0.5, 2.0, 8.0])[:, None, None] + torch.tensor([-1.0, 0.0, 3.0])[:, None, None]
    n = torch.randn(y.shape, generator=g)
    out = cads_anneal(y, 0.3, n, 0.25, psi=1.0, rescale=True)
    close(out.mean(dim=(1, 2)), y.mean(dim=(1, 2)), 1e-5)
    close(out.std(dim=(1, 2)), y.std(dim=(1, 2)), 1e-5)
    raw = math.sqrt(0.3) * y + 0.25 * math.sqrt(0.7) * n
    close(cads_anneal(y, 0.3, n, 0.25, psi=0.0, rescale=True), raw)
    close(cads_anneal(y, 0.3, n, 0.25, rescale=False), raw)
    assert torch.equal(cads_anneal(y, 1.0, n, 0.25, rescale=False), y)


def capture_sd3(pipe):
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append((k["encoder_hidden_states"].clone(), k["pooled_projections"].clone())),
        with_kwargs=True)
    return calls, hook


def test_cads_feeds_the_same_noised_condition_to_cond_and_perturbed_branches_sd3(pipe):
    e = sd3_embeds(2)
    calls, hook = capture_sd3(pipe)
    try:
        pipe(**kw(num_inference_steps=3, guidance=[emag.CFG(5.0), emag.PAG(2.0, layers=[2]), emag.CADS(seed=11)]))
        pipe(**kw(num_inference_steps=1, guidance=[emag.CFG(5.0), emag.CADS(seed=11, apply_to="cond+uncond")]))
    finally:
        hook.remove()
    # step 0 (t = 1 >= tau2: gamma = 0): pass [uncond ; cond], then the PAG pass [cond']
    (emb0, pool0), (emb1, pool1) = calls[0], calls[1]
    assert torch.equal(emb1, emb0[2:]) and torch.equal(pool1, pool0[2:])
    assert torch.equal(emb0[:2], e["negative_prompt_embeds"])  # apply_to="cond": uncond untouched
    assert not torch.allclose(emb0[2:], e["prompt_embeds"]) and not torch.allclose(pool0[2:], e["pooled_prompt_embeds"])
    close(emb0[2:].std(dim=(1, 2)), e["prompt_embeds"].std(dim=(1, 2)), 1e-5)  # rescaled per sample
    # step 1 (t = 0.75, gamma = 0.5): a fresh draw, the branches still agree; step 2 (gamma = 1): clean
    (emb2, _), (emb3, _) = calls[2], calls[3]
    assert torch.equal(emb3, emb2[2:]) and not torch.allclose(emb2[2:], emb0[2:])
    assert not torch.allclose(emb2[2:], e["prompt_embeds"])
    assert torch.equal(calls[4][0][2:], e["prompt_embeds"]) and torch.equal(calls[5][0], e["prompt_embeds"])
    # apply_to="cond+uncond": the negative gets its own draw
    emb4, _ = calls[6]
    assert not torch.allclose(emb4[:2], e["negative_prompt_embeds"])
    assert torch.equal(emb4[2:], emb0[2:])  # same seed, same first draw for the cond


def test_cads_dit_same_noise_in_every_block_and_branch_and_reproducible(dit):
    """Rescale off, so the noise can be read back: n = (y_hat - sqrt(g) y) / (s sqrt(1 - g))."""
    blocks = dit.transformer.transformer_blocks
    rec = {0: [], 3: []}
    hooks = []
    for b in rec:
        emb = blocks[b].norm1.emb
        hooks.append(emb.class_embedder.register_forward_hook(lambda m, a, o, b=b: rec[b].append(["y", o.clone()])))
        hooks.append(emb.timestep_embedder.register_forward_hook(lambda m, a, o, b=b: rec[b].append(["t", o.clone()])))
        hooks.append(emb.register_forward_hook(lambda m, a, o, b=b: rec[b].append(["all", o.clone()])))
    cads = emag.CADS(seed=5, rescale=False, noise_scale=0.5)
    try:
        out = dit(**dkw(guidance=[emag.CFG(3.0), emag.PAG(2.0, layers=[3]), cads])).images
    finally:
        for h in hooks:
            h.remove()
    trace = [r for r in dit.guidance_runtimes if r.name == "cads"][0].trace
    gamma = trace[0][2]
    assert gamma < 1.0
    noises = []
    for b, events in rec.items():
        # per call the hooks fire in the order t, y, all; step 0 runs [cond ; uncond] (4 rows) then PAG(cond)
        calls = [[o for _, o in events[i:i + 3]] for i in range(0, len(events), 3)]
        assert all([k for k, _ in events[i:i + 3]] == ["t", "y", "all"] for i in range(0, len(events), 3))
        t1, y1, a1 = next(c for c in calls if c[0].shape[0] == 4)
        t2, y2, a2 = next(c for c in calls if c[0].shape[0] == 2)
        y_hat1, y_hat2 = a1 - t1, a2 - t2
        torch.testing.assert_close(y_hat2, y_hat1[:2], rtol=0, atol=1e-5)  # identical condition in both branches
        torch.testing.assert_close(y_hat1[2:], y1[2:], rtol=0, atol=1e-5)  # the null class is untouched
        noises.append((y_hat1[:2] - math.sqrt(gamma) * y1[:2]) / (0.5 * math.sqrt(1 - gamma)))
    torch.testing.assert_close(noises[0], noises[1], rtol=0, atol=1e-4)  # the same draw in every block
    assert noises[0].std() > 0.5
    plain = dit(**dkw(guidance=[emag.CFG(3.0), emag.PAG(2.0, layers=[3])])).images
    assert (out - plain).abs().max() > 1e-3
    again = dit(**dkw(guidance=[emag.CFG(3.0), emag.PAG(2.0, layers=[3]), cads])).images
    assert torch.equal(again, out)
    other = dit(**dkw(guidance=[emag.CFG(3.0), emag.PAG(2.0, layers=[3]),
                                                        emag.CADS(seed=6, rescale=False, noise_scale=0.5)])).images
    assert not torch.equal(other, out)


def test_cads_leaves_the_latent_noise_stream_untouched():
    p = emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=2, scheduler=DDPMScheduler(
        beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)))
    p.set_progress_bar_config(disable=True)

    def run(*terms):
        torch.manual_seed(123)  # latents and ancestral noise from the global stream
        return p(class_labels=[1, 2], num_inference_steps=N, output_type="latent", guidance=[emag.CFG(3.0), *terms]).images

    plain = run()
    assert torch.equal(run(emag.CADS(tau1=1.0, tau2=2.0)), plain)  # gamma = 1 throughout: exactly off
    # noise drawn (from CADS's own generator) but scaled by 0; the rescale restores y up to rounding
    close(run(emag.CADS(noise_scale=0.0, tau1=0.1, tau2=1.5)), plain, 1e-4)


def test_cads_config_errors():
    for bad in (dict(tau1=0.9, tau2=0.6), dict(tau1=0.5, tau2=0.5), dict(noise_scale=-0.1), dict(psi=1.5),
                dict(psi=-0.1), dict(tau1=-0.1), dict(apply_to="uncond")):
        with pytest.raises(ValueError):
            emag.CADS(**bad)
    with pytest.raises(TypeError):
        emag.CADS(seed=1.5)


@pytest.mark.parametrize("make", [
    lambda: emag.APG(5.0, momentum=-0.5, eta=0.0, norm_threshold=2.0, space="native"),
    lambda: emag.CFGZeroStar(4.0, zero_init_steps=1),
    lambda: [emag.CFG(5.0), emag.S2(1.0, form="literal", space="native", layers=[1, 2, 3, 4])],
])
def test_a_space_dependent_term_keeps_its_own_space_when_the_others_combine_in_x0(pipe, make):
    """docs/guidance.md section 2.2: each term declares its space and is converted explicitly; forcing the
    combine into x0 space (as an x0 term such as SAG does) must not move APG-native, CFG-Zero* (velocity)
    or the literal S² off their own space."""
    g = make() if isinstance(make(), list) else [make()]
    own = pipe(**kw(guidance=g)).images
    x0 = pipe(**kw(guidance=g, combine_space="x0")).images
    close(x0, own, 1e-5)
    # ... while the same term computed in x0 space really is different (the test can fail)
    moved = [dataclasses.replace(t, space="x0") if hasattr(t, "space") else t for t in g]
    if moved != g:
        assert (pipe(**kw(guidance=moved)).images - own).abs().max() > 1e-3


def test_cfg_zero_star_zero_init_is_zero_velocity_in_any_combine_space(pipe):
    first = []
    pipe(**kw(num_inference_steps=2, guidance=[emag.CFGZeroStar(4.0, zero_init_steps=1)], combine_space="x0",
              callback_on_step_end=lambda p, i, t, k: (first.append(k["latents"].clone()) if i == 0 else None) or {}))
    torch.testing.assert_close(first[0], sd3_latents(2), rtol=0, atol=1e-6)  # x_1 = x_0 + dt * 0


def test_nothing_active_is_the_conditional_prediction_exactly_in_x0_space(pipe):
    """docs/guidance.md section 3.3: w = 1 and every scale 0 gives D_c exactly, even with combine_space="x0"."""
    g = [emag.CFG(1.0), emag.PAG(0.0, layers=[2])]
    native = pipe(**kw(guidance=g)).images
    assert torch.equal(pipe(**kw(guidance=g, combine_space="x0")).images, native)
