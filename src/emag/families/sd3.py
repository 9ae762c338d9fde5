"""Stable Diffusion 3 / 3.5 (MMDiT, ``SD3Transformer2DModel``): the family record and its backbone.

Joint attention over ``[image ; text]`` tokens (image tokens FIRST) in every block's ``attn``; flow
matching (velocity) predictions; text conditioning (sequence + pooled embeddings); diffusers' pipeline
evaluates ``[uncond ; cond]`` in one batch. The per-method defaults are those of the reference model,
SD3-Medium (24 blocks); where they come from is said next to each.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..plumbing.conditions import TextCondition, joined_latents
from ..plumbing.runner import RunState
from ..windows import SD3ReferenceWindow
from .base import AttentionGeometry, Backbone, BlockList, ModelFamily, every_block, middle

SD3 = ModelFamily(
    name="sd3", label="SD3", transformer_class="SD3Transformer2DModel",
    pipeline_classes=("StableDiffusion3Pipeline", "StableDiffusion3EMAGPipeline"),
    pipeline="emag.pipelines.sd3:StableDiffusion3EMAGPipeline", backbone="emag.families.sd3:SD3Backbone",
    block_lists=(BlockList("blocks", "transformer_blocks", "attn", "image_first_joint", untouched=("attn2",)),),
    qk_norm="SD3.5: RMS on image and text Q / K, applied before the fused call (edits see normed Q / K)",
    scale_queries_first=False,  # the reference scales the logits after Q K^T
    prediction="flow", conditioning="text", normal_order=("uncond", "cond"), reference_blocks=24,
    emag_protocol="perturbed-pass",  # the EMAG reference's SD3 pipeline (docs/method.md)
    guider_inputs={"embeds": "encoder_hidden_states", "pooled": "text_embeds"},
    hub_models={"stabilityai/stable-diffusion-3-medium-diffusers": True, "stabilityai/stable-diffusion-3.5-medium": True,
                "stabilityai/stable-diffusion-3.5-large": True},
    defaults={
        # EMAG: the paper's SD3-Medium row (w_e 1.5, blocks 6-8); windows and the float16 EMA from the
        # reference SD3 pipeline (k2idx mapping of its 250-step arguments)
        "emag": dict(scale=1.5, layers=(6, 7, 8), ema_dtype=torch.float16,
                     ema_window=SD3ReferenceWindow(250, 50, 0), apply_window=SD3ReferenceWindow(250, 50, 50)),
        "pag": dict(layers=(13,)),  # diffusers' SD3 PAG example
        "seg": dict(layers=middle(3)),
        "sag": dict(layers=middle(1)),
        "erg": dict(layers=middle(5)),
        "s2": dict(layers=every_block),  # every block may drop
        "slg": dict(layers=(7, 8, 9)),  # the SD3.5 reference's skip-layer guidance
        "stg": dict(layers=(7, 8, 9)),
        "tpg": dict(layers=middle(1)),
        # APG: scale and threshold of the EMAG reference's SD3 APG (w 12, r 7.5); the RMS threshold is the
        # absolute one over sqrt(numel) of the 1024 px latent (16 x 128 x 128)
        "apg": dict(scale=12.0, norm_threshold=7.5, rms_threshold=7.5 / math.sqrt(16 * 128 * 128)),
    },
)


class SD3Backbone(Backbone):
    """One batched SD3 pass over several branches (rows follow the order of the branches), or the same
    pass block by block: ``embed`` -> ``block(i)`` ... -> ``head`` equals the model's ``forward``."""

    family = SD3

    def __init__(self, transformer: nn.Module, joint_attention_kwargs: dict | None = None) -> None:
        self.transformer = transformer
        self.joint_attention_kwargs = joint_attention_kwargs
        if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise NotImplementedError("Block-level execution does not support IP-Adapter.")

    @staticmethod
    def _inputs(xs: Sequence[Tensor], conds: Sequence[TextCondition]) -> tuple[Tensor, Tensor, Tensor]:
        c = TextCondition.joined(conds)
        return joined_latents(xs), c.embeds, c.pooled

    def forward(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> Tensor:
        x, embeds, pooled = self._inputs(xs, conds)
        return self.transformer(
            hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=embeds,
            pooled_projections=pooled, joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False,
        )[0]

    def attention_geometry(self, x: Tensor, cond: TextCondition) -> AttentionGeometry:
        """Joint attention: the image tokens of the patch grid, then the text tokens, as queries and keys."""
        cfg = self.transformer.config
        image = (x.shape[-2] // cfg.patch_size) * (x.shape[-1] // cfg.patch_size)
        return AttentionGeometry(cfg.num_attention_heads, cfg.attention_head_dim, image, image + cond.embeds.shape[1])

    # -- block by block ------------------------------------------------------------------------------
    def embed(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> RunState:
        x, embeds, pooled = self._inputs(xs, conds)
        tr = self.transformer
        size = tuple(x.shape[-2:])
        hidden = tr.pos_embed(x).contiguous()
        temb = tr.time_text_embed(t.expand(x.shape[0]), pooled)
        encoder = tr.context_embedder(embeds)
        return RunState(hidden, encoder, temb, None, None, size)

    def block(self, i: int, s: RunState) -> RunState:
        enc, hid = self.transformer.transformer_blocks[i](
            hidden_states=s.hidden, encoder_hidden_states=s.encoder, temb=s.temb,
            joint_attention_kwargs=self.joint_attention_kwargs)
        return replace(s, hidden=hid, encoder=enc)

    def head(self, s: RunState) -> Tensor:
        tr = self.transformer
        hidden = tr.proj_out(tr.norm_out(s.hidden, s.temb))
        p = tr.config.patch_size
        h, w = s.size[0] // p, s.size[1] // p
        hidden = hidden.reshape(hidden.shape[0], h, w, p, p, tr.out_channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(hidden.shape[0], tr.out_channels, h * p, w * p)
