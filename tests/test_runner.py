"""Block-level execution equals the models' own forward, bit for bit."""

import torch

from emag.plumbing.runner import DiTRunner, RunState, SD3Runner, run_blocks
from tiny_models import sd3_embeds, sd3_latents, tiny_dit_transformer, tiny_sd3_transformer


def test_sd3_runner_is_the_forward_and_can_resume_from_a_block():
    tr = tiny_sd3_transformer(num_layers=5)
    e = sd3_embeds(2)
    x, t = sd3_latents(2), torch.tensor([700.0, 700.0])
    ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=e["prompt_embeds"],
             pooled_projections=e["pooled_prompt_embeds"], return_dict=False)[0]
    r = SD3Runner(tr)
    s0 = r.embed(x, t, e["prompt_embeds"], e["pooled_prompt_embeds"])
    captured = {}
    out = r.head(run_blocks(r, s0, 0, r.num_blocks, {2}, captured))
    assert torch.equal(out, ref)
    resumed = r.head(run_blocks(r, captured[2], 2, r.num_blocks))
    assert torch.equal(resumed, ref)
    one = r.head(run_blocks(r, captured[2].rows(slice(1, 2)), 2, r.num_blocks))
    assert torch.equal(one, ref[1:2]) or torch.allclose(one, ref[1:2], atol=1e-6)
    both = RunState.cat([captured[2].rows(slice(0, 1)), captured[2].rows(slice(1, 2))])
    assert torch.equal(both.hidden, captured[2].hidden)


def test_dit_runner_is_the_forward():
    tr = tiny_dit_transformer(num_layers=4)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([500, 500, 500]), torch.tensor([1, 2, 1000])
    ref = tr(x, timestep=t, class_labels=y).sample
    r = DiTRunner(tr)
    captured = {}
    out = r.head(run_blocks(r, r.embed(x, t, y), 0, r.num_blocks, {1}, captured))
    assert torch.equal(out, ref)
    assert torch.equal(r.head(run_blocks(r, captured[1], 1, r.num_blocks)), ref)
