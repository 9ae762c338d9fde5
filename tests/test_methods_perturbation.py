"""SEG, SAG, ERG, S², autoguidance and TPG: neutral settings, real effects, determinism, hook hygiene, and
each method's own semantics against independent straightforward implementations."""

import math

import pytest
import torch
from torch.overrides import _get_current_function_mode_stack

import emag
from emag.guidance.autoguidance import Autoguidance
from emag.guidance.erg import ERG, ScaleQueries
from emag.guidance.s2 import S2, s2_dropped_blocks, s2_num_dropped
from emag.guidance.sag import SAG, attention_received, sag_degrade, sag_mask, sag_renoise, upsample_mask
from emag.guidance.seg import SEG, BlurQueries, blur_image_queries, clip_kernel_size, gaussian_blur_2d, seg_kernel_size
from emag.guidance.tpg import TPG, PermuteTokens, tpg_permutation
from emag.parametrization import EpsilonVP, FlowMatching
from emag.families import DIT, SD3, family_of
from emag.plumbing.edits import AttentionInfo, EditScope, ForwardPlan, RowGroup
from tiny_models import (dit_latents, sd3_embeds, sd3_latents, tiny_dit_pipeline, tiny_dit_transformer,
                         tiny_sd3_pipeline, tiny_sd3_transformer)

N = 2  # steps


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only contend on a shared 2-core machine (1.6 s vs 13 ms per call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="module")
def weak():
    """A smaller network of the same family (3 blocks, other weights): a real autoguidance weak model."""
    return tiny_sd3_transformer(num_layers=3, seed=7)


@pytest.fixture(scope="module")
def refs(base):
    """The base pipeline's CFG and conditional-only results, computed once."""
    return {"cfg": base(**kw()).images, "cond": base(**kw(guidance_scale=1.0)).images}


def kw(batch=1, **extra):
    d = dict(**sd3_embeds(batch), latents=sd3_latents(batch), num_inference_steps=N, guidance_scale=5.0,
             output_type="latent")
    d.update(extra)
    return d


def run(pipe, guidance, batch=1, **extra):
    """One call; SAG needs the engine to hand x_t to ``Branch.make_input`` (see emag.guidance.sag)."""
    try:
        return pipe(**kw(batch, guidance=guidance, **extra)).images
    except RuntimeError as e:
        if "make_input(outputs, x_t)" in str(e):
            pytest.skip("SAG needs the engine to call Branch.make_input(outputs, x_t)")
        raise


def runtime_of(pipe, name):
    return next(r for r in pipe.guidance_runtimes if r.name == name)


def no_hooks_left(*models) -> bool:
    return not _get_current_function_mode_stack() and all(
        not m._forward_hooks and not m._forward_pre_hooks for model in models for m in model.modules())


# -- the framework invariants, for every method ------------------------------------------------------------

NEUTRAL_WITH_CFG = [SEG(0.0, layers=[2]), SAG(0.0, layers=[2]), S2(0.0), S2(0.0, form="literal"), TPG(0.0)]


@pytest.mark.parametrize("term", NEUTRAL_WITH_CFG, ids=lambda t: type(t).__name__)
def test_neutral_scale_is_plain_cfg_exactly(pipe, refs, term):
    assert torch.equal(run(pipe, [emag.CFG(5.0), term]), refs["cfg"])


def test_neutral_weak_guidance_is_the_conditional_prediction_exactly(pipe, refs, weak):
    # w = 1: c + 0 (c - D_w) without even running the weak branch
    assert torch.equal(run(pipe, [ERG(1.0)], guidance_scale=1.0), refs["cond"])
    assert torch.equal(run(pipe, [Autoguidance(1.0, model=weak)], guidance_scale=1.0), refs["cond"])


EFFECTS = [
    [emag.CFG(5.0), SEG(3.0, layers=[2, 3])],
    [emag.CFG(5.0), SAG(0.75, layers=[2])],
    [SAG(0.75, layers=[2])],
    [emag.CFG(5.0), ERG(layers=[1, 2])],
    [ERG(3.0, layers=[1, 2])],
    [emag.CFG(5.0), S2(drop_ratio=0.2)],
    [emag.CFG(5.0), S2(drop_ratio=0.2, form="literal")],
    [emag.CFG(5.0), TPG(3.0, layers=[2])],
    "autoguidance",
]


