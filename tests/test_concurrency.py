"""Pipelines called from several threads: each call gives what it gives alone, and no hook outlives it.

Calls on one transformer are serialised (the second waits); the hooks of a running call act only in
its own thread, so a plain diffusers call running meanwhile in another thread is unaffected. The
overlaps are forced (a call is paused inside its forward pass while the other thread runs), not left
to the scheduler's luck.
"""

import copy
import threading

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from torch.overrides import _get_current_function_mode_stack

import emag
from emag.plumbing.intercept import _SDPARouter, route_attention
from tiny_models import dit_latents, sd3_embeds, sd3_latents, tiny_dit_pipeline, tiny_sd3_pipeline

N = 6
LAYERS = [1, 2, 4]


@pytest.fixture(scope="module")
def base():
    p = tiny_sd3_pipeline(num_layers=6)
    p.set_progress_bar_config(disable=True)
    return p


def wrapper(base):
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def kwargs(seed=2, **extra):
    return dict(**sd3_embeds(1), latents=sd3_latents(1, seed=seed), num_inference_steps=N, guidance_scale=5.0,
                output_type="latent", **extra)


def emag_call(pipe, seed=2, variant="full", **extra):
    out = pipe(**kwargs(seed), emag=emag.EMAG(scale=2.0, layers=LAYERS, variant=variant), **extra).images
    return out, [(r.index, r.chosen, dict(r.scores)) for r in pipe.emag_trace]


def hook_count(transformer) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in transformer.modules())


