"""PixArt-Σ-shaped models through the PixArt family: self-attention ``attn1`` edited, cross-attention
``attn2`` (with the captions' padding mask) untouched; learned variance dropped as diffusers does. Block
runner = forward; neutral scales = the base pipeline bit for bit; EMAG's fast path = its straightforward
path; PAG against an independent reference; non-square images; saving and loading."""

from __future__ import annotations

import pytest
import torch

import emag
from emag.families.pixart import PixArtBackbone
from emag.plumbing.conditions import TextCondition
from tiny_models import pixart_embeds, tiny_pixart_pipeline, tiny_pixart_transformer


def pipes():
    base = tiny_pixart_pipeline()
    pipe = emag.guide(base)
    pipe.set_progress_bar_config(disable=True)
    return base, pipe


def call(pipe, size=(16, 16), **kw):
    h, w = size
    x = torch.randn(2, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return pipe(**pixart_embeds(2), negative_prompt=None, latents=x, height=h, width=w, num_inference_steps=5,
                    output_type="latent", use_resolution_binning=False, **kw).images


def test_runner_equals_forward():
    tr = tiny_pixart_transformer()
    e = pixart_embeds(2)
    x, t = torch.randn(2, 4, 8, 6), torch.tensor(600)
    b = PixArtBackbone(tr)
    cond = [TextCondition(e["prompt_embeds"], None, e["prompt_attention_mask"])]
    ref = tr(x, encoder_hidden_states=e["prompt_embeds"], encoder_attention_mask=e["prompt_attention_mask"],
             timestep=t.expand(2), added_cond_kwargs=PixArtBackbone.ADDED, return_dict=False)[0]
    assert torch.equal(b.forward([x], t, cond), ref)
    s = b.embed([x], t, cond)
    for i in range(b.num_blocks):
        s = b.block(i, s)
    assert torch.equal(b.head(s), ref)
    # the padding mask reaches the cross-attention: unmasking the padding changes the prediction
    open_mask = [TextCondition(e["prompt_embeds"], None, torch.ones_like(e["prompt_attention_mask"]))]
    assert (b.forward([x], t, open_mask) - ref).abs().max() > 1e-4


def test_neutral_scales_are_the_base_pipeline_bit_for_bit():
    base, pipe = pipes()
    ref = call(base, guidance_scale=4.5)
    for terms in ([emag.CFG(4.5)], [emag.CFG(4.5), emag.PAG(0.0, layers=1)], [emag.CFG(4.5), emag.EMAG(1.0, layers="1-3")],
                  [emag.CFG(4.5), emag.SEG(0.0)]):
        assert torch.equal(call(pipe, guidance=terms), ref), terms
    assert torch.equal(call(pipe, guidance_scale=4.5, emag=emag.EMAG(1.0, layers="2-3")), ref)


@pytest.mark.parametrize("variant", ["full", "q"])
def test_emag_acts_and_its_fast_path_is_exact(variant):
    base, pipe = pipes()
    ref = call(base, guidance_scale=3.0)
    terms = [emag.CFG(3.0), emag.EMAG(1.5, layers="1-4", variant=variant)]
    fast = call(pipe, guidance=terms)
    assert any(r.apply for r in pipe.emag_trace)
    slow = call(pipe, guidance=terms, fast=False)
    scale = ref.abs().max()
    assert (fast - slow).abs().max() <= 1e-5 * scale
    assert (fast - ref).abs().max() > 1e-3 * scale


class ValueProcessor:
    """Reference PAG on plain self-attention: the identity map, so the attention output is V itself."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        v = attn.to_v(hidden_states)
        return attn.to_out[1](attn.to_out[0](v))


def test_pag_equals_an_independent_reference():
    _, pipe = pipes()
    steps = []
    call(pipe, size=(16, 24), guidance=[emag.CFG(3.0), emag.PAG(2.0, layers=2)],
         on_step_outputs=lambda step, guided: steps.append((step.x, step.t, dict(step.outputs), step.grid)))
    x, t, outputs, grid = steps[1]
    assert grid == (4, 6)
    branch = next(k for k in outputs if k.startswith("pag"))
    attn = pipe.transformer.transformer_blocks[2].attn1
    original = attn.processor
    attn.processor = ValueProcessor()
    e = pixart_embeds(2)
    try:
        with torch.no_grad():
            ref = PixArtBackbone(pipe.transformer, pipe.scheduler).forward(
                [x], t, [TextCondition(e["prompt_embeds"], None, e["prompt_attention_mask"])])
    finally:
        attn.processor = original
    torch.testing.assert_close(outputs[branch], ref, rtol=1e-5, atol=1e-5)
    assert (outputs[branch] - outputs["cond"]).abs().max() > 1e-3


@pytest.mark.parametrize("term", [emag.SEG(2.0), emag.SAG(0.5), emag.SLG(2.0, window=(0, 1)), emag.STG(2.0), emag.STG(2.0, mode="attention"),
                                  emag.TPG(2.0), emag.ERG(2.0), emag.S2(2.0), emag.APG(3.0, norm_threshold=5.0)])
def test_the_methods_run_on_a_non_square_image(term):
    base, pipe = pipes()
    ref = call(base, size=(16, 24), guidance_scale=3.0)
    out = call(pipe, size=(16, 24), guidance=[term] if isinstance(term, emag.APG) else [emag.CFG(3.0), term])
    assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


def test_save_and_load_from_disk(tmp_path):
    _, pipe = pipes()
    pipe.save_pretrained(tmp_path)
    loaded = emag.PixArtSigmaEMAGPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    terms = [emag.CFG(3.0), emag.EMAG(1.5, layers="1-3")]
    assert torch.equal(call(loaded, guidance=terms), call(pipe, guidance=terms))
    with pytest.raises(ValueError, match="use_resolution_binning=False"):
        loaded(**pixart_embeds(1), negative_prompt=None, guidance=terms, output_type="latent")


def test_the_command_line_generates_with_pixart(tmp_path):
    """A PixArt folder through `emag generate`: its T5 encodes the prompt, diffusers' resolution binning
    picks the size (the tiny model's native 64 px -> the 256 px bin), PAG acts on the middle block."""
    from click.testing import CliRunner

    from emag.cli import cli
    from emag.io import read_png_params
    from tiny_models import tiny_pixart_text_pipeline

    tiny_pixart_text_pipeline(tmp_path / "build").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "model"), "--prompt", "a cat", "--method",
                                 "cfg,pag", "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = read_png_params(out / "00000_seed0.png")
    assert meta["family"] == "pixart" and meta["preset"] == "pixart-sigma" and meta["height"] == 64
    assert [t["method"] for t in meta["guidance"]] == ["CFG", "PAG"]


@pytest.mark.parametrize("terms", [[emag.CFG(3.0), emag.CADS()], [emag.CFG(3.0), emag.EMAG(1.5, layers="1-3"),
                                                                  emag.PAG(1.0, layers=4)]], ids=["cads", "emag+pag"])
def test_more_compositions_run(terms):
    base, pipe = pipes()
    ref = call(base, guidance_scale=3.0)
    out = call(pipe, guidance=terms)
    assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


def test_autoguidance_with_a_weaker_pixart():
    base, pipe = pipes()
    weak = tiny_pixart_transformer(num_layers=2, seed=5)
    out = call(pipe, guidance=[emag.CFG(3.0), emag.Autoguidance(2.0, model=weak)])
    assert torch.isfinite(out).all() and (out - call(base, guidance_scale=3.0)).abs().max() > 1e-4
