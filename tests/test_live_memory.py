"""benchmarks/live_memory.py counts tensor memory exactly, on the CPU and on meta (no compute); and
EMAG's map-sized temporaries stay bounded (in-place softmax and replacement, EMA fed by head chunks)."""

import importlib.util
import os
import sys

import pytest
import torch

import emag
from emag.guidance.emag import resolve
from emag.math.ema import attention_probs, ema_update_
from emag.guidance.emag import state as emag_attention
from emag.guidance.emag.edits import EMAGReplace
from emag.guidance.emag.state import EMAGState
from emag.plumbing.edits import AttentionInfo
from tiny_models import dit_latents, sd3_embeds, sd3_latents, tiny_dit_pipeline, tiny_dit_transformer, tiny_sd3_pipeline

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _load(name):
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(BENCH)


live_memory = _load("live_memory")
LiveTensorBytes, FlashAttentionModel = live_memory.LiveTensorBytes, live_memory.FlashAttentionModel


def test_live_bytes_counts_new_storages_once_and_frees_them():
    weight = torch.randn(100, 100)  # exists before: never counted, nor its views
    with LiveTensorBytes("cpu") as mem:
        wt = weight.t()
        assert mem.current == 0
        a = torch.empty(1000)  # 4000 bytes
        view = a[:10]
        assert mem.current == 4000
        b = a + 1
        assert mem.current == 8000
        del a  # the view keeps the storage alive
        assert mem.current == 8000
        del view
        assert mem.current == 4000
        torch.empty(10, device="meta")  # another device: not counted
        b.add_(1)  # in place: no new storage
    assert (mem.current, mem.peak) == (4000, 8000)
    del b, wt


def test_meta_reads_give_zero_and_fused_attention_allocates_its_output_only():
    q = torch.empty(1, 2, 64, 8, device="meta")
    with FlashAttentionModel(), LiveTensorBytes("meta") as mem:
        assert float(q.sum()) == 0.0 and not bool(q.sum() > 0)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        assert out.shape == q.shape and out.device.type == "meta"
        assert torch.zeros(3, device="meta").cpu().tolist() == [0.0, 0.0, 0.0]
    assert mem.peak == 2 * 64 * 8 * 4 + 2 * 64 * 4  # output + log-sum-exp, never the 64 x 64 map


def _peak(pipe, device, inputs, steps, **kw):
    pm = _load("peak_memory")
    if device == "meta":
        pm.keep_timesteps_on_cpu(pipe.scheduler)
    return pm.measure(pipe, inputs, steps, kw, device)


@pytest.mark.parametrize("storage", ["dense", "factored"])
@pytest.mark.parametrize("family", ["sd3", "dit"])
def test_meta_count_equals_the_cpu_count_of_a_real_run(family, storage):
    """The modelled meta run allocates what the real CPU run allocates (same schedule, same blocks)."""
    # selection "all": no data-dependent choice (on meta a value read gives 0, i.e. the first candidate)
    e = emag.EMAG(layers=[1, 2, 3], ema_window=(0.0, 0.9), apply_window=(0.2, 0.8), ema_storage=storage,
                  selection="all")
    results = {}
    for device in ("cpu", "meta"):
        if family == "sd3":
            pipe = emag.StableDiffusion3EMAGPipeline.from_pipe(tiny_sd3_pipeline(num_layers=6))
            inputs = dict(**sd3_embeds(2), latents=sd3_latents(2), guidance_scale=5.0)
        else:
            pipe = emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=6))
            inputs = dict(class_labels=[1, 2], latents=dit_latents(2), guidance_scale=1.5)
        pipe.set_progress_bar_config(disable=True)
        pipe.transformer.to(device)
        inputs = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        results[device] = _peak(pipe, device, inputs, 6, emag=e)
    cpu, meta = results["cpu"], results["meta"]
    assert meta["block_rows"] == cpu["block_rows"]
    assert meta["ema_state_mib"] == cpu["ema_state_mib"] > 0
    # the state's small CPU-side bookkeeping (row flags, factored score sums) counts in the CPU run only
    assert abs(meta["peak_bytes"] - cpu["peak_bytes"]) <= max(1024, 0.01 * cpu["peak_bytes"]), (meta, cpu)


def test_attention_probs_allocates_one_map():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 40, 8, generator=g), torch.randn(2, 3, 50, 8, generator=g)
    mask = torch.randn(2, 1, 40, 50, generator=g)
    with LiveTensorBytes("cpu") as mem:
        p = attention_probs(q, k, 0.35, False, attn_mask=mask)
    assert mem.peak == p.numel() * p.element_size()
    expected = ((q @ k.transpose(-2, -1)) * 0.35 + mask).softmax(-1)
    assert torch.equal(p, expected)  # in place, the same values


def _state(dtype="float16", timing="before"):
    state = EMAGState(resolve(emag.EMAG(layers=[0], ema_dtype=dtype), "sd3", 2), 1, timing)
    state.storage = "dense"
    return state