class Worker(threading.Thread):
    """A thread that keeps its result or its exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            with torch.no_grad():
                self.result = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.modes_left = len(_get_current_function_mode_stack())


def run_concurrently(calls, expected) -> None:
    """Start every call in its own thread at once; each gives its solo ``(output, trace)``."""
    workers = [Worker(fn) for fn in calls]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    for w, (out, trace) in zip(workers, expected):
        assert w.error is None, w.error
        assert torch.equal(w.result[0], out) and w.result[1] == trace
        assert w.modes_left == 0


def pause_inside_forward(transformer, block: int, when, action):
    """A forward pre-hook on ``transformer_blocks[block]`` that runs ``action()`` (once) while the
    calling thread is inside a forward pass of a guided call, i.e. with its plan and hooks live."""
    state = {"calls": 0, "done": False}

    def hook(module, args):
        state["calls"] += 1
        if not state["done"] and when(state["calls"]):
            state["done"] = True
            action()

    return transformer.transformer_blocks[block].register_forward_pre_hook(hook)


def test_a_plain_call_in_another_thread_is_untouched_by_a_running_guided_call(base):
    """While an EMAG call is paused inside its forward pass (its attention routed at the candidate
    blocks), the base diffusers pipeline runs a whole call on the same transformer in another thread:
    that call gives exactly its solo output, and the EMAG call gives its own."""
    pipe = wrapper(base)
    plain = StableDiffusion3Pipeline(**{**base.components, "scheduler": copy.deepcopy(base.scheduler)})
    plain.set_progress_bar_config(disable=True)
    solo_plain = plain(**kwargs(seed=7)).images
    solo_emag, solo_trace = emag_call(pipe)
    other = Worker(lambda: plain(**kwargs(seed=7)).images)

    def run_other_to_the_end():
        other.start()
        other.join()

    # block 2 is a candidate: its 3rd call is step 1's perturbed pass (block 1 replaced, 2 and 4 fed)
    handle = pause_inside_forward(pipe.transformer, 2, lambda n: n == 3, run_other_to_the_end)
    try:
        out, trace = emag_call(pipe)
    finally:
        handle.remove()
    assert other.error is None and other.modes_left == 0
    assert torch.equal(other.result, solo_plain)
    assert torch.equal(out, solo_emag) and trace == solo_trace
    assert hook_count(pipe.transformer) == 0 and not _get_current_function_mode_stack()


@pytest.mark.parametrize("second", ["same pipeline", "other wrapper, plain call", "other wrapper, EMAG-Q"])
def test_a_second_call_on_the_same_transformer_waits_and_then_runs_as_alone(base, second):
    pipe = wrapper(base)
    other_pipe = pipe if second == "same pipeline" else wrapper(base)
    if second == "other wrapper, plain call":
        def call():
            return other_pipe(**kwargs(seed=5)).images, None
    else:
        def call():
            return emag_call(other_pipe, seed=5, variant="q" if "EMAG-Q" in second else "full")
    solo_first = emag_call(pipe)
    solo_second = call()
    other = Worker(call)
    still_running = []

    def start_other_and_check_it_waits():
        other.start()
        other.join(timeout=0.5)  # it cannot finish: this call holds the transformer
        still_running.append(other.is_alive())

    handle = pause_inside_forward(pipe.transformer, 2, lambda n: n == 3, start_other_and_check_it_waits)
    try:
        first = emag_call(pipe)
    finally:
        handle.remove()
    other.join(timeout=60)
    assert still_running == [True]
    assert other.error is None and other.modes_left == 0
    assert torch.equal(first[0], solo_first[0]) and first[1] == solo_first[1]
    assert torch.equal(other.result[0], solo_second[0]) and other.result[1] == solo_second[1]
    assert hook_count(pipe.transformer) == 0


def test_many_threads_many_rounds_same_results_no_hook_left(base):
    """Two wrappers of one transformer called from four threads for several rounds (EMAG full and Q,
    PAG, plain): every result equals the solo one, each thread reads its own trace, no hook is left."""
    a, b = wrapper(base), wrapper(base)
    jobs = [(a, "full", 2), (b, "q", 3), (a, "pag", 4), (b, "plain", 5)]

    def run(job):
        pipe, what, seed = job
        if what == "pag":
            return pipe(**kwargs(seed), guidance=[emag.CFG(5.0), emag.PAG(2.0, layers=[3])]).images, None
        if what == "plain":
            return pipe(**kwargs(seed)).images, None
        return emag_call(pipe, seed=seed, variant=what)

    solo = [run(j) for j in jobs]
    for _ in range(3):
        run_concurrently([lambda j=j: run(j) for j in jobs], solo)
    assert hook_count(base.transformer) == 0


def test_a_call_from_its_own_callback_is_refused_and_leaves_nothing(base):
    pipe = wrapper(base)
    expected, _ = emag_call(pipe)

    def callback(p, i, t, kw):
        p(**kwargs())  # the same transformer, inside the running call
        return {}

    with pytest.raises(emag.PipelineBusyError, match="already running"):
        emag_call(pipe, callback_on_step_end=callback)
    assert hook_count(pipe.transformer) == 0 and not _get_current_function_mode_stack()
    assert torch.equal(emag_call(pipe)[0], expected)  # and the pipeline still works


def test_dit_calls_from_two_threads_are_serialised():
    base = tiny_dit_pipeline(num_layers=6, bounded=True)
    pipe = emag.DiTEMAGPipeline.from_pipe(base, scheduler=emag.dit_reference_scheduler())
    pipe.set_progress_bar_config(disable=True)

    def call(labels):
        e = emag.EMAG(scale=3.0, layers=LAYERS, ema_window=(0.0, 1.0), apply_window=(0.2, 1.0))
        out = pipe(class_labels=labels, latents=dit_latents(2), num_inference_steps=10, output_type="latent",
                   generator=torch.Generator().manual_seed(1), emag=e).images
        return out, [(r.index, r.chosen) for r in pipe.emag_trace]

    solo = [call([1, 2]), call([3, 4])]
    run_concurrently([lambda: call([1, 2]), lambda: call([3, 4])], solo)
    assert hook_count(pipe.transformer) == 0


def test_hooks_are_removed_even_when_leaving_the_attention_mode_raises(base, monkeypatch):
    """A forward that died between its two hooks left a mode entered; leaving it at the end of the
    call raises (as a mode entered by another thread's hook did): the hooks are removed anyway."""
    real_exit = _SDPARouter.__exit__

    def failing_exit(self, *args):
        real_exit(self, *args)
        raise RuntimeError("mode exit failed")

    transformer = base.transformer
    attn = transformer.transformer_blocks[1].attn
    with pytest.raises(RuntimeError, match="mode exit failed"):
        with route_attention({1: attn}, lambda call, sdpa, a, k: sdpa(*a, **k)):
            pre = next(iter(attn._forward_pre_hooks.values()))
            pre(attn, (), {"hidden_states": torch.zeros(1, 16, 8)})  # entered, never left by its post hook
            monkeypatch.setattr(_SDPARouter, "__exit__", failing_exit)
    assert hook_count(transformer) == 0 and not _get_current_function_mode_stack()


def test_hooks_of_a_call_act_only_in_its_thread(base):
    """route_attention seen from another thread: that thread's attention calls are not routed."""
    transformer = base.transformer
    seen = []

    def handler(call, sdpa, a, k):
        seen.append(threading.get_ident())
        return sdpa(*a, **k)

    x, emb = sd3_latents(1), sd3_embeds(1)

    def forward():
        return transformer(x, encoder_hidden_states=emb["prompt_embeds"],
                           pooled_projections=emb["pooled_prompt_embeds"], timestep=torch.tensor([500.0])).sample

    with route_attention({1: transformer.transformer_blocks[1].attn}, handler):
        other = Worker(forward)
        other.start()
        other.join()
        assert other.error is None and seen == []
        forward()
        assert seen == [threading.get_ident()]
    assert hook_count(transformer) == 0
