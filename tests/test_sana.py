"""Sana-shaped models through the Sana family: linear self-attention, where only query edits are defined
(EMAG's Q variant, SEG) besides whole-block methods and the CFG family; the others are refused with the
reason. Block runner = forward; neutral scales = the base pipeline bit for bit; EMAG-Q's fast path = its
straightforward path; SEG against an independent linear-attention reference; saving and loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import emag
from emag.families.sana import SanaBackbone
from emag.plumbing.conditions import TextCondition
from tiny_models import pixart_embeds, tiny_sana_pipeline, tiny_sana_transformer


def pipes(**shape):
    base = tiny_sana_pipeline(**shape)
    pipe = emag.guide(base)
    pipe.set_progress_bar_config(disable=True)
    return base, pipe


def call(pipe, size=(32, 32), **kw):
    h, w = size  # Sana's pipeline takes multiples of 32 px; the tiny DC-AE compresses x2
    x = torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return pipe(**pixart_embeds(2), negative_prompt=None, latents=x, height=h, width=w, num_inference_steps=5,
                    output_type="latent", use_resolution_binning=False, **kw).images


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"], ids=["sana", "sana-1.5"])
def test_runner_equals_forward(qk_norm):
    tr = tiny_sana_transformer(qk_norm=qk_norm)
    e = pixart_embeds(2)
    x, t = torch.randn(2, 4, 8, 6), torch.tensor(600.0)
    cond = [TextCondition(e["prompt_embeds"], None, e["prompt_attention_mask"])]
    ref = tr(x, encoder_hidden_states=e["prompt_embeds"], encoder_attention_mask=e["prompt_attention_mask"],
             timestep=t.expand(2), return_dict=False)[0].float()
    b = SanaBackbone(tr)
    assert torch.equal(b.forward([x], t, cond), ref)
    s = b.embed([x], t, cond)
    for i in range(b.num_blocks):
        s = b.block(i, s)
    assert torch.equal(b.head(s), ref)


def test_neutral_scales_are_the_base_pipeline_bit_for_bit():
    base, pipe = pipes()
    ref = call(base, guidance_scale=4.5)
    for terms in ([emag.CFG(4.5)], [emag.CFG(4.5), emag.EMAG(1.0, layers="1-3", variant="q")],
                  [emag.CFG(4.5), emag.SEG(0.0)], [emag.CFG(4.5), emag.SLG(0.0, window=(0, 1))]):
        assert torch.equal(call(pipe, guidance=terms), ref), terms


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"], ids=["sana", "sana-1.5"])
def test_emag_q_acts_and_its_fast_path_is_exact(qk_norm):
    base, pipe = pipes(qk_norm=qk_norm)
    ref = call(base, guidance_scale=3.0)
    terms = [emag.CFG(3.0), emag.EMAG(2.0, layers="1-4", variant="q")]
    fast = call(pipe, guidance=terms)
    assert any(r.apply for r in pipe.emag_trace)
    slow = call(pipe, guidance=terms, fast=False)
    scale = ref.abs().max()
    assert (fast - slow).abs().max() <= 1e-5 * scale
    assert (fast - ref).abs().max() > 1e-3 * scale


class MeanQueryLinearAttention:
    """Reference SEG (infinite blur) on Sana's linear attention, written out: the queries of every head
    channel replaced by their spatial mean, then ReLU kernels and the normalised linear attention."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = q.mean(dim=1, keepdim=True).expand(b, n, q.shape[-1])
        h = attn.heads
        q, k, v = (t.reshape(b, n, h, -1).permute(0, 2, 1, 3).float() for t in (q, k, v))  # [b, h, n, d]
        q, k = F.relu(q), F.relu(k)
        num = q @ (k.transpose(-1, -2) @ v)  # [b, h, n, d]
        den = q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)  # [b, h, n, 1]
        out = (num / (den + 1e-15)).permute(0, 2, 1, 3).reshape(b, n, -1).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def test_seg_reaches_the_linear_attention_queries():
    _, pipe = pipes()
    steps = []
    call(pipe, size=(32, 64), guidance=[emag.CFG(3.0), emag.SEG(2.0, layers=2)],
         on_step_outputs=lambda step, guided: steps.append((step.x, step.t, dict(step.outputs), step.grid)))
    x, t, outputs, grid = steps[1]
    assert grid == (16, 32)
    branch = next(k for k in outputs if k.startswith("seg"))
    attn = pipe.transformer.transformer_blocks[2].attn1
    original = attn.processor
    attn.processor = MeanQueryLinearAttention()
    e = pixart_embeds(2)
    try:
        with torch.no_grad():
            ref = SanaBackbone(pipe.transformer).forward([x], t, [TextCondition(e["prompt_embeds"], None,
                                                                                e["prompt_attention_mask"])])
    finally:
        attn.processor = original
    torch.testing.assert_close(outputs[branch], ref, rtol=1e-4, atol=1e-5)
    assert (outputs[branch] - outputs["cond"]).abs().max() > 1e-3


