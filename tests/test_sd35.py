"""SD3.5-shaped models (QK-norm; SD3.5 Medium's dual attention: ``attn2`` in its first blocks) through the
SD3 family: block runner = forward, neutral scales = the base pipeline bit for bit, EMAG's fast path = its
straightforward path, and EMAG / PAG edit the joint attention ``attn`` only (``attn2`` runs untouched)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import emag
from emag.families.sd3 import SD3Backbone
from emag.plumbing.conditions import TextCondition
from tiny_models import sd3_embeds, sd3_latents, tiny_sd3_transformer, tiny_vae

MEDIUM = dict(qk_norm="rms_norm", dual_attention_layers=(0, 1, 2, 3))  # SD3.5 Medium: attn2 in blocks 0-12 of 24
LARGE = dict(qk_norm="rms_norm")


def pipeline(**shape):
    tr = tiny_sd3_transformer(num_layers=6, seed=0, **shape)
    pipe = emag.StableDiffusion3EMAGPipeline(
        transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(4, 0), text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, **kw):
    with torch.no_grad():
        return pipe(**sd3_embeds(batch=2), latents=sd3_latents(batch=2), height=16, width=16, num_inference_steps=8,
                    output_type="latent", **kw).images


@pytest.mark.parametrize("shape", [MEDIUM, LARGE], ids=["medium", "large"])
def test_runner_equals_forward(shape):
    tr = tiny_sd3_transformer(num_layers=6, **shape)
    e = sd3_embeds(2)
    x, t = sd3_latents(2), torch.tensor([600.0, 600.0])
    ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=e["prompt_embeds"],
             pooled_projections=e["pooled_prompt_embeds"], return_dict=False)[0]
    b = SD3Backbone(tr)
    s = b.embed([x], t, [TextCondition(e["prompt_embeds"], e["pooled_prompt_embeds"])])
    for i in range(b.num_blocks):
        s = b.block(i, s)
    assert torch.equal(b.head(s), ref)


@pytest.mark.parametrize("shape", [MEDIUM, LARGE], ids=["medium", "large"])
@pytest.mark.parametrize("variant", ["full", "q"])
def test_neutral_scale_is_the_base_pipeline_and_the_fast_path_is_exact(shape, variant):
    pipe = pipeline(**shape)
    base = call(pipe, guidance_scale=5.0)
    neutral = call(pipe, guidance=[emag.CFG(5.0), emag.EMAG(1.0, layers=[1, 2, 3], variant=variant)])
    assert torch.equal(neutral, base)
    fast = call(pipe, guidance=[emag.CFG(5.0), emag.EMAG(2.0, layers=[1, 2, 3], variant=variant)])
    assert any(r.apply for r in pipe.emag_trace)
    slow = call(pipe, guidance=[emag.CFG(5.0), emag.EMAG(2.0, layers=[1, 2, 3], variant=variant)], fast=False)
    scale = base.abs().max()
    assert (fast - slow).abs().max() <= 1e-5 * scale
    assert (fast - base).abs().max() > 1e-3 * scale  # EMAG really acts


def test_edits_reach_attn_and_never_attn2():
    """During an EMAG + PAG call on dual-attention blocks, every ``attn2`` call runs with no attention
    routing active (no torch-function mode entered, no hook on ``attn2``), while ``attn`` calls of the
    edited blocks are routed; afterwards no hook is left on either."""
    pipe = pipeline(**MEDIUM)
    blocks = pipe.transformer.transformer_blocks
    seen = {"attn2": [], "attn": []}

    def spy(module, key):
        proc = module.processor

        class Spy:
            def __call__(self, attn, *args, **kwargs):
                routed = torch._C._len_torch_function_stack() > 0  # the interception's mode is entered
                seen[key].append((routed, bool(attn._forward_pre_hooks)))
                return proc(attn, *args, **kwargs)

        module.processor = Spy()

    for block in blocks[:4]:
        spy(block.attn2, "attn2")
    spy(blocks[2].attn, "attn")
    base = call(pipe, guidance=[emag.CFG(5.0)])
    assert len(seen["attn2"]) == 8 * 4 and not any(r for r, _ in seen["attn2"])  # 8 steps, one pass, 4 blocks
    seen["attn2"].clear()
    seen["attn"].clear()
    edited = call(pipe, guidance=[emag.CFG(5.0), emag.EMAG(2.0, layers=[1, 2, 3]), emag.PAG(2.0, layers=[2])])
    assert (edited - base).abs().max() > 0
    assert seen["attn2"] and not any(routed or hooked for routed, hooked in seen["attn2"])
    assert all(routed and hooked for routed, hooked in seen["attn"])  # block 2's joint attention is routed
    for block in blocks[:4]:  # and every hook is gone afterwards
        assert not block.attn2._forward_pre_hooks and not block.attn2._forward_hooks
        assert not block.attn._forward_pre_hooks and not block.attn._forward_hooks


def test_guide_wraps_an_existing_diffusers_pipeline():
    from diffusers import StableDiffusion3Pipeline

    from tiny_models import tiny_dit_pipeline, tiny_sd3_pipeline

    base = tiny_sd3_pipeline(num_layers=4)
    assert type(base) is StableDiffusion3Pipeline
    pipe = emag.guide(base)
    assert isinstance(pipe, emag.StableDiffusion3EMAGPipeline) and pipe.transformer is base.transformer
    assert emag.guide(pipe) is pipe
    assert isinstance(emag.guide(tiny_dit_pipeline(num_layers=2)), emag.DiTEMAGPipeline)
    with torch.no_grad():  # the wrapper computes what the base pipeline computes at a neutral scale
        kw = dict(**sd3_embeds(), height=16, width=16, num_inference_steps=3, output_type="latent")
        a = base(latents=sd3_latents(), guidance_scale=4.0, **kw).images
        b = pipe(latents=sd3_latents(), guidance=[emag.CFG(4.0), emag.PAG(0.0, layers=[1])], **kw).images
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="has no `transformer`"):
        emag.guide(object())

    class Unet(torch.nn.Module):
        pass

    class Other:
        transformer = Unet()

    with pytest.raises(ValueError, match="does not support the model family Unet"):
        emag.guide(Other())


class RefPAGJointProcessor:
    """Reference PAG for one SD3.5 block, written out: the joint attention ``[image ; text]`` with QK-norm
    (which diffusers' PAG joint processors skip) and an additive mask making image->image the identity
    (image queries still see the text keys; text queries untouched)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]

        def split(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        tq, tk = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states))), attn.norm_added_k(
            split(attn.add_k_proj(encoder_hidden_states)))
        tv = split(attn.add_v_proj(encoder_hidden_states))
        qj, kj, vj = torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
        n = qj.shape[2]
        mask = torch.zeros(n, n)
        block = torch.full((n_img, n_img), float("-inf"))
        block.fill_diagonal_(0.0)
        mask[:n_img, :n_img] = block
        out = torch.nn.functional.scaled_dot_product_attention(qj, kj, vj, attn_mask=mask[None, None])
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return attn.to_out[1](attn.to_out[0](img)), txt