@pytest.mark.parametrize("timing", ["before", "after"])
def test_feeding_by_head_chunks_gives_the_same_ema_with_bounded_temporaries(monkeypatch, timing):
    g = torch.Generator().manual_seed(0)
    maps = [torch.rand(1, 4, 32, 48, generator=g).softmax(-1) for _ in range(3)]
    whole, chunked = _state(timing=timing), _state(timing=timing)
    for i, live in enumerate(maps):
        whole.feed(0, live, slice(0, 1))
        whole.finish(0)
        monkeypatch.setattr(emag_attention, "FEED_CHUNK_ELEMENTS", 32 * 48)  # one head at a time
        with LiveTensorBytes("cpu") as mem:
            chunked.feed(0, live, slice(0, 1))
        monkeypatch.undo()
        chunked.finish(0)
        if i:  # an update (not the first E := R): the temporaries of one head, not of the map
            head_fp16 = 32 * 48 * 2
            assert mem.peak <= 3 * head_fp16 + 1024 < live.numel() * 2
    assert torch.equal(chunked.states[0].ema, whole.states[0].ema)
    reference = maps[0].half()
    for live in maps[1:]:
        if timing == "before":
            score = (reference - live.half()).abs().mean()
            ema_update_(reference, live, 0.988)
        else:
            ema_update_(reference, live, 0.988)
            score = (reference - live.half()).abs().mean()
    assert torch.equal(chunked.states[0].ema, reference)
    torch.testing.assert_close(chunked.states[0].score, score, rtol=1e-3, atol=0)
    torch.testing.assert_close(chunked.states[0].score, whole.states[0].score, rtol=1e-3, atol=0)


def test_hard_replacement_is_written_into_the_map():
    state = _state()
    g = torch.Generator().manual_seed(1)
    state.feed(0, torch.rand(1, 2, 6, 9, generator=g), slice(0, 1))
    state.finish(0)
    info = AttentionInfo(0, 6, None, None, 0.5)
    p = torch.rand(1, 2, 6, 9, generator=g)
    with LiveTensorBytes("cpu") as mem:
        out = EMAGReplace(state, 0, slice(0, 1)).probs(p, info, (0, 1))
    assert out is p and mem.peak < p.numel() * p.element_size()
    assert torch.equal(p, state.states[0].ema.float())


@pytest.mark.parametrize("family", ["sd3", "dit"])
def test_the_map_built_by_chunks_of_heads_gives_the_same_images_with_a_lower_peak(family, monkeypatch):
    """Dense full EMAG builds its explicit map one chunk of heads at a time when the map is large: the
    same images bit for bit, and only one chunk's map alive at a time."""
    from emag.plumbing import edits

    e = emag.EMAG(layers=[1, 2, 3], ema_window=(0.0, 0.9), apply_window=(0.2, 0.8), ema_storage="dense")
    # 256 image tokens: the maps dominate the peak of these tiny models
    if family == "sd3":
        pipe = emag.StableDiffusion3EMAGPipeline.from_pipe(tiny_sd3_pipeline(num_layers=6))
        inputs = dict(**sd3_embeds(2), latents=sd3_latents(2, size=32), guidance_scale=5.0)
    else:
        base = tiny_dit_pipeline(num_layers=6)
        base.transformer = tiny_dit_transformer(6, sample_size=32)
        pipe = emag.DiTEMAGPipeline.from_pipe(base)
        inputs = dict(class_labels=[1, 2], latents=dit_latents(2, size=32), guidance_scale=1.5)
    pipe.set_progress_bar_config(disable=True)
    heads_per_map, real = [], edits.attention_probs

    def spy(q, *args, **kwargs):
        heads_per_map.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(edits, "attention_probs", spy)
    monkeypatch.setattr(emag_attention, "FEED_CHUNK_ELEMENTS", 1)  # one head per chunk (the score's sum order)
    agreed = edits._agreed_head_chunks
    results = {}
    for chunk in ("whole", "one head"):
        # "whole": the map of all heads at once, fed into the EMA one head at a time
        monkeypatch.setattr(edits, "_agreed_head_chunks", (lambda *a: None) if chunk == "whole" else agreed)
        heads_per_map.clear()
        results[chunk] = _peak(pipe, "cpu", inputs, 6, emag=e)
        results[chunk]["heads"] = set(heads_per_map)
        results[chunk]["images"] = pipe(**inputs, num_inference_steps=6, emag=e, output_type="latent").images
    whole, chunked = results["whole"], results["one head"]
    assert whole["heads"] == {pipe.transformer.config.num_attention_heads} and chunked["heads"] == {1}
    assert torch.equal(whole["images"], chunked["images"])
    one_head = 2 * 256 * 256 * 4  # one head of a two-row group's map (float32), about what chunking saves here
    assert chunked["peak_bytes"] <= whole["peak_bytes"] - 0.9 * one_head, (chunked["peak_bytes"], whole["peak_bytes"])
