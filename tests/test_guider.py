"""``emag.EMAGGuider`` in diffusers' modular pipelines (SD3, Wan): the same numbers as this package's
pipelines on the same inputs, the denoiser's own forward back afterwards, clear errors."""

from __future__ import annotations

import pytest
import torch

import emag
from tiny_models import sd3_embeds, sd3_latents, tiny_sd3_pipeline, tiny_wan_pipeline

pytest.importorskip("diffusers.modular_pipelines")


def sd3_modular(base, guider):
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    pipe = StableDiffusion3T2ICoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=base.transformer, scheduler=base.scheduler, guider=guider)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("terms", [
    [emag.CFG(5.0), emag.EMAG(2.0, layers=[1, 2]), emag.PAG(1.0, layers=[3])],
    [emag.CFG(5.0), emag.EMAG(2.0, layers=[1, 2], variant="q"), emag.SEG(1.0, layers=[2])],
    [emag.APG(5.0, norm_threshold=3.0), emag.STG(1.0, layers=[2])],
], ids=["emag-pag", "emag-q-seg", "apg-stg"])
def test_sd3_modular_pipeline_with_the_guider_equals_our_pipeline(terms):
    base = tiny_sd3_pipeline(num_layers=4)
    ours = emag.guide(base)
    ours.set_progress_bar_config(disable=True)
    guider = emag.EMAGGuider(terms)
    pipe = sd3_modular(base, guider)
    e = sd3_embeds(2)
    kw = dict(latents=sd3_latents(2), height=16, width=16, num_inference_steps=6)
    with torch.no_grad():
        ref = ours(**e, **kw, guidance=terms, output_type="latent").images
    out = pipe(**e, **kw, output="latents")
    assert torch.equal(out, ref)
    assert "forward" not in vars(base.transformer)  # the denoiser's own forward is back
    if any(isinstance(t, emag.EMAG) for t in terms):
        assert [r.chosen for r in guider.emag_trace] == [r.chosen for r in ours.emag_trace]
    again = pipe(**e, **kw, output="latents")  # a second call starts a new EMA
    assert torch.equal(again, ref)


def test_wan_modular_pipeline_with_the_guider_equals_our_pipeline():
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    base = tiny_wan_pipeline()
    ours = emag.guide(base)
    ours.set_progress_bar_config(disable=True)
    terms = [emag.CFG(4.0), emag.EMAG(2.0, layers="1-3", variant="q")]
    pipe = WanCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=base.transformer, scheduler=base.scheduler, guider=emag.EMAGGuider(terms))
    pipe.set_progress_bar_config(disable=True)
    e = sd3_embeds(2)
    x = torch.randn(2, 4, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    kw = dict(prompt_embeds=e["prompt_embeds"], negative_prompt_embeds=e["negative_prompt_embeds"], latents=x,
              height=32, width=48, num_frames=9, num_inference_steps=5)
    with torch.no_grad():
        ref = ours(**kw, guidance=terms, output_type="latent").frames
    assert torch.equal(pipe(**kw, output="latents"), ref)


def test_clear_errors():
    with pytest.raises(ValueError, match="at least one guidance term"):
        emag.EMAGGuider([])
    with pytest.raises(TypeError, match="not a guidance term"):
        emag.EMAGGuider(["cfg"])
    base = tiny_sd3_pipeline(num_layers=4)
    pipe = sd3_modular(base, emag.EMAGGuider([emag.CFG(5.0), emag.PAG(1.0, layers=[1])]))
    e = sd3_embeds(1)
    with pytest.raises(ValueError, match="no negative condition"):
        pipe(prompt_embeds=e["prompt_embeds"], pooled_prompt_embeds=e["pooled_prompt_embeds"], latents=sd3_latents(1),
             height=16, width=16, num_inference_steps=3, output="latents")
    assert "forward" not in vars(base.transformer)
