"""Sana (``SanaTransformer2DModel``): the family record and its backbone.

Every block's self-attention ``attn1`` is LINEAR attention (ReLU kernels, ``phi(Q) (phi(K)^T V)``
normalised by ``phi(Q) phi(K)^T 1``): no softmax attention map is ever formed, so what is defined there
is what acts on the queries alone: EMAG's Q variant (the EMA of the image queries, the same first-update,
score and replacement rules) and SEG's query blur; whole-block methods (SLG, STG residual, S², TPG) and
the CFG family act as everywhere. EMAG's full variant (an EMA of attention maps), PAG (an identity map),
SAG (the map's attention mass), STG's attention mode and ERG (a softmax temperature, which cancels in
linear attention's normalisation) are refused with the reason (docs/models.md). Cross-attention
``attn2`` to the Gemma text tokens (with their padding mask) is softmax and untouched. Flow-matching
(velocity) predictions; diffusers' pipeline evaluates ``[uncond ; cond]`` in one batch and guides the
float32 prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from ..plumbing.conditions import TextCondition
from ..plumbing.runner import RunState
from ..windows import SD3ReferenceWindow
from .base import AttentionGeometry, Backbone, BlockList, ModelFamily, every_block, middle
from .pixart import text_bias, text_inputs

_NO_MAP = "Sana's self-attention is linear attention, which forms no softmax attention map"
SANA = ModelFamily(
    name="sana", label="Sana", transformer_class="SanaTransformer2DModel",
    pipeline_classes=("SanaPipeline", "SanaEMAGPipeline"),
    pipeline="emag.pipelines.sana:SanaEMAGPipeline", backbone="emag.families.sana:SanaBackbone",
    block_lists=(BlockList("blocks", "transformer_blocks", "attn1", "image_only", attention="linear",
                       untouched=("attn2",)),),
    qk_norm="Sana 1.5: RMS on Q / K before the kernels (query edits see normed Q)",
    positions="none added to the tokens (the Mix-FFN's depthwise convolution carries position)",
    scale_queries_first=False,
    prediction="flow", conditioning="text", normal_order=("uncond", "cond"), reference_blocks=20,
    emag_protocol="perturbed-pass",  # the flow-matching text-to-image protocol (SD3); no Sana reference exists
    hub_models={"Efficient-Large-Model/Sana_1600M_1024px_diffusers": False,
                "Efficient-Large-Model/Sana_600M_1024px_diffusers": False},
    undefined_methods={
        "pag": f"{_NO_MAP} to replace by the identity (diffusers' Sana PAG substitutes V, a different operation).",
        "sag": f"{_NO_MAP} whose attention mass could select the regions to blur.",
        "erg": f"{_NO_MAP}; its temperature (a scale of the queries) cancels in linear attention's normalisation.",
    },
    defaults={
        # EMAG: the Q variant is the one defined here (EMAG() without variant='q' is refused with this
        # advice); scale, windows, EMA dtype: SD3's (this project's choice)
        "emag": dict(scale=1.5, layers=middle(3), ema_dtype=torch.float16,
                     ema_window=SD3ReferenceWindow(250, 50, 0), apply_window=SD3ReferenceWindow(250, 50, 50)),
        "seg": dict(layers=middle(3)),
        "s2": dict(layers=every_block),
        "slg": dict(layers=middle(3)),
        "stg": dict(layers=middle(3)),
        "tpg": dict(layers=middle(1)),
    },
)


class SanaBackbone(Backbone):
    """One batched Sana pass over several branches, or the same pass block by block: ``embed`` ->
    ``block(i)`` ... -> ``head`` equals the model's ``forward`` (float32 predictions, as the pipeline
    guides them)."""

    family = SANA

    def __init__(self, transformer: nn.Module, attention_kwargs: dict | None = None) -> None:
        self.transformer = transformer
        self.attention_kwargs = attention_kwargs

    def _inputs(self, xs, t, conds):
        x, embeds, mask = text_inputs(xs, conds)
        dtype = self.transformer.dtype
        ts = t.expand(x.shape[0]) * self.transformer.config.timestep_scale
        return x.to(dtype), embeds.to(dtype), mask, ts

    def forward(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> Tensor:
        x, embeds, mask, ts = self._inputs(xs, t, conds)
        return self.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=ts,
                                return_dict=False, attention_kwargs=self.attention_kwargs)[0].float()

    def attention_geometry(self, x: Tensor, cond: TextCondition) -> AttentionGeometry:
        cfg = self.transformer.config
        image = (x.shape[-2] // cfg.patch_size) * (x.shape[-1] // cfg.patch_size)
        return AttentionGeometry(cfg.num_attention_heads, cfg.attention_head_dim, image, image)

    # -- block by block ------------------------------------------------------------------------------
    def embed(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[TextCondition]) -> RunState:
        x, embeds, mask, ts = self._inputs(xs, t, conds)
        tr = self.transformer
        bias = text_bias(mask, x.dtype)
        hidden = tr.patch_embed(x)
        if tr.config.get("guidance_embeds", False):
            raise NotImplementedError("Block-level execution of guidance-embedded Sana (Sana Sprint) is not supported.")
        temb, embedded = tr.time_embed(ts, batch_size=x.shape[0], hidden_dtype=hidden.dtype)
        encoder = tr.caption_norm(tr.caption_projection(embeds).view(x.shape[0], -1, hidden.shape[-1]))
        return RunState(hidden, encoder, temb, embedded, None, tuple(x.shape[-2:]), bias)

    def block(self, i: int, s: RunState) -> RunState:
        p = self.transformer.config.patch_size
        hidden = self.transformer.transformer_blocks[i](s.hidden, None, s.encoder, s.mask, s.temb,
                                                        s.size[0] // p, s.size[1] // p)
        return replace(s, hidden=hidden)

    def head(self, s: RunState) -> Tensor:
        tr = self.transformer
        hidden = tr.proj_out(tr.norm_out(s.hidden, s.timestep, tr.scale_shift_table))
        p = tr.config.patch_size
        h, w = s.size[0] // p, s.size[1] // p
        hidden = hidden.reshape(hidden.shape[0], h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        return hidden.reshape(hidden.shape[0], -1, h * p, w * p).float()
