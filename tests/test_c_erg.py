"""C-ERG: ERG's weakened text condition (temperature-scaled text-encoder self-attention)."""

import copy

import pytest
import torch

import emag
from emag.guidance.erg import ERG
from emag.plumbing.text_weakening import depth_layers, query_projections, scaled_queries
from tiny_models import sd3_latents, tiny_dit_pipeline, tiny_sd3_text_pipeline

DEPTH = (0.0, 1.0)  # the tiny CLIP encoders have 2 layers (SD3 reads the penultimate one): weaken both


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    base = tiny_sd3_text_pipeline(tmp_path_factory.mktemp("c_erg"))
    p = emag.StableDiffusion3EMAGPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, guidance, **kw):
    args = dict(prompt=["a red cube", "two dogs"], latents=sd3_latents(2), num_inference_steps=3,
                output_type="latent", max_sequence_length=16, guidance=guidance)
    args.update(kw)
    return pipe(**args).images


def scaled_copy(encoder, tau, layers):
    """Independent weakening: a copy whose query projection weights and biases are multiplied by tau."""
    enc = copy.deepcopy(encoder)
    for i in layers:
        attn = enc.text_model.encoder.layers[i].self_attn
        attn.q_proj.weight.data *= tau
        attn.q_proj.bias.data *= tau
    return enc


def encode_with(pipe, encoders, prompt):
    weak = copy.copy(pipe)
    weak.text_encoder, weak.text_encoder_2 = encoders
    embeds, _, pooled, _ = weak.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=16)
    return embeds, pooled


@pytest.mark.parametrize("condition,prompt", [("cond", ["a red cube", "two dogs"]), ("uncond", ["", ""])])
def test_weak_condition_equals_an_encoder_with_scaled_query_weights(pipe, condition, prompt):
    term = ERG(tau=1.0, text_tau=0.3, text_depth=DEPTH, condition=condition)
    run(pipe, [emag.CFG(4.0), term])
    name = term.text_conditions()[0].name
    got = pipe.guidance_engine.conditions[name]
    assert depth_layers(2, DEPTH) == [0, 1] and depth_layers(2, (0.5, 1.0)) == [1] and depth_layers(24, (2 / 3, 11 / 12)) == list(range(16, 22))
    expected = encode_with(pipe, [scaled_copy(e, 0.3, [0, 1]) for e in (pipe.text_encoder, pipe.text_encoder_2)], prompt)
    torch.testing.assert_close(got.embeds, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooled, expected[1], rtol=1e-5, atol=1e-6)
    normal = encode_with(pipe, [pipe.text_encoder, pipe.text_encoder_2], prompt)
    assert not torch.allclose(got.embeds, normal[0])  # the weakening is real
    # hooks are gone: encoding now gives the normal embeddings again
    again = encode_with(pipe, [pipe.text_encoder, pipe.text_encoder_2], prompt)
    assert torch.equal(again[0], normal[0])


def test_only_the_named_text_encoders_are_weakened(pipe):
    """docs/guidance.md section 10.3: which SD3 text encoder(s) C-ERG weakens is a config list."""
    prompt = ["a red cube", "two dogs"]
    term = ERG(tau=1.0, text_tau=0.3, text_depth=DEPTH, text_encoders=["clip_g"])
    run(pipe, [emag.CFG(4.0), term])
    got = pipe.guidance_engine.conditions[term.text_conditions()[0].name]
    expected = encode_with(pipe, [pipe.text_encoder, scaled_copy(pipe.text_encoder_2, 0.3, [0, 1])], prompt)
    torch.testing.assert_close(got.embeds, expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.pooled, expected[1], rtol=1e-5, atol=1e-6)
    both = encode_with(pipe, [scaled_copy(e, 0.3, [0, 1]) for e in (pipe.text_encoder, pipe.text_encoder_2)], prompt)
    assert not torch.allclose(got.embeds, both[0])  # CLIP-L really stayed normal
    with pytest.raises(ValueError, match="loaded without"):  # the tiny pipeline has no T5
        run(pipe, [emag.CFG(4.0), ERG(text_tau=0.3, text_depth=DEPTH, text_encoders=("t5",))])
    for bad in (("clip_x",), (), "clip_l", ("clip_l", "clip_l")):
        with pytest.raises(ValueError, match="text_encoders"):
            ERG(text_tau=0.3, text_encoders=bad)


