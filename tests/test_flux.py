"""Flux.1-shaped models through the Flux family: two block lists (double, single) addressed by name, text
tokens FIRST in the joint sequence, packed latents, a distilled guidance embedding. Block runner =
forward; neutral scales = the base pipeline bit for bit; EMAG's fast path = its straightforward path;
PAG against an independent reference (diffusers' own Flux processor given the identity mask); the image
grid of non-square images; saving and loading."""

from __future__ import annotations

import pytest
import torch

import emag
from emag.families import FLUX
from emag.families.flux import FluxBackbone, pack, unpack
from emag.plumbing.conditions import TextCondition
from tiny_models import flux_embeds, flux_latents, tiny_flux_pipeline, tiny_flux_transformer

COND = ("prompt_embeds", "pooled_prompt_embeds")


def pipes(**shape):
    base = tiny_flux_pipeline(**shape)
    return base, emag.guide(base)


def call(pipe, size=(16, 16), negative=False, **kw):
    e = flux_embeds(batch=2)
    if not negative:
        e = {k: e[k] for k in COND}
    h, w = size
    with torch.no_grad():
        return pipe(**e, latents=flux_latents_hw(2, h // 2, w // 2), height=h, width=w, num_inference_steps=6,
                    output_type="latent", **kw).images


def flux_latents_hw(batch, h, w, seed=2):
    x = torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))
    return pack(x)


def test_pack_unpack_round_trip_and_grid():
    x = torch.randn(2, 4, 6, 10)
    assert torch.equal(unpack(pack(x), 6, 10), x)
    assert FluxBackbone.token_grid(x) == (3, 5)
    assert torch.equal(pack(unpack(flux_latents(1), 8, 8)), flux_latents(1))


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_runner_equals_forward(guidance_embeds):
    tr = tiny_flux_transformer(guidance_embeds=guidance_embeds)
    e = flux_embeds(2)
    x, t = torch.randn(2, 4, 8, 6), torch.tensor(700.0)
    b = FluxBackbone(tr, guidance=3.5)
    cond = [TextCondition(e["prompt_embeds"], e["pooled_prompt_embeds"])]
    ref = tr(hidden_states=pack(x), encoder_hidden_states=e["prompt_embeds"], pooled_projections=e["pooled_prompt_embeds"],
             return_dict=False, **b._call_args(x, t, e["prompt_embeds"]))[0]
    assert torch.equal(b.forward([x], t, cond), unpack(ref, 8, 6))
    s = b.embed([x], t, cond)
    for i in range(b.num_blocks):
        s = b.block(i, s)
    assert b.num_blocks == 7 and torch.equal(b.head(s), unpack(ref, 8, 6))


def test_layers_are_addressed_within_the_named_block_lists():
    counts = (3, 4)
    assert FLUX.resolve_layers(emag.parse_layers("double:1,single:0-1"), counts) == (1, 3, 4)
    assert [FLUX.address(i, counts) for i in (0, 2, 3, 6)] == ["double:0", "double:2", "single:0", "single:3"]
    with pytest.raises(ValueError, match="2 block lists .*name the list of each layer, e.g. 'double:1'"):
        FLUX.resolve_layers(emag.parse_layers("1"), counts)
    with pytest.raises(ValueError, match="'single' list has 4 blocks"):
        FLUX.resolve_layers(emag.parse_layers("single:4"), counts)
    with pytest.raises(ValueError, match="no block list 'triple'"):
        FLUX.resolve_layers(emag.parse_layers("triple:0"), counts)
    with pytest.raises(ValueError, match="mixes named"):
        emag.parse_layers("double:1,2")
    # the defaults: the middle double blocks, inside a small model too
    assert FLUX.default_layer_positions("pag", counts, "PAG") == (1,)
    assert FLUX.default_layer_positions("emag", (19, 38), "EMAG") == (8, 9, 10)
    base, pipe = pipes()
    with pytest.raises(ValueError, match="name the list of each layer"):
        call(pipe, guidance=[emag.PAG(2.0, layers=[1])])