@pytest.mark.parametrize("shape", [MEDIUM, LARGE], ids=["medium", "large"])
def test_pag_equals_an_independent_reference(shape):
    """PAG's perturbed branch on an SD3.5 block (QK-norm; Medium's block 2 also has attn2) equals the
    transformer run with the written-out reference processor on the same input."""
    pipe = pipeline(**shape)
    steps = []
    call(pipe, guidance=[emag.CFG(5.0), emag.PAG(2.0, layers=[2])],
         on_step_outputs=lambda step, guided: steps.append((step.x, step.t, dict(step.outputs))))
    x, t, outputs = steps[3]
    branch = next(k for k in outputs if k.startswith("pag"))
    attn = pipe.transformer.transformer_blocks[2].attn
    original = attn.processor
    attn.processor = RefPAGJointProcessor()
    e = sd3_embeds(batch=2)
    try:
        with torch.no_grad():
            ref = SD3Backbone(pipe.transformer).forward(
                [x], t, [TextCondition(e["prompt_embeds"], e["pooled_prompt_embeds"])])
    finally:
        attn.processor = original
    torch.testing.assert_close(outputs[branch], ref, rtol=1e-5, atol=1e-5)
    assert (outputs[branch] - outputs["cond"]).abs().max() > 1e-3


@pytest.mark.parametrize("shape", [MEDIUM, LARGE], ids=["medium", "large"])
@pytest.mark.parametrize("term", [emag.SEG(2.0, layers=[2]), emag.SAG(0.5, layers=[2]), emag.ERG(2.0, layers=[1, 2]),
                                  emag.S2(2.0), emag.SLG(2.0, layers=[2], window=(0, 1)), emag.STG(2.0, layers=[3]),
                                  emag.STG(2.0, layers=[3], mode="attention"), emag.TPG(2.0, layers=[2]),
                                  emag.APG(5.0, norm_threshold=3.0), emag.CADS(), emag.CFGZeroStar(5.0)],
                         ids=lambda t: type(t).__name__ + ("-" + t.mode if isinstance(t, emag.STG) else ""))
def test_the_other_methods_run_on_sd35_shapes(shape, term):
    pipe = pipeline(**shape)
    base = call(pipe, guidance_scale=5.0)
    terms = [term] if term.is_base else [emag.CFG(5.0), term]
    out = call(pipe, guidance=terms)
    assert out.shape == base.shape and torch.isfinite(out).all() and (out - base).abs().max() > 1e-4


@pytest.mark.parametrize("shape", [MEDIUM, LARGE], ids=["medium", "large"])
def test_autoguidance_with_a_weaker_sd35(shape):
    pipe = pipeline(**shape)
    weak = tiny_sd3_transformer(num_layers=2, seed=5, **shape)
    out = call(pipe, guidance=[emag.CFG(5.0), emag.Autoguidance(2.0, model=weak)])
    assert torch.isfinite(out).all() and (out - call(pipe, guidance_scale=5.0)).abs().max() > 1e-4