@pytest.mark.parametrize("term,match", [
    (emag.EMAG(2.0), r"EMAG \('full'\) reads or replaces the softmax attention map.*linear.*EMAG\(variant='q'\)"),
    (emag.PAG(2.0, layers=1), "PAG is not defined on Sana: .*linear attention"),
    (emag.SAG(0.5, layers=1), "SAG is not defined on Sana"),
    (emag.ERG(2.0, layers=1), "ERG is not defined on Sana: .*cancels"),
    (emag.STG(2.0, mode="attention"), r"STG \('attention'\) reads or replaces"),
])
def test_methods_that_need_a_softmax_map_are_refused_before_any_pass(term, match):
    _, pipe = pipes()
    passes = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *a: passes.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            call(pipe, guidance=[emag.CFG(3.0), term])
    finally:
        handle.remove()
    assert not passes


def test_a_query_temperature_cancels_in_linear_attention():
    """Why ERG is refused: scaling the queries (a softmax temperature) leaves Sana's attention unchanged."""
    attn = tiny_sana_transformer().transformer_blocks[1].attn1
    hidden = torch.randn(2, 12, attn.to_q.in_features)
    with torch.no_grad():
        ref = attn(hidden)
        handle = attn.to_q.register_forward_hook(lambda m, a, out: out * 0.3)
        scaled = attn(hidden)
        handle.remove()
    torch.testing.assert_close(scaled, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("term", [emag.TPG(2.0), emag.S2(2.0), emag.STG(2.0), emag.SLG(2.0, window=(0, 1))])
def test_whole_block_methods_run_on_a_non_square_image(term):
    base, pipe = pipes()
    ref = call(base, size=(32, 64), guidance_scale=3.0)
    out = call(pipe, size=(32, 64), guidance=[emag.CFG(3.0), term])
    assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


def test_save_and_load_from_disk(tmp_path):
    _, pipe = pipes()
    pipe.save_pretrained(tmp_path)
    loaded = emag.SanaEMAGPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    terms = [emag.CFG(3.0), emag.EMAG(1.5, layers="1-3", variant="q")]
    assert torch.equal(call(loaded, guidance=terms), call(pipe, guidance=terms))


@pytest.mark.parametrize("terms", [[emag.APG(3.0, norm_threshold=5.0)], [emag.CFG(3.0), emag.CADS()],
                                   [emag.CFGZeroStar(3.0)], [emag.CFG(3.0), emag.EMAG(2.0, layers="1-3", variant="q"),
                                                            emag.SEG(1.0)]],
                         ids=["apg", "cads", "cfg-zero-star", "emag-q+seg"])
def test_the_unconditional_methods_run(terms):
    base, pipe = pipes()
    ref = call(base, guidance_scale=3.0)
    out = call(pipe, guidance=terms)
    assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


def test_autoguidance_with_a_weaker_sana():
    base, pipe = pipes()
    weak = tiny_sana_transformer(num_layers=2, seed=5)
    out = call(pipe, guidance=[emag.CFG(3.0), emag.Autoguidance(2.0, model=weak)])
    assert torch.isfinite(out).all() and (out - call(base, guidance_scale=3.0)).abs().max() > 1e-4
