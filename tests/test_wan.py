"""A video DiT (Wan 2.1-shaped) through the Wan family: a frames x height x width token grid, 3-D RoPE,
separate conditional and unconditional passes in diffusers' pipeline. Block runner = forward; neutral
scales = the base pipeline bit for bit; EMAG's fast path = its straightforward path (full and Q); the map
EMA's storage at video sizes; PAG against an independent reference; SEG frame by frame; refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import emag
from emag.families.base import AttentionGeometry
from emag.families.wan import WanBackbone
from emag.guidance.emag import state as emag_state
from emag.guidance.emag.settings import resolve
from emag.guidance.emag.state import EMAGState
from emag.guidance.seg import blur_image_queries
from emag.plumbing.conditions import TextCondition
from tiny_models import sd3_embeds, tiny_wan_pipeline, tiny_wan_transformer

FRAMES, H, W = 3, 4, 6  # latent frames x latent height x width (9 frames of 32 x 48 px); grid 3 x 2 x 3


def pipes():
    base = tiny_wan_pipeline()
    pipe = emag.guide(base)
    pipe.set_progress_bar_config(disable=True)
    return base, pipe


def call(pipe, negative=True, **kw):
    e = sd3_embeds(2)
    x = torch.randn(2, 4, FRAMES, H, W, generator=torch.Generator().manual_seed(2))
    extra = {"negative_prompt_embeds": e["negative_prompt_embeds"]} if negative else {}
    with torch.no_grad():
        return pipe(prompt_embeds=e["prompt_embeds"], latents=x, height=32, width=48, num_frames=9,
                    num_inference_steps=5, output_type="latent", **extra, **kw).frames


def test_runner_equals_forward():
    tr = tiny_wan_transformer()
    e = sd3_embeds(2)
    x, t = torch.randn(2, 4, FRAMES, H, W), torch.tensor(700.0)
    cond = [TextCondition(e["prompt_embeds"])]
    ref = tr(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=e["prompt_embeds"], return_dict=False)[0]
    b = WanBackbone(tr)
    assert b.token_grid(x) == (3, 2, 3)
    assert torch.equal(b.forward([x], t, cond), ref)
    s = b.embed([x], t, cond)
    for i in range(b.num_blocks):
        s = b.block(i, s)
    assert torch.equal(b.head(s), ref)


def test_neutral_scales_are_the_base_pipeline_bit_for_bit():
    base, pipe = pipes()
    ref = call(base, guidance_scale=4.0)
    # diffusers runs the conditional and unconditional passes separately: batching="none" is that layout
    for terms in ([emag.CFG(4.0)], [emag.CFG(4.0), emag.PAG(0.0)], [emag.CFG(4.0), emag.EMAG(1.0, layers="1-3")]):
        assert torch.equal(call(pipe, guidance=terms, batching="none"), ref), terms
    torch.testing.assert_close(call(pipe, guidance=[emag.CFG(4.0)]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["full", "q"])
def test_emag_acts_and_its_fast_path_is_exact(variant):
    base, pipe = pipes()
    ref = call(base, guidance_scale=3.0)
    terms = [emag.CFG(3.0), emag.EMAG(2.0, layers="1-4", variant=variant)]
    fast = call(pipe, guidance=terms)
    assert any(r.apply for r in pipe.emag_trace)
    slow = call(pipe, guidance=terms, fast=False)
    scale = ref.abs().max()
    assert (fast - slow).abs().max() <= 1e-5 * scale
    assert (fast - ref).abs().max() > 1e-3 * scale


def test_the_map_ema_goes_factored_at_video_sizes(monkeypatch):
    """Wan2.1-T2V-1.3B at 832 x 480 x 81 frames: 32 760 video tokens, 12 heads of 128; the dense float16 maps
    of EMAG's three default blocks for [uncond ; cond] are ~155 GB, beyond half of an 80 GB card; the factored
    EMA of 50 bfloat16 updates (~60 GB) is smaller: ``ema_storage="auto"`` holds the factored one."""
    cfg = resolve(emag.EMAG(), "wan", 30)
    assert cfg.layers == (14, 15, 16) and cfg.ema_storage == "auto"
    state = EMAGState(cfg, 2, "before")
    state.stored_updates = 50
    geometry = AttentionGeometry(heads=12, head_dim=128, image_tokens=32760, key_tokens=32760)
    dense = 2 * 12 * 32760 * 32760 * 2 * 3
    assert dense > 150e9
    monkeypatch.setattr(emag_state, "dense_budget_bytes", lambda device: 40 << 30)
    assert state.choose_storage(geometry, torch.bfloat16, torch.device("cpu")) == "factored"


def test_factored_storage_gives_the_dense_numbers_on_video():
    _, pipe = pipes()
    terms = [emag.CFG(3.0), emag.EMAG(2.0, layers="1-3", ema_dtype=torch.float32)]
    dense = call(pipe, guidance=terms)
    assert pipe.guidance_runtimes[1].state.storage == "dense"
    factored = call(pipe, guidance=[terms[0], dataclasses.replace(terms[1], ema_storage="factored")])
    assert pipe.guidance_runtimes[1].state.storage == "factored"
    torch.testing.assert_close(factored, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())


class ValueProcessor:
    """Reference PAG on plain self-attention: the identity map, so the attention output is V itself."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        return attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))