def test_neutral_scales_are_the_base_pipeline_bit_for_bit():
    base, pipe = pipes()
    ref = call(base)
    for terms in ([emag.PAG(0.0, layers="double:1")], [emag.EMAG(1.0, layers="double:0-2,single:1")],
                  [emag.SEG(0.0, layers="single:2")]):
        assert torch.equal(call(pipe, guidance=terms), ref), terms
    # true CFG (negative prompt): the same formula as diffusers' true_cfg_scale, which runs the two passes
    # separately; ours batches [cond ; uncond] by default and runs them alone with batching="none"
    ref_cfg = call(base, negative=True, true_cfg_scale=4.0)
    assert torch.equal(call(pipe, negative=True, guidance=[emag.CFG(4.0)], batching="none"), ref_cfg)
    torch.testing.assert_close(call(pipe, negative=True, guidance=[emag.CFG(4.0)]), ref_cfg, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["full", "q"])
def test_emag_acts_and_its_fast_path_is_exact_across_both_block_lists(variant):
    base, pipe = pipes()
    ref = call(base)
    terms = [emag.EMAG(2.0, layers="double:1-2,single:0-1", variant=variant)]
    fast = call(pipe, guidance=terms)
    trace = pipe.emag_trace
    assert any(r.apply for r in trace)
    slow = call(pipe, guidance=terms, fast=False)
    scale = ref.abs().max()
    assert (fast - slow).abs().max() <= 1e-5 * scale
    assert (fast - ref).abs().max() > 1e-3 * scale


def test_emag_alone_is_nested_on_the_conditional_prediction():
    """Distilled Flux has no unconditional branch: EMAG alone guides the conditional prediction,
    ``c_e + w_e (c - c_e)``, one perturbed pass per step (no negative prompt encoded)."""
    _, pipe = pipes()
    seen = []
    call(pipe, guidance=[emag.EMAG(2.0, layers="double:1")],
         on_step_outputs=lambda step, guided: seen.append((dict(step.outputs), guided)))
    applied = [(o, g) for o, g in seen if len(o) == 2]
    assert applied and all("uncond" not in o for o, _ in seen)
    for outputs, guided in applied:
        c = outputs["cond"]
        c_e = next(v for k, v in outputs.items() if k != "cond")
        torch.testing.assert_close(guided, c_e + 2.0 * (c - c_e), rtol=1e-6, atol=1e-6)


class IdentityMaskProcessor:
    """Reference PAG for one Flux block: diffusers' own Flux processor, given the additive mask that makes
    image->image attention the identity ([text ; image] order; text rows and image->text untouched)."""

    def __init__(self, proc, text_tokens: int, image_tokens: int):
        self.proc = proc
        n = text_tokens + image_tokens
        m = torch.zeros(n, n)
        block = torch.full((image_tokens, image_tokens), float("-inf"))
        block.fill_diagonal_(0.0)
        m[text_tokens:, text_tokens:] = block
        self.mask = m[None, None]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        return self.proc(attn, hidden_states, encoder_hidden_states, self.mask, image_rotary_emb)


@pytest.mark.parametrize("where,index", [("double:1", ("transformer_blocks", 1)),
                                         ("single:2", ("single_transformer_blocks", 2))])
def test_pag_equals_an_independent_reference(where, index):
    """The perturbed branch of EMAG's PAG equals the transformer run with the reference processor on the same
    input; the guided prediction is ``c + s (c - p)``; a non-square image (grid 4 x 6)."""
    _, pipe = pipes()
    steps = []
    call(pipe, size=(16, 24), guidance=[emag.PAG(2.0, layers=where)],
         on_step_outputs=lambda step, guided: steps.append((step.x, step.t, dict(step.outputs), guided, step.grid)))
    x, t, outputs, guided, grid = steps[2]
    assert grid == (4, 6)
    branch = next(k for k in outputs if k.startswith("pag"))
    tr = pipe.transformer
    block = getattr(tr, index[0])[index[1]]
    original = block.attn.processor
    e = flux_embeds(2)
    block.attn.processor = IdentityMaskProcessor(original, e["prompt_embeds"].shape[1], 4 * 6)
    try:
        cond = [TextCondition(e["prompt_embeds"], e["pooled_prompt_embeds"])]
        with torch.no_grad():
            ref = FluxBackbone(tr, guidance=3.5).forward([x], t, cond)
    finally:
        block.attn.processor = original
    torch.testing.assert_close(outputs[branch], ref, rtol=1e-5, atol=1e-5)
    assert (outputs[branch] - outputs["cond"]).abs().max() > 1e-3  # the perturbation acts
    torch.testing.assert_close(guided, outputs["cond"] + 2.0 * (outputs["cond"] - outputs[branch]))