def test_neutral_text_tau_gives_the_conditional_prediction_and_a_real_one_changes_it(pipe):
    cond_only = run(pipe, [emag.CFG(1.0)], batching="none")
    neutral = run(pipe, [emag.CFG(4.0), ERG(tau=1.0, text_tau=1.0, text_depth=DEPTH)], batching="none")
    assert torch.equal(neutral, cond_only)  # D = D_w + w (c - D_w) with D_w == c
    weak = run(pipe, [emag.CFG(4.0), ERG(tau=1.0, text_tau=0.05, text_depth=DEPTH)], batching="none")
    assert (weak - cond_only).abs().max() > 1e-4
    both = run(pipe, [emag.CFG(4.0), ERG(layers=[1, 2], text_tau=0.05, text_depth=DEPTH)], batching="none")
    assert not torch.equal(both, weak)  # I-ERG and C-ERG together


def test_hooks_are_removed_on_error(pipe):
    before = [len(m._forward_hooks) for e in (pipe.text_encoder, pipe.text_encoder_2) for m in query_projections(e)]
    with pytest.raises(RuntimeError, match="boom"):
        with scaled_queries([pipe.text_encoder, pipe.text_encoder_2], 0.5, DEPTH):
            raise RuntimeError("boom")
    after = [len(m._forward_hooks) for e in (pipe.text_encoder, pipe.text_encoder_2) for m in query_projections(e)]
    assert after == before


def test_c_erg_errors(pipe):
    embeds = dict(prompt_embeds=torch.randn(2, 8, 16), pooled_prompt_embeds=torch.randn(2, 8))
    with pytest.raises(ValueError, match="pass `prompt`"):
        run(pipe, [emag.CFG(4.0), ERG(text_tau=0.5, text_depth=DEPTH)], prompt=None, **embeds)
    with pytest.raises(ValueError, match="selects no layer"):
        run(pipe, [emag.CFG(4.0), ERG(text_tau=0.5, text_depth=(0.6, 0.9))])
    with pytest.raises(ValueError, match="text_tau"):
        ERG(text_tau=0.0)
    with pytest.raises(ValueError, match="empty"):
        ERG(text_tau=0.5, text_depth=(0.5, 0.5))
    dit = emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=4))
    with pytest.raises(ValueError, match="text encoder"):
        dit(class_labels=[1], num_inference_steps=2, output_type="latent", guidance=[emag.CFG(1.5), ERG(text_tau=0.5)])


def test_cads_noises_the_weak_condition_with_the_conditions_draw(pipe):
    """CADS's composition rule: the C-ERG branch gets the same noise draw as the conditional branch
    (each annealed from its own clean embedding), recovered here with rescaling off."""
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: calls.append(k["encoder_hidden_states"].clone()), with_kwargs=True)
    term = ERG(tau=1.0, text_tau=0.3, text_depth=DEPTH)
    try:
        run(pipe, [emag.CADS(seed=3, rescale=False, noise_scale=0.5), emag.CFG(4.0), term], batching="none")
    finally:
        hook.remove()
    cads = next(r for r in pipe.guidance_runtimes if r.name == "cads")
    clean = pipe.guidance_engine.conditions
    y, y_weak = clean["cond"].embeds, clean[term.text_conditions()[0].name].embeds
    assert len(calls) == 6  # per step: [cond], [erg] (ERG replaces the unconditional pass)
    noised_steps = 0
    for step, _, gamma in cads.trace:
        cond_in, weak_in = calls[2 * step], calls[2 * step + 1]
        if gamma >= 1:
            continue
        noised_steps += 1
        n = (cond_in - gamma ** 0.5 * y) / (0.5 * (1 - gamma) ** 0.5)
        n_weak = (weak_in - gamma ** 0.5 * y_weak) / (0.5 * (1 - gamma) ** 0.5)
        torch.testing.assert_close(n_weak, n, rtol=1e-4, atol=1e-4)
    assert noised_steps >= 1