@pytest.mark.parametrize("guidance", EFFECTS, ids=lambda g: "+".join(type(t).__name__ for t in g)
                         if isinstance(g, list) else g)
def test_perturbation_changes_prediction_is_deterministic_and_unhooks(pipe, refs, weak, guidance):
    if guidance == "autoguidance":
        guidance = [Autoguidance(2.0, model=weak)]
    has_cfg = any(isinstance(t, emag.CFG) for t in guidance)
    first = run(pipe, guidance, guidance_scale=5.0 if has_cfg else 1.0)
    assert not torch.equal(first, refs["cfg" if has_cfg else "cond"])
    assert torch.isfinite(first).all()
    assert torch.equal(run(pipe, guidance, guidance_scale=5.0 if has_cfg else 1.0), first)  # same seed, same result
    assert no_hooks_left(pipe.transformer, weak)


# -- SEG ---------------------------------------------------------------------------------------------------

def reference_blur_plane(img: torch.Tensor, sigma: float, kh: int, kw: int) -> torch.Tensor:
    """Straightforward 2-D convolution of one [H, W] plane: hand-built kernel, explicit reflect indexing."""
    h, w = img.shape

    def taps(k):
        return [math.exp(-0.5 * ((i - (k - 1) / 2) / sigma) ** 2) for i in range(k)]

    kernel = torch.tensor([[a * b for b in taps(kw)] for a in taps(kh)], dtype=torch.float64)
    kernel = kernel / kernel.sum()

    def reflect(i, n):
        i = abs(i)
        return 2 * (n - 1) - i if i >= n else i

    out = torch.zeros(h, w, dtype=torch.float64)
    for y in range(h):
        for x in range(w):
            out[y, x] = sum(kernel[dy, dx] * img[reflect(y + dy - kh // 2, h), reflect(x + dx - kw // 2, w)]
                            for dy in range(kh) for dx in range(kw))
    return out


def test_seg_kernel_size_formula():
    # ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2)
    assert [seg_kernel_size(s) for s in (0.1, 0.5, 1.0, 1.5, 2.0, 2.6)] == [1, 3, 7, 9, 13, 17]


def test_kernel_clipping_follows_seg_sdxl_and_reflect_padding():
    # SEG-SDXL: min(k, L - (L % 2 - 1)): L for odd sides, L + 1 for even ones
    assert [clip_kernel_size(25, n) for n in (1, 2, 3, 4, 15, 16, 64)] == [1, 3, 3, 5, 15, 17, 25]
    assert clip_kernel_size(7, 16) == 7  # a kernel that fits is not touched
    # reflect: the whole kernel whenever its padding k // 2 < L (diffusers' SAG never clips)
    assert [clip_kernel_size(9, n, "reflect") for n in (1, 2, 3, 4, 5, 8)] == [1, 3, 5, 7, 9, 9]
    with pytest.raises(ValueError, match="clipping rule"):
        clip_kernel_size(9, 8, "box")


def test_sag_blur_uses_the_whole_kernel_where_reflect_padding_allows():
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    out = gaussian_blur_2d(x, 1.0, 9, clip="reflect")  # SAG's kernel 9 on a 6x8 latent: used whole
    for c in range(2):
        torch.testing.assert_close(out[0, c], reference_blur_plane(x[0, c], 1.0, 9, 9), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grid, sigma, kh, kw", [((5, 7), 1.0, 5, 7), ((4, 8), 1.0, 5, 7), ((3, 6), 0.6, 3, 5),
                                                 ((4, 4), 4.0, 5, 5), ((6, 3), 4.0, 7, 3)])
def test_seg_blur_matches_explicit_convolution_on_non_square_grids(grid, sigma, kh, kw):
    gh, gw = grid
    n, text = gh * gw, 3
    q = torch.randn(2, 2, n + text, 4, dtype=torch.float64)
    out = blur_image_queries(q, n, grid, sigma)
    for b in range(2):
        for h in range(2):
            for c in range(4):
                plane = q[b, h, :n, c].reshape(gh, gw)  # token y * gw + x is grid cell (y, x)
                expected = reference_blur_plane(plane, sigma, kh, kw).reshape(n)
                torch.testing.assert_close(out[b, h, :n, c], expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(out[:, :, n:], q[:, :, n:])  # text queries untouched


def test_seg_infinite_blur_makes_every_image_query_the_mean():
    n, grid = 12, (3, 4)
    q = torch.randn(2, 3, n + 5, 8)
    info = AttentionInfo(0, n, grid, SD3, 8 ** -0.5)
    for sigma in (float("inf"), 1e5):
        out = BlurQueries(sigma).query(q, q, q, info, (0, 2))
        img = out[:, :, :n]
        assert torch.equal(img, img[:, :, :1].expand_as(img))  # all image queries equal
        torch.testing.assert_close(img[:, :, 0], q[:, :, :n].mean(dim=2))
        assert torch.equal(out[:, :, n:], q[:, :, n:])
    finite = BlurQueries(1.0).query(q, q, q, info, (0, 2))[:, :, :n]
    assert not torch.allclose(finite, finite[:, :, :1].expand_as(finite))


def test_seg_finite_and_infinite_blur_differ_on_a_non_square_image(pipe, refs):
    """16x32 pixels -> 8x16 latent -> a 4x8 token grid."""
    k = dict(height=16, width=32, latents=sd3_latents(1, size=8).repeat(1, 1, 1, 2))
    inf = run(pipe, [emag.CFG(5.0), SEG(3.0, layers=[2, 3])], **k)
    fin = run(pipe, [emag.CFG(5.0), SEG(3.0, sigma=1.0, layers=[2, 3])], **k)
    plain = run(pipe, [emag.CFG(5.0)], **k)
    assert inf.shape == (1, 4, 8, 16)
    assert not torch.equal(inf, fin) and not torch.equal(fin, plain) and not torch.equal(inf, plain)


# -- SAG ---------------------------------------------------------------------------------------------------

def test_sag_received_mass_and_threshold_semantics():
    # zero queries: uniform attention, every key receives exactly the mean mass 1
    k = torch.randn(1, 2, 6, 4)
    received = attention_received(torch.zeros(1, 2, 6, 4), k, 0.5)
    torch.testing.assert_close(received, torch.ones(1, 6))
    assert not sag_mask(received + 1e-6 * (torch.arange(6) == 0), (2, 3), 1.0)[0, 0, 1:].any()  # strictly above
    assert sag_mask(received + 1e-3 * (torch.arange(6) == 0), (2, 3), 1.0).flatten().tolist() == [1, 0, 0, 0, 0, 0]
    # every query attends to key 4 only: it receives all 6 rows' mass, on grid cell (1, 1)
    q = torch.zeros(1, 1, 6, 6)
    keys = 50.0 * torch.eye(6)[None, None]
    q[..., 4] = 1.0
    m = sag_mask(attention_received(q, keys, 1.0), (2, 3), 1.0)
    assert m.flatten().tolist() == [0, 0, 0, 0, 1, 0]
    # the mass is averaged over heads and sums to N
    r = attention_received(torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4), 0.5)
    torch.testing.assert_close(r.sum(dim=1), torch.full((2,), 6.0))
    assert upsample_mask(m, (4, 6))[0, 0].tolist() == [[0, 0, 0, 0, 0, 0]] * 2 + [[0, 0, 1, 1, 0, 0]] * 2


@pytest.mark.parametrize("param", [FlowMatching(0.7), EpsilonVP(0.3, 500)], ids=["flow", "vp"])
def test_sag_renoises_with_the_predicted_noise(param):
    x_t, pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x0 = param.to_x0(x_t, pred)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    x0_bar = sag_degrade(x0, mask, 1.0, 9)
    x_bar = sag_renoise(x_t, x0, x0_bar, param)
    if isinstance(param, FlowMatching):  # (1 - t) x0_bar + t eps_hat, eps_hat = x_t + (1 - t) v
        t = param.sigma
        expected = (1 - t) * x0_bar + t * (x_t + (1 - t) * pred)
    else:  # sqrt(abar) x0_bar + sqrt(1 - abar) eps_hat
        a = param.alpha_cumprod
        expected = a ** 0.5 * x0_bar + (1 - a) ** 0.5 * pred
    torch.testing.assert_close(x_bar, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(x0_bar[mask.expand_as(x0) == 0], x0[mask.expand_as(x0) == 0])  # unmasked: untouched
    # an all-zero mask degrades nothing, so x_bar_t is x_t bit for bit
    zero = torch.zeros_like(mask)
    assert torch.equal(sag_renoise(x_t, x0, sag_degrade(x0, zero, 1.0, 9), param), x_t)


def test_sag_x0_term_is_diffusers_epsilon_form_for_vp():
    """Combined in x0 and converted back at x_t, s (x0_bar - x0(x_bar_t)) is s (eps_hat - eps(x_bar_t))."""
    param, s = EpsilonVP(0.3, 500), 0.75
    x_t, eps_hat, eps_bar = torch.randn(3, 1, 4, 8, 8, dtype=torch.float64)
    x0 = param.to_x0(x_t, eps_hat)
    x0_bar = sag_degrade(x0, (torch.rand(1, 1, 8, 8) > 0.5).double(), 1.0, 9)
    x_bar = sag_renoise(x_t, x0, x0_bar, param)
    guided = param.from_x0(x_t, x0 + s * (x0_bar - param.to_x0(x_bar, eps_bar)))
    torch.testing.assert_close(guided, eps_hat + s * (eps_hat - eps_bar))


def test_sag_zero_mask_vanishes_and_picks_its_source_branch(pipe, refs):
    # threshold above any possible mass: mask all zero -> x_bar_t = x_t -> D(x_bar_t) = D -> no SAG term
    out = run(pipe, [emag.CFG(5.0), SAG(0.75, layers=[2], threshold=1e9)])
    sag = runtime_of(pipe, "sag")
    assert [s["masked"] for s in sag.trace] == [0.0] * N and {s["source"] for s in sag.trace} == {"uncond"}
    torch.testing.assert_close(out, refs["cfg"], rtol=1e-5, atol=1e-5)
    # threshold 0: every token masked; without CFG the map comes from the conditional branch
    run(pipe, [SAG(0.75, layers=[2], threshold=0.0)], guidance_scale=1.0)
    sag = runtime_of(pipe, "sag")
    assert [s["masked"] for s in sag.trace] == [1.0] * N and {s["source"] for s in sag.trace} == {"cond"}


@pytest.fixture(scope="module")
def dit():
    p = emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=4, bounded=True))
    p.set_progress_bar_config(disable=True)
    return p


