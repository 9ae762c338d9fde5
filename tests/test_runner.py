"""Block-level execution (each family's backbone: embed -> blocks -> head) equals the models' own
forward, bit for bit, and can resume from a captured block."""

import torch

from emag.families.dit import DiTBackbone
from emag.families.sd3 import SD3Backbone
from emag.plumbing.conditions import ClassCondition, TextCondition
from emag.plumbing.runner import RunState
from tiny_models import sd3_embeds, sd3_latents, tiny_dit_transformer, tiny_sd3_transformer


def run_blocks(backbone, s, start, capture=(), captured=None):
    """Blocks ``start ..`` of the backbone; the state ENTERING each block in ``capture`` goes to ``captured``."""
    for i in range(start, backbone.num_blocks):
        if i in capture:
            captured[i] = s
        s = backbone.block(i, s)
    return s


class Identity:
    """A scheduler that leaves DiT's input as it is (the DDPM scheduler's ``scale_model_input``)."""

    @staticmethod
    def scale_model_input(x, t):
        return x


def test_sd3_backbone_is_the_forward_and_can_resume_from_a_block():
    tr = tiny_sd3_transformer(num_layers=5)
    e = sd3_embeds(2)
    x, t = sd3_latents(2), torch.tensor([700.0, 700.0])
    ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=e["prompt_embeds"],
             pooled_projections=e["pooled_prompt_embeds"], return_dict=False)[0]
    b = SD3Backbone(tr)
    cond = TextCondition(e["prompt_embeds"], e["pooled_prompt_embeds"])
    assert torch.equal(b.forward([x], t, [cond]), ref)
    s0 = b.embed([x], t, [cond])
    captured = {}
    assert torch.equal(b.head(run_blocks(b, s0, 0, {2}, captured)), ref)
    assert torch.equal(b.head(run_blocks(b, captured[2], 2)), ref)
    one = b.head(run_blocks(b, captured[2].rows(slice(1, 2)), 2))
    assert torch.equal(one, ref[1:2]) or torch.allclose(one, ref[1:2], atol=1e-6)
    both = RunState.cat([captured[2].rows(slice(0, 1)), captured[2].rows(slice(1, 2))])
    assert torch.equal(both.hidden, captured[2].hidden)


def test_dit_backbone_is_the_forward():
    tr = tiny_dit_transformer(num_layers=4)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor(500), torch.tensor([1, 2, 1000])
    ref = tr(x, timestep=t.expand(3), class_labels=y).sample
    b = DiTBackbone(tr, Identity())
    cond = ClassCondition(y)
    assert torch.equal(b.forward([x], t, [cond]), ref)
    captured = {}
    assert torch.equal(b.head(run_blocks(b, b.embed([x], t, [cond]), 0, {1}, captured)), ref)
    assert torch.equal(b.head(run_blocks(b, captured[1], 1)), ref)
