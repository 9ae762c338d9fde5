"""The memory-light (factored) full-map EMA equals the dense EMA held in float32 (docs/speed-and-memory.md section 4)."""

import pytest
import torch
import torch.nn.functional as F

import emag
from emag.math.ema import attention_probs, ema_update_, row_entropy
from emag.math.factored_ema import decay_and_append, factored_output, factored_statistics
from emag.guidance.emag import state as emag_attention
from tiny_models import dit_latents, sd3_embeds, sd3_latents, tiny_dit_pipeline, tiny_sd3_pipeline

LAYERS = [1, 2, 4]


def close(a, b, tol=2e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("scale_queries_first", [False, True])
def test_factored_math_equals_dense_ema(scale_queries_first):
    """Updates over changing row slices (as a batched pass or split groups feed them), tiles smaller than a
    map: E V, sum |E - R| per row and the live row entropy equal the dense float32 computation."""
    g = torch.Generator().manual_seed(0)
    R, H, nq, nk, d, beta, s = 3, 2, 7, 11, 4, 0.9, 0.5
    feeds = [slice(0, 3), slice(0, 1), slice(1, 3), slice(0, 3), slice(2, 3)]
    dense = torch.zeros(R, H, nq, nk)
    filled = torch.zeros(R, dtype=torch.bool)
    stored = []
    for rows in feeds:
        n = rows.stop - rows.start
        q, k = torch.randn(n, H, nq, d, generator=g), torch.randn(n, H, nk, d, generator=g)
        live = attention_probs(q, k, s, scale_queries_first)
        first = not bool(filled[rows].any())
        dev, ent = factored_statistics(stored, rows, q, k, s, scale_queries_first, want_deviation=True,
                                       want_entropy=True, tile_elements=2 * H * nk)  # 2 query rows per tile
        if not first:
            torch.testing.assert_close(dev.float(), (dense[rows] - live).abs().sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent.float(), row_entropy(live), rtol=1e-5, atol=1e-6)
        if first:
            dense[rows] = live
        else:
            ema_update_(dense[rows], live, beta)
        filled[rows] = True
        decay_and_append(stored, rows, q, k, beta, first, R)
        v = torch.randn(n, H, nk, d, generator=g)
        out = factored_output(stored, rows, v, F.scaled_dot_product_attention, s)
        torch.testing.assert_close(out, dense[rows] @ v, rtol=1e-5, atol=1e-5)


def test_factored_math_needs_an_update():
    with pytest.raises(RuntimeError, match="no update"):
        factored_output([], slice(0, 1), torch.zeros(1, 1, 2, 2), F.scaled_dot_product_attention, 1.0)


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


def emag_state(p):
    return next(r for r in p.guidance_runtimes if r.name == "emag").state


def sd3_run(p, storage, fast=True, **e):
    cfg = {"scale": 2.0, "layers": LAYERS, "ema_dtype": "float32", "ema_storage": storage, **e}
    out = p(**sd3_embeds(2), latents=sd3_latents(2), num_inference_steps=8, guidance_scale=5.0,
            output_type="latent", fast=fast, emag=emag.EMAG(**cfg)).images
    return out, [(r.index, r.chosen) for r in p.emag_trace], emag_state(p)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("e", [
    dict(), dict(selection="all"), dict(per_sample=True), dict(combination="additive"),
    dict(combination="emag_only"), dict(blend=0.5), dict(ema_window=(0.0, 0.8), apply_window=(0.25, 0.6)),
    dict(cond_only_score=True),
])
def test_sd3_factored_equals_dense(sd3, fast, e):
    dense, dense_trace, st_d = sd3_run(sd3, "dense", fast, **e)
    fact, fact_trace, st_f = sd3_run(sd3, "factored", fast, **e)
    assert (st_d.storage, st_f.storage) == ("dense", "factored")
    assert fact_trace == dense_trace and any(c for _, c in fact_trace)
    close(fact, dense)
    for layer in LAYERS:  # the same scores the choice was made from
        torch.testing.assert_close(st_f.states[layer].score.float(), st_d.states[layer].score, rtol=1e-4, atol=1e-7)


def test_sd3_factored_really_replaces(sd3):
    """The factored replacement changes the prediction as the dense one does (not a silent no-op)."""
    base, _, _ = sd3_run(sd3, "factored", scale=1.0)
    guided, _, _ = sd3_run(sd3, "factored")
    assert (guided - base).abs().max() > 1e-3


def dit_run(p, storage, fast=True, **e):
    labels = [1000, 1000] if e.get("combination") == "emag_only" else [1, 2]
    windows = dict(ema_window=emag.RemainingStepsWindow(3, 8), apply_window=emag.RemainingStepsWindow(3, 6))
    cfg = {"scale": 3.0, "layers": LAYERS, **windows, "ema_storage": storage, **e}
    out = p(class_labels=labels, latents=dit_latents(2), num_inference_steps=12, guidance_scale=1.5,
            output_type="latent", fast=fast, generator=torch.Generator().manual_seed(5), emag=emag.EMAG(**cfg)).images
    return out, [(r.index, r.chosen) for r in p.emag_trace], emag_state(p)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("e", [dict(), dict(selection="entropy"), dict(selection="entropy_adaptive", entropy_top_k=2),
                               dict(per_sample=True), dict(combination="additive"), dict(combination="emag_only")])
def test_dit_factored_equals_dense(dit, fast, e):
    dense, dense_trace, st_d = dit_run(dit, "dense", fast, **e)
    fact, fact_trace, st = dit_run(dit, "factored", fast, **e)
    assert st.storage == "factored" and fact_trace == dense_trace and any(c for _, c in fact_trace)
    close(fact, dense)
    if e.get("combination") == "emag_only":  # the reference's two identical null passes: stored once
        ptrs = [u.query.data_ptr() for u in st.states[LAYERS[0]].stored]
        assert len(set(ptrs)) * 2 == len(ptrs)
    # The tiny DiT's samples grow large while EMAG moves them little: the scores are the sharp check.
    for layer in LAYERS:
        torch.testing.assert_close(st.states[layer].score.float(), st_d.states[layer].score, rtol=1e-5, atol=0)
        if e.get("selection"):
            torch.testing.assert_close(st.states[layer].entropy.float(), st_d.states[layer].entropy, rtol=1e-5, atol=0)


def test_auto_storage_chooses_by_size(sd3, dit, monkeypatch):
    """'auto' keeps dense maps while they fit the budget; above it, it switches to factored storage only
    where that is smaller (large maps, few EMA updates). Sizes are checked against the shapes."""
    big = dict(latents=sd3_latents(1, size=32), height=64, width=64, num_inference_steps=4, guidance_scale=5.0,
               output_type="latent", **sd3_embeds(1))
    run = lambda storage: (sd3(**big, emag=emag.EMAG(scale=2.0, layers=LAYERS, ema_dtype="float32",
                                                     ema_storage=storage)).images, emag_state(sd3))
    monkeypatch.setattr(emag_attention, "dense_budget_bytes", lambda device: 1 << 40)
    _, st = run("auto")
    assert st.storage == "dense"
    dense_bytes = st.nbytes
    monkeypatch.setattr(emag_attention, "dense_budget_bytes", lambda device: 0)
    out, st = run("auto")
    assert st.storage == "factored"
    ref, _ = run("dense")
    close(out, ref)
    u = st.states[LAYERS[0]].stored[0]
    (h, n_img, d), n_k = u.query.shape[1:], u.key.shape[2]
    assert (n_img, n_k) == (256, 256 + 5)
    assert dense_bytes == len(LAYERS) * 2 * h * n_img * n_k * 4  # [uncond ; cond] rows, float32 maps
    assert st.stored_updates == 3  # N = 4: EMA at steps 0-2
    assert st.nbytes == len(LAYERS) * 2 * 3 * h * (n_img + n_k) * d * 4 < dense_bytes
    # A long DiT schedule over a small map: factored storage would be larger, so 'auto' stays dense.
    dit_run(dit, "auto")
    assert emag_state(dit).storage == "dense"


def test_factored_storage_needs_full_maps_of_image_rows():
    with pytest.raises(ValueError, match="factored"):
        emag.EMAG(variant="q", ema_storage="factored")
    with pytest.raises(ValueError, match="factored"):
        emag.EMAG(rows="img2img", ema_storage="factored")
    with pytest.raises(ValueError, match="ema_storage"):
        emag.EMAG(ema_storage="sparse")