def test_pag_equals_an_independent_reference_and_the_grid_is_frames_by_height_by_width():
    _, pipe = pipes()
    steps = []
    call(pipe, guidance=[emag.CFG(3.0), emag.PAG(2.0, layers=2)],
         on_step_outputs=lambda step, guided: steps.append((step.x, step.t, dict(step.outputs), step.grid)))
    x, t, outputs, grid = steps[1]
    assert grid == (3, 2, 3)
    branch = next(k for k in outputs if k.startswith("pag"))
    attn = pipe.transformer.blocks[2].attn1
    original = attn.processor
    attn.processor = ValueProcessor()
    try:
        with torch.no_grad():
            ref = WanBackbone(pipe.transformer).forward([x], t, [TextCondition(sd3_embeds(2)["prompt_embeds"])])
    finally:
        attn.processor = original
    torch.testing.assert_close(outputs[branch], ref, rtol=1e-5, atol=1e-5)
    assert (outputs[branch] - outputs["cond"]).abs().max() > 1e-3


@pytest.mark.parametrize("sigma", [1.0, float("inf")])
def test_seg_blurs_video_queries_frame_by_frame(sigma):
    q = torch.randn(2, 2, 3 * 4 * 5 + 7, 6)  # 3 frames of 4 x 5 tokens, then 7 other tokens
    out = blur_image_queries(q, 60, (3, 4, 5), sigma)
    frames = [blur_image_queries(q[:, :, f * 20:(f + 1) * 20], 20, (4, 5), sigma) for f in range(3)]
    torch.testing.assert_close(out[:, :, :60], torch.cat(frames, dim=2))
    assert torch.equal(out[:, :, 60:], q[:, :, 60:])


@pytest.mark.parametrize("term", [emag.SEG(2.0, sigma=1.0), emag.STG(2.0), emag.STG(2.0, mode="attention"), emag.SLG(2.0, window=(0, 1)),
                                  emag.TPG(2.0),
                                  emag.ERG(2.0), emag.S2(2.0)])
def test_the_methods_run_on_video(term):
    base, pipe = pipes()
    ref = call(base, guidance_scale=3.0)
    out = call(pipe, guidance=[emag.CFG(3.0), term])
    assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


def test_sag_and_two_expert_models_are_refused():
    _, pipe = pipes()
    with pytest.raises(ValueError, match="SAG is not defined on Wan"):
        call(pipe, guidance=[emag.CFG(3.0), emag.SAG(0.5, layers=1)])
    pipe.register_to_config(boundary_ratio=0.9)
    with pytest.raises(NotImplementedError, match="two-expert"):
        call(pipe, guidance=[emag.CFG(3.0)])


def test_save_and_load_from_disk(tmp_path):
    _, pipe = pipes()
    pipe.save_pretrained(tmp_path)
    loaded = emag.WanEMAGPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    terms = [emag.CFG(3.0), emag.EMAG(1.5, layers="1-3", variant="q")]
    assert torch.equal(call(loaded, guidance=terms), call(pipe, guidance=terms))


def test_the_command_line_generates_a_video_as_an_animated_png(tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from emag.cli import cli
    from emag.io import read_png_params
    from tiny_models import tiny_wan_text_pipeline

    tiny_wan_text_pipeline(tmp_path / "build").save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "model"), "--prompt", "a cat", "--method", "cfg,emag", "--variant", "q",
            "--layers", "1-3", "--steps", "3", "--height", "32", "--width", "48", "--num-frames", "9"]
    r = CliRunner().invoke(cli, ["generate", *args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    path = out / "00000_seed0.png"
    meta = read_png_params(path)
    assert meta["family"] == "wan" and meta["num_frames"] == 9 and meta["emag"]["variant"] == "q"
    with Image.open(path) as im:
        assert im.n_frames == 9 and im.size == (48, 32)
    r = CliRunner().invoke(cli, ["generate", *args, "--out", str(out)])  # resumed, not redone
    assert r.exit_code == 0 and "resumed" in r.output
    r = CliRunner().invoke(cli, ["sample", "--protocol", "prompts", "--model", str(tmp_path / "model"),
                                 "--out", str(tmp_path / "s")])
    assert r.exit_code != 0 and "video model" in r.output


@pytest.mark.parametrize("terms", [[emag.APG(3.0, norm_threshold=5.0)], [emag.CFG(3.0), emag.CADS()],
                                   [emag.CFGZeroStar(3.0)], [emag.CFG(3.0), emag.PAG(1.0), emag.EMAG(2.0, layers="1-3")]],
                         ids=["apg", "cads", "cfg-zero-star", "emag+pag"])
def test_the_unconditional_methods_run(terms):
    base, pipe = pipes()
    ref = call(base, guidance_scale=3.0)
    out = call(pipe, guidance=terms)
    assert out.shape == ref.shape and torch.isfinite(out).all() and (out - ref).abs().max() > 1e-4


def test_autoguidance_with_a_weaker_wan():
    base, pipe = pipes()
    weak = tiny_wan_transformer(num_layers=2, seed=5)
    out = call(pipe, guidance=[emag.CFG(3.0), emag.Autoguidance(2.0, model=weak)])
    assert torch.isfinite(out).all() and (out - call(base, guidance_scale=3.0)).abs().max() > 1e-4


def test_num_frames_on_an_image_model_is_a_clear_error():
    from click.testing import CliRunner

    from emag.cli import cli

    r = CliRunner().invoke(cli, ["generate", "--num-frames", "5", "--out", "unused"])
    assert r.exit_code != 0 and "--num-frames is for video models" in r.output
