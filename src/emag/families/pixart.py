"""PixArt-Σ / PixArt-α (``PixArtTransformer2DModel``): the family record and its backbone.

Self-attention over the ``(H/p) x (W/p)`` patch grid in every block's ``attn1``, then cross-attention
``attn2`` to the T5 text tokens (with their padding mask); epsilon predictions with a learned variance in
the second half of the output channels (which the pipeline drops); text conditioning without pooled
embeddings; diffusers' pipeline evaluates ``[uncond ; cond]`` in one batch. No paper gives EMAG or
attention-guidance settings for PixArt: the defaults are this project's choice (the middle blocks; the
text-to-image EMAG protocol, scale, windows and EMA dtype of SD3), docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..plumbing.conditions import TextCondition, joined_latents
from ..plumbing.runner import RunState
from ..windows import SD3ReferenceWindow
from .base import AttentionGeometry, Backbone, BlockList, ModelFamily, every_block, middle

PIXART = ModelFamily(
    name="pixart", label="PixArt", transformer_class="PixArtTransformer2DModel",
    pipeline_classes=("PixArtSigmaPipeline", "PixArtAlphaPipeline", "PixArtSigmaEMAGPipeline"),
    pipeline="emag.pipelines.pixart:PixArtSigmaEMAGPipeline", backbone="emag.families.pixart:PixArtBackbone",
    block_lists=(BlockList("blocks", "transformer_blocks", "attn1", "image_only", untouched=("attn2",)),),
    scale_queries_first=False,
    prediction="epsilon", conditioning="text", normal_order=("uncond", "cond"), reference_blocks=28,
    emag_protocol="perturbed-pass",  # the text-to-image reference's protocol (SD3); no PixArt reference exists
    hub_models={"PixArt-alpha/PixArt-Sigma-XL-2-1024-MS": False, "PixArt-alpha/PixArt-Sigma-XL-2-512-MS": False},
    defaults={
        "emag": dict(scale=1.5, layers=middle(3), ema_dtype=torch.float16,
                     ema_window=SD3ReferenceWindow(250, 50, 0), apply_window=SD3ReferenceWindow(250, 50, 50)),
        "pag": dict(layers=middle(1)),
        "seg": dict(layers=middle(3)),
        "sag": dict(layers=middle(1)),
        "erg": dict(layers=middle(5)),
        "s2": dict(layers=every_block),
        "slg": dict(layers=middle(3)),
        "stg": dict(layers=middle(3)),
        "tpg": dict(layers=middle(1)),
    },
)


def text_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A ``[B, T]`` keep-mask as the additive ``[B, 1, T]`` bias diffusers' PixArt and Sana models use."""
    if mask is None or mask.ndim != 2:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def text_inputs(xs: Sequence[Tensor], conds: Sequence[TextCondition]) -> tuple[Tensor, Tensor, Tensor | None]:
    """The latents, text embeddings and text masks of several branches, as one batch."""
    c = TextCondition.joined(conds)
    return joined_latents(xs), c.embeds, c.mask


def model_timestep(scheduler: Any, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The scaled model input and the per-row timestep, as diffusers' PixArt / DiT loops build them."""
    if scheduler is not None:
        x = scheduler.scale_model_input(x, t)
    ts = t if torch.is_tensor(t) else torch.tensor([t], device=x.device)
    if ts.dim() == 0:
        ts = ts[None].to(x.device)
    return x, ts.expand(x.shape[0])


class PixArtBackbone(Backbone):
    """One batched PixArt pass over several branches (rows follow the order of the branches), or the same
    pass block by block: ``embed`` -> ``block(i)`` ... -> ``head`` equals the model's ``forward``."""

    family = PIXART
    ADDED = {"resolution": None, "aspect_ratio": None}  # PixArt-Σ's pipeline passes no size conditioning

    def __init__(self, transformer: nn.Module, scheduler: Any = None) -> None:
        self.transformer = transformer
        self.scheduler = scheduler

    def forward(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> Tensor:
        x, embeds, mask = text_inputs(xs, conds)
        x, ts = model_timestep(self.scheduler, x, t)
        return self.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=ts,
                                added_cond_kwargs=self.ADDED, return_dict=False)[0]

    def attention_geometry(self, x: Tensor, cond: TextCondition) -> AttentionGeometry:
        cfg = self.transformer.config
        image = (x.shape[-2] // cfg.patch_size) * (x.shape[-1] // cfg.patch_size)
        return AttentionGeometry(cfg.num_attention_heads, cfg.attention_head_dim, image, image)

    # -- block by block ------------------------------------------------------------------------------
    def embed(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> RunState:
        x, embeds, mask = text_inputs(xs, conds)
        x, ts = model_timestep(self.scheduler, x, t)
        tr = self.transformer
        bias = text_bias(mask, x.dtype)
        hidden = tr.pos_embed(x)
        temb, embedded = tr.adaln_single(ts, self.ADDED, batch_size=x.shape[0], hidden_dtype=hidden.dtype)
        encoder = tr.caption_projection(embeds).view(x.shape[0], -1, hidden.shape[-1])
        return RunState(hidden, encoder, temb, embedded, None, tuple(x.shape[-2:]), bias)

    def block(self, i: int, s: RunState) -> RunState:
        hidden = self.transformer.transformer_blocks[i](
            s.hidden, attention_mask=None, encoder_hidden_states=s.encoder, encoder_attention_mask=s.mask,
            timestep=s.temb, cross_attention_kwargs=None, class_labels=None)
        return replace(s, hidden=hidden)

    def head(self, s: RunState) -> Tensor:
        tr = self.transformer
        shift, scale = (tr.scale_shift_table[None] + s.timestep[:, None].to(tr.scale_shift_table.device)).chunk(2, dim=1)
        hidden = tr.norm_out(s.hidden)
        hidden = hidden * (1 + scale.to(hidden.device)) + shift.to(hidden.device)
        hidden = tr.proj_out(hidden).squeeze(1)
        p = tr.config.patch_size
        h, w = s.size[0] // p, s.size[1] // p
        hidden = hidden.reshape(-1, h, w, p, p, tr.out_channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(-1, tr.out_channels, h * p, w * p)