def dit_kw(**extra):
    return dict(class_labels=[1], latents=dit_latents(1), num_inference_steps=N, output_type="latent", **extra)


def test_sag_on_dit_epsilon_model(dit):
    cfg = dit(**dit_kw(guidance_scale=3.0)).images
    try:
        sag = dit(**dit_kw(guidance=[emag.CFG(3.0), SAG(1.0, layers=[2])])).images
    except RuntimeError as e:
        if "make_input(outputs, x_t)" in str(e):
            pytest.skip("SAG needs the engine to call Branch.make_input(outputs, x_t)")
        raise
    assert not torch.equal(sag, cfg) and torch.isfinite(sag).all()
    assert {s["source"] for s in runtime_of(dit, "sag").trace} == {"uncond"}


# -- ERG ---------------------------------------------------------------------------------------------------

def test_erg_scales_image_queries_only_by_default():
    n = 6
    q = torch.randn(1, 2, n + 3, 4)
    info = AttentionInfo(0, n, (2, 3), SD3, 0.5)
    out = ScaleQueries(0.01).query(q, q, q, info, (0, 1))
    assert torch.equal(out[:, :, :n], q[:, :, :n] * 0.01) and torch.equal(out[:, :, n:], q[:, :, n:])
    assert torch.equal(ScaleQueries(0.01, "all").query(q, q, q, info, (0, 1)), q * 0.01)