def test_pag_leaves_the_text_rows_of_the_attention_untouched():
    """At the perturbed double block the text tokens' attention output of the PAG rows equals the conditional
    rows' (same input, one pass): only image queries' image->image attention is replaced."""
    _, pipe = pipes()
    attn = pipe.transformer.transformer_blocks[0].attn
    outs = []
    handle = attn.register_forward_hook(lambda m, a, k, out: outs.append(out), with_kwargs=True)
    try:
        call(pipe, guidance=[emag.PAG(2.0, layers="double:0")], batching="all")
    finally:
        handle.remove()
    image, text = outs[0]
    assert image.shape[0] == 4  # [cond ; pag] x 2 samples in one pass
    torch.testing.assert_close(text[2:], text[:2], rtol=1e-5, atol=1e-6)
    assert (image[2:] - image[:2]).abs().max() > 1e-3


@pytest.mark.parametrize("term", [emag.SEG(2.0, layers="double:1"), emag.SAG(0.5, layers="single:1"),
                                  emag.SLG(2.0, layers="single:0-1", window=(0, 1)), emag.STG(2.0, layers="double:2"),
                                  emag.STG(2.0, layers="single:2", mode="attention"),
                                  emag.TPG(2.0, layers="double:1"), emag.ERG(2.0, layers="double:0-1"),
                                  emag.S2(2.0)])
def test_the_perturbation_methods_run_on_a_non_square_flux_image(term):
    base, pipe = pipes()
    ref = call(base, size=(16, 24))
    out = call(pipe, size=(16, 24), guidance=[term])
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out - ref).abs().max() > 1e-4


@pytest.mark.parametrize("terms", [[emag.APG(4.0)], [emag.CFGZeroStar(4.0)], [emag.CFG(4.0), emag.CADS()],
                                   [emag.CFG(4.0), emag.EMAG(2.0, layers="double:1")]], ids=["apg", "cfg-zero", "cads", "emag"])
def test_unconditional_methods_use_the_negative_prompt(terms):
    base, pipe = pipes()
    out = call(pipe, negative=True, guidance=terms)
    assert torch.isfinite(out).all() and (out - call(base)).abs().max() > 1e-4


def test_save_and_load_from_disk(tmp_path):
    base, pipe = pipes()
    pipe.save_pretrained(tmp_path)
    loaded = emag.FluxEMAGPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    terms = [emag.EMAG(2.0, layers="double:1,single:2")]
    assert torch.equal(call(loaded, guidance=terms), call(pipe, guidance=terms))


def test_the_command_line_generates_with_flux_and_records_named_layers(tmp_path):
    from click.testing import CliRunner

    from emag.cli import cli
    from emag.io import read_png_params
    from tiny_models import tiny_flux_text_pipeline

    tiny_flux_text_pipeline(tmp_path / "build").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "model"), "--prompt", "a cat", "--method",
                                 "emag,pag", "--layers", "double:1,single:0", "--param", "pag.layers=double:2",
                                 "--steps", "3", "--height", "32", "--width", "48", "--out", str(out)])
    assert r.exit_code == 0, r.output
    meta = read_png_params(out / "00000_seed0.png")
    assert meta["family"] == "flux" and meta["preset"] == "flux-dev" and meta["guidance_scale"] == 3.5
    assert meta["emag"]["layers"] == "double:1,single:0"
    assert [t["method"] for t in meta["guidance"]] == ["EMAG", "PAG"]  # no true CFG added to distilled Flux
    r = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "model"), "--prompt", "a cat", "--layers", "1",
                                 "--steps", "3", "--height", "32", "--width", "32", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "name the list of each layer" in r.output


def test_autoguidance_with_a_weaker_flux():
    """A separate, shallower Flux of the same layout as the weak model: ``D_w + w (c - D_w)``."""
    base, pipe = pipes()
    weak = tiny_flux_transformer(num_layers=1, num_single_layers=1, seed=5)
    out = call(pipe, guidance=[emag.Autoguidance(2.0, model=weak)])
    assert torch.isfinite(out).all() and (out - call(base)).abs().max() > 1e-4
    assert torch.equal(call(pipe, guidance=[emag.Autoguidance(1.0, model=weak)]), call(base))  # neutral
