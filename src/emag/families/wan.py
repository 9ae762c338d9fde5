"""Wan 2.1 (``WanTransformer3DModel``): a video diffusion transformer; the family record and its backbone.

Self-attention ``attn1`` over ``frames x (H/p) x (W/p)`` video tokens (row-major per frame, frame after
frame; 3-D rotary position embeddings applied to Q and K, RMS QK-norm across heads), then
cross-attention ``attn2`` to the umT5 text tokens, untouched. Flow-matching (velocity) predictions on
``[B, 16, F, H/8, W/8]`` latents; diffusers' pipeline evaluates the conditional, then the unconditional
prediction in separate passes. The image-token grid of a call is ``(F/p_t, H/p_h, W/p_w)``: SEG blurs
frame by frame; SAG (a blur of a 2-D latent image) is not defined here.

At video sizes the attention map is large: Wan2.1-T2V-1.3B at 832 x 480 x 81 frames has 32 760 video
tokens and 12 heads, so one dense float16 map is ~25.8 GB per EMA row and block. EMAG's default storage
(``ema_storage="auto"``) keeps dense maps only when they fit in half of the free memory and otherwise holds
the factored EMA (past queries and keys, ~0.2 GB per update, row and block in bfloat16 there;
docs/speed-and-memory.md); EMAG-Q (``variant="q"``, recommended for video) holds one query tensor
(~0.1 GB) per row and block. No paper gives EMAG or attention-guidance settings for Wan: the defaults
are this project's choice (the middle blocks; SD3's EMAG scale and windows), docs/models.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..plumbing.conditions import TextCondition, joined_latents
from ..plumbing.runner import RunState
from ..windows import SD3ReferenceWindow
from .base import AttentionGeometry, Backbone, BlockList, ModelFamily, every_block, middle

WAN = ModelFamily(
    name="wan", label="Wan", transformer_class="WanTransformer3DModel",
    pipeline_classes=("WanPipeline", "WanEMAGPipeline"),
    pipeline="emag.pipelines.wan:WanEMAGPipeline", backbone="emag.families.wan:WanBackbone",
    block_lists=(BlockList("blocks", "blocks", "attn1", "image_only", untouched=("attn2",)),),
    qk_norm="RMS across heads on Q / K, before RoPE and the fused call",
    scale_queries_first=False,
    prediction="flow", conditioning="text", normal_order=("cond", "uncond"), reference_blocks=30,
    emag_protocol="perturbed-pass",  # the flow-matching text-to-image protocol (SD3); no Wan reference exists
    positions="3-D rotary (frame, row, col) on Q and K after QK-norm, before the fused call",
    video=True,
    guider_inputs={"embeds": "encoder_hidden_states"},
    hub_models={"Wan-AI/Wan2.1-T2V-1.3B-Diffusers": False, "Wan-AI/Wan2.1-T2V-14B-Diffusers": False},
    undefined_methods={"sag": "SAG blurs the regions of a 2-D latent image its attention mask selects; it is not "
                              "extended to video latents here."},
    defaults={
        "emag": dict(scale=1.5, layers=middle(3), ema_dtype=torch.float16,
                     ema_window=SD3ReferenceWindow(250, 50, 0), apply_window=SD3ReferenceWindow(250, 50, 50)),
        "pag": dict(layers=middle(1)),
        "seg": dict(layers=middle(3)),
        "erg": dict(layers=middle(5)),
        "s2": dict(layers=every_block),
        "slg": dict(layers=middle(3)),
        "stg": dict(layers=middle(1)),
        "tpg": dict(layers=middle(1)),
    },
)


class WanBackbone(Backbone):
    """One batched Wan pass over several branches, or the same pass block by block: ``embed`` ->
    ``block(i)`` ... -> ``head`` equals the model's ``forward``."""

    family = WAN

    def __init__(self, transformer: nn.Module, attention_kwargs: dict | None = None) -> None:
        self.transformer = transformer
        self.attention_kwargs = attention_kwargs
        self._rotary: tuple[Tensor, Tensor] | None = None

    def token_grid(self, x: Tensor) -> tuple[int, int, int]:
        """The video-token grid of latents ``[B, C, F, H, W]``: ``(F/p_t, H/p_h, W/p_w)``."""
        pt, ph, pw = self.transformer.config.patch_size
        return (x.shape[-3] // pt, x.shape[-2] // ph, x.shape[-1] // pw)

    def _inputs(self, xs, t, conds):
        x = joined_latents(xs)
        return x.to(self.transformer.dtype), TextCondition.joined(conds).embeds, t.expand(x.shape[0])

    def forward(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> Tensor:
        x, embeds, ts = self._inputs(xs, t, conds)
        return self.transformer(hidden_states=x, timestep=ts, encoder_hidden_states=embeds,
                                attention_kwargs=self.attention_kwargs, return_dict=False)[0]

    def attention_geometry(self, x: Tensor, cond: TextCondition) -> AttentionGeometry:
        cfg = self.transformer.config
        tokens = 1
        for n in self.token_grid(x):
            tokens *= n
        return AttentionGeometry(cfg.num_attention_heads, cfg.attention_head_dim, tokens, tokens)

    # -- block by block ------------------------------------------------------------------------------
    def embed(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> RunState:
        x, embeds, ts = self._inputs(xs, t, conds)
        tr = self.transformer
        self._rotary = tr.rope(x)
        hidden = tr.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        temb, proj, encoder, image = tr.condition_embedder(ts, embeds, None, timestep_seq_len=None)
        if image is not None:
            encoder = torch.concat([image, encoder], dim=1)
        return RunState(hidden, encoder, proj.unflatten(1, (6, -1)), temb, None, tuple(x.shape[-3:]))

    def block(self, i: int, s: RunState) -> RunState:
        return replace(s, hidden=self.transformer.blocks[i](s.hidden, s.encoder, s.temb, self._rotary))

    def head(self, s: RunState) -> Tensor:
        tr = self.transformer
        temb = s.timestep
        shift, scale = (tr.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (tr.norm_out(s.hidden.float()) * (1 + scale) + shift).type_as(s.hidden)
        hidden = tr.proj_out(hidden)
        pt, ph, pw = tr.config.patch_size
        f, h, w = s.size[0] // pt, s.size[1] // ph, s.size[2] // pw
        hidden = hidden.reshape(hidden.shape[0], f, h, w, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)