def test_erg_replaces_the_unconditional_prediction(pipe):
    # tau = 1 on the negative condition is the plain unconditional pass: exactly CFG (same batch layout)
    plain = run(pipe, [emag.CFG(5.0)], batching="none")
    assert torch.equal(run(pipe, [emag.CFG(5.0), ERG(tau=1.0, condition="uncond")], batching="none"), plain)
    with pytest.raises(ValueError, match="replaces the unconditional"):
        run(pipe, [ERG()], guidance_scale=1.0)
    # as its own rule no unconditional pass runs
    seen = []
    run(pipe, [ERG(3.0, layers=[1])], guidance_scale=1.0,
        callback_on_step_end=lambda p, i, t, k: seen.append(p.guidance_engine.last_passes) or {})
    assert seen[0] == [["cond"], ["erg:1"]]


# -- autoguidance ------------------------------------------------------------------------------------------

def test_autoguidance_with_the_main_model_as_weak_model_is_the_conditional_prediction(pipe, refs):
    seen = []
    out = run(pipe, [Autoguidance(2.0, model=pipe.transformer)], guidance_scale=1.0,
              callback_on_step_end=lambda p, i, t, k: seen.append(p.guidance_engine.last_passes) or {})
    assert torch.equal(out, refs["cond"])  # D_w + w (c - D_w) with D_w == c
    assert seen[0] == [["cond"], ["weak-autoguidance"]]  # same condition, separate network, no uncond pass


