"""Flux.1 (``FluxTransformer2DModel``): the family record and its backbone.

Two block lists: 19 ``double`` blocks (``transformer_blocks``: joint attention over ``[text ; image]``,
text tokens FIRST, separate image and text weights) then 38 ``single`` blocks
(``single_transformer_blocks``: one attention over the concatenated ``[text ; image]`` sequence). Every
block's attention is ``attn``, with RMS QK-norm and rotary position embeddings applied to Q and K before
the fused call (so an edit of the fused call sees rotated queries and keys). Flow-matching (velocity)
predictions on 2 x 2-packed latents; text conditioning (T5 sequence + CLIP pooled embeddings).
Flux.1-dev is guidance-distilled: the pipeline's ``guidance_scale`` is an input embedding, not CFG; a
true unconditional branch exists only with a negative prompt (diffusers' ``true_cfg_scale``), which
diffusers evaluates in a separate pass after the conditional one.

The engine sees the latents unpacked, ``[B, 16, H/8, W/8]`` (the spatial layout every guidance term is
written for); the backbone packs them for the transformer and unpacks its prediction (exact reshapes).
No paper gives EMAG or attention-guidance settings for Flux: the defaults below are this project's
choice (the middle blocks of the double list; SD3's EMAG scale and windows), docs/models.md.
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

FLUX = ModelFamily(
    name="flux", label="Flux", transformer_class="FluxTransformer2DModel",
    pipeline_classes=("FluxPipeline", "FluxEMAGPipeline"),
    pipeline="emag.pipelines.flux:FluxEMAGPipeline", backbone="emag.families.flux:FluxBackbone",
    block_lists=(BlockList("double", "transformer_blocks", "attn", "text_first_joint"),
                 BlockList("single", "single_transformer_blocks", "attn", "text_first_joint", "num_single_layers")),
    scale_queries_first=False,
    prediction="flow", conditioning="text", normal_order=("cond", "uncond"), reference_blocks=(19, 38),
    emag_protocol="perturbed-pass",  # the flow-matching (SD3) protocol; no Flux reference exists
    distilled_guidance=True,
    positions="3-axis rotary (text ids 0, image ids (0, row, col)) on Q and K after QK-norm, before the fused call",
    packing=2,
    qk_norm="RMS on image and text Q / K, before RoPE and the fused call (edits see normed, rotated Q / K)",
    hub_models={"black-forest-labs/FLUX.1-dev": True, "black-forest-labs/FLUX.1-schnell": False},
    defaults={
        # EMAG: this project's choice (no published Flux setting): SD3's scale, float16 EMA and windows,
        # the three middle double blocks
        "emag": dict(scale=1.5, layers=middle(3, within="double"), ema_dtype=torch.float16,
                     ema_window=SD3ReferenceWindow(250, 50, 0), apply_window=SD3ReferenceWindow(250, 50, 50)),
        "pag": dict(layers=middle(1, within="double")),
        "seg": dict(layers=middle(3, within="double")),
        "sag": dict(layers=middle(1, within="double")),
        "erg": dict(layers=middle(5, within="double")),
        "s2": dict(layers=every_block),
        "slg": dict(layers=middle(3, within="double")),
        "stg": dict(layers=middle(3, within="double")),
        "tpg": dict(layers=middle(1, within="double")),
        # APG (with true CFG): SD3's threshold (the same 16 x 128 x 128 latent at 1024 px), a true-CFG scale
        # in the range Flux users run (this project's choice)
        "apg": dict(scale=4.0, norm_threshold=7.5, rms_threshold=7.5 / math.sqrt(16 * 128 * 128)),
    },
)


def pack(x: Tensor) -> Tensor:
    """``[B, C, H, W]`` -> Flux's ``[B, (H/2)(W/2), 4C]`` (2 x 2 patches, row-major; diffusers' packing)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack` for an ``h x w`` latent."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> Tensor:
    """The ``(0, row, col)`` position ids of the packed tokens of an ``h x w`` latent (diffusers' ids)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape((h // 2) * (w // 2), 3).to(device=device, dtype=dtype)


class FluxBackbone(Backbone):
    """One batched Flux pass over several branches on unpacked latents, or the same pass block by block
    (the double blocks, then the single blocks): ``embed`` -> ``block(i)`` ... -> ``head`` equals the
    model's ``forward``. ``guidance``: the distilled guidance value (Flux.1-dev), None for models without
    a guidance embedding."""

    family = FLUX

    def __init__(self, transformer: nn.Module, guidance: float | None = None,
                 joint_attention_kwargs: dict | None = None) -> None:
        self.transformer = transformer
        self.guidance = guidance if transformer.config.guidance_embeds else None
        if transformer.config.guidance_embeds and guidance is None:
            raise ValueError("This Flux transformer embeds a guidance value (guidance-distilled, e.g. FLUX.1-dev): "
                             "give the call's guidance_scale.")
        self.joint_attention_kwargs = joint_attention_kwargs
        if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
            raise NotImplementedError("Block-level execution does not support IP-Adapter.")
        self._counts = FLUX.block_counts(transformer)
        self._rotary: tuple[Tensor, Tensor] | None = None

    @property
    def channels(self) -> int:
        return self.transformer.config.in_channels // 4

    @staticmethod
    def token_grid(x: Tensor) -> tuple[int, int]:
        """The image-token grid of unpacked latents ``[B, C, H, W]``: ``(H/2, W/2)``."""
        return (x.shape[-2] // 2, x.shape[-1] // 2)

    @staticmethod
    def _inputs(xs: Sequence[Tensor], conds: Sequence[TextCondition]) -> tuple[Tensor, Tensor, Tensor]:
        c = TextCondition.joined(conds)
        return joined_latents(xs), c.embeds, c.pooled

    def _call_args(self, x: Tensor, t: Tensor, embeds: Tensor) -> dict:
        """The arguments diffusers' Flux pipeline gives the transformer besides the latents and texts."""
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full([1], self.guidance, device=x.device, dtype=torch.float32).expand(b)
        return dict(timestep=t.expand(b).to(x.dtype) / 1000, guidance=guidance,
                    txt_ids=torch.zeros(embeds.shape[1], 3, device=x.device, dtype=embeds.dtype),
                    img_ids=image_ids(h, w, x.device, embeds.dtype))

    def forward(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> Tensor:
        x, embeds, pooled = self._inputs(xs, conds)
        out = self.transformer(hidden_states=pack(x), encoder_hidden_states=embeds, pooled_projections=pooled,
                               joint_attention_kwargs=self.joint_attention_kwargs, return_dict=False,
                               **self._call_args(x, t, embeds))[0]
        return unpack(out, x.shape[-2], x.shape[-1])

    def attention_geometry(self, x: Tensor, cond: TextCondition) -> AttentionGeometry:
        """Joint attention: the text tokens, then the packed image tokens, as queries and keys."""
        cfg = self.transformer.config
        image = (x.shape[-2] // 2) * (x.shape[-1] // 2)
        return AttentionGeometry(cfg.num_attention_heads, cfg.attention_head_dim, image, image + cond.embeds.shape[1])

    # -- block by block ------------------------------------------------------------------------------
    def embed(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> RunState:
        x, embeds, pooled = self._inputs(xs, conds)
        tr = self.transformer
        a = self._call_args(x, t, embeds)
        hidden = tr.x_embedder(pack(x))
        timestep = a["timestep"].to(hidden.dtype) * 1000
        if a["guidance"] is None:
            temb = tr.time_text_embed(timestep, pooled)
        else:
            temb = tr.time_text_embed(timestep, a["guidance"].to(hidden.dtype) * 1000, pooled)
        encoder = tr.context_embedder(embeds)
        self._rotary = tr.pos_embed(torch.cat((a["txt_ids"], a["img_ids"]), dim=0))
        return RunState(hidden, encoder, temb, None, None, tuple(x.shape[-2:]))

    def block(self, i: int, s: RunState) -> RunState:
        blist, j = FLUX.locate(i, self._counts)
        enc, hid = getattr(self.transformer, blist.attr)[j](
            hidden_states=s.hidden, encoder_hidden_states=s.encoder, temb=s.temb, image_rotary_emb=self._rotary,
            joint_attention_kwargs=self.joint_attention_kwargs)
        return replace(s, hidden=hid, encoder=enc)

    def head(self, s: RunState) -> Tensor:
        tr = self.transformer
        out = tr.proj_out(tr.norm_out(s.hidden, s.temb))
        return unpack(out, *s.size)