def test_autoguidance_roles_give_the_same_formula(pipe, weak):
    """As the rule (w = 5, no uncond pass) and as CFG(5)'s replaced uncond: both D_w + 5 (c - D_w)."""
    rule = run(pipe, [Autoguidance(5.0, model=weak)], guidance_scale=1.0)
    replaced = run(pipe, [emag.CFG(5.0), Autoguidance(None, model=weak)], batching="none")  # c from B rows too
    torch.testing.assert_close(replaced, rule, rtol=1e-6, atol=1e-6 * rule.abs().max().item())


def test_autoguidance_on_dit_keeps_the_learned_variance_path(dit):
    cond = dit(**dit_kw(guidance_scale=1.0)).images
    assert torch.equal(dit(**dit_kw(guidance=[Autoguidance(2.0, model=dit.transformer)])).images, cond)


def test_autoguidance_rejects_a_missing_or_foreign_weak_model(pipe):
    with pytest.raises(ValueError, match="weak network"):
        Autoguidance(2.0)
    with pytest.raises(ValueError, match="same family"):
        run(pipe, [Autoguidance(2.0, model=tiny_dit_transformer(2))], guidance_scale=1.0)


# -- S² ----------------------------------------------------------------------------------------------------

def test_s2_masks_are_seeded_per_sample_and_step():
    cand = tuple(range(24))
    assert s2_num_dropped(24, 0.1) == 2 and s2_num_dropped(28, 0.1) == 3 and s2_num_dropped(6, 0.1) == 1
    a = [s2_dropped_blocks(0, i, 0, cand, 0.1) for i in range(8)]
    assert a == [s2_dropped_blocks(0, i, 0, cand, 0.1) for i in range(8)]  # reproducible
    assert len(set(a)) > 1 and all(len(d) == 2 for d in a)  # a new mask per step
    assert a != [s2_dropped_blocks(1, i, 0, cand, 0.1) for i in range(8)]  # the seed matters
    assert 0 not in {b for i in range(30) for b in s2_dropped_blocks(0, i, 0, cand[1:], 0.1)}  # exclude_first pool


def test_s2_masks_do_not_depend_on_the_batch(pipe):
    g = [emag.CFG(5.0), S2(drop_ratio=0.4)]
    run(pipe, g, batch=2)
    two = runtime_of(pipe, "s2").trace
    run(pipe, g)
    one = runtime_of(pipe, "s2").trace
    assert [(i, d[:1]) for i, d in two] == one


def test_s2_forms_follow_their_formulas(pipe, base):
    """One Euler step: contrastive - literal = omega * c, i.e. (x_a - x_b) = omega (x_c - x)."""
    one = dict(num_inference_steps=1)
    a = run(pipe, [emag.CFG(5.0), S2(0.5, drop_ratio=0.2)], **one)
    b = run(pipe, [emag.CFG(5.0), S2(0.5, drop_ratio=0.2, form="literal")], **one)
    x = sd3_latents(1)
    c_step = base(**kw(guidance_scale=1.0, num_inference_steps=1)).images - x
    torch.testing.assert_close(a - b, 0.5 * c_step, rtol=1e-4, atol=1e-4)
    assert S2(form="literal").omega == 0.25 and S2().omega == 1.0


# -- TPG ---------------------------------------------------------------------------------------------------

def test_tpg_permutation_is_seeded_and_really_permutes():
    p = tpg_permutation(0, 3, 5, 64)
    assert torch.equal(p, tpg_permutation(0, 3, 5, 64)) and torch.equal(p.sort().values, torch.arange(64))
    assert not torch.equal(p, torch.arange(64))
    assert not torch.equal(p, tpg_permutation(1, 3, 5, 64)) and not torch.equal(p, tpg_permutation(0, 4, 5, 64))


def test_tpg_branch_is_the_patch_shuffled_prediction_on_dit():
    """Position embeddings enter once and blocks are permutation-equivariant: c_TPG = shuffle(c)."""
    tr = tiny_dit_transformer(num_layers=4)
    x, t, y = dit_latents(1), torch.tensor([500]), torch.tensor([3])
    clean = tr(x, timestep=t, class_labels=y).sample
    edit = PermuteTokens(seed=0, step=0, layer=1)
    scope = EditScope(tr, family_of(tr), set(), {1})
    with scope.installed(), scope.forward(ForwardPlan([RowGroup("tpg", 0, 1, {}, {1: [edit]})], (4, 4))):
        pert = tr(x, timestep=t, class_labels=y).sample
    assert no_hooks_left(tr)
    b, c = clean.shape[:2]
    tokens = clean.reshape(b, c, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, 16, c, 2, 2)
    shuffled = tokens[:, edit.perm].reshape(b, 4, 4, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(clean.shape)
    torch.testing.assert_close(pert, shuffled, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(pert, clean)


def test_tpg_seed_changes_the_result(pipe):
    assert not torch.equal(run(pipe, [emag.CFG(5.0), TPG(3.0, layers=[2], seed=1)]),
                           run(pipe, [emag.CFG(5.0), TPG(3.0, layers=[2], seed=0)]))


# -- configuration errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: SEG(-1.0), "scale"), (lambda: SEG(sigma=0.0), "sigma"), (lambda: SEG(layers="x"), "parse"),
    (lambda: SAG(layers=[1, 2]), "ONE block"), (lambda: SAG(blur_kernel=8), "odd"),
    (lambda: ERG(tau=0.0), "tau"), (lambda: ERG(condition="neg"), "condition"),
    (lambda: ERG(queries="text"), "queries"), (lambda: ERG(3.0, tau=2.0), "tau"),
    (lambda: S2(form="b"), "form"), (lambda: S2(drop_ratio=1.0), "drop_ratio"),
    (lambda: S2(layers=[0, 1], exclude_first=True), "exclude_first"), (lambda: TPG(seed=1.5), "seed"),
    (lambda: Autoguidance(2.0, model="weak.safetensors"), "module"),
])
def test_bad_configs(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_default_layers_on_shallow_models():
    """Depth-relative default bands stay inside a shallow model; a full-size model's fixed default that does
    not exist says so (instead of an out-of-range error about layers the user never gave)."""
    from emag.guidance.base import Setup
    from emag.guidance.perturbation import resolve_layers

    dit = Setup(DIT, 4, 10, 1)
    assert resolve_layers(None, dit, "erg", "ERG") == (0, 1, 2, 3)  # the family's band of 5 middle blocks
    sd3 = Setup(SD3, 6, 10, 1)
    with pytest.raises(ValueError, match="default layers"):
        resolve_layers(None, sd3, "pag", "PAG")  # SD3-Medium's block 13
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers([13], sd3, "pag", "PAG")
