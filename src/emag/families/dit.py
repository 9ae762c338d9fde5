"""DiT (``DiTTransformer2DModel``): the family record and its backbone.

Self-attention over the ``(H/p) x (W/p)`` patch grid in every block's ``attn1``; epsilon predictions
(with a learned variance in the second half of the output channels); class conditioning with a null
class for the unconditional branch; diffusers' pipeline evaluates ``[cond ; uncond]`` in one batch.
The per-method defaults are those of the reference model, DiT-XL/2 (28 blocks); where they come from is
said next to each.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..plumbing.conditions import ClassCondition
from ..plumbing.hooks import CallHooks
from ..plumbing.runner import RunState
from ..windows import RemainingStepsWindow
from .base import AttentionGeometry, Backbone, BlockList, ModelFamily, every_block, middle


def _legacy_dit(config: dict) -> bool:
    """The hub's DiT folders save the transformer as the legacy ``Transformer2DModel`` with
    ``norm_type="ada_norm_zero"``, which diffusers loads as ``DiTTransformer2DModel``."""
    return config.get("_class_name") == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero"


DIT = ModelFamily(
    name="dit", label="DiT", transformer_class="DiTTransformer2DModel",
    pipeline_classes=("DiTPipeline", "DiTEMAGPipeline"),
    pipeline="emag.pipelines.dit:DiTEMAGPipeline", backbone="emag.families.dit:DiTBackbone",
    block_lists=(BlockList("blocks", "transformer_blocks", "attn1", "image_only"),),
    scale_queries_first=True,  # the reference scales Q before Q K^T
    prediction="epsilon", conditioning="class", normal_order=("cond", "uncond"), reference_blocks=28,
    emag_protocol="normal-pass",  # the EMAG reference's DiT sampler (docs/method.md)
    legacy_transformer=_legacy_dit,
    hub_models={"facebook/DiT-XL-2-256": False, "facebook/DiT-XL-2-512": False},
    samplers=("ddpm-250",),  # the reference sampler (emag.dit_reference_scheduler)
    defaults={
        # EMAG: the paper's DiT-XL/2 setting (w_e 3, blocks 12-15); the reference sampler's absolute
        # windows (steps remaining of its 250-step DDPM), its float32 EMA, its CFG 1.5 and 250 steps, and
        # the original DiT sampler's 3-of-4 guided latent channels
        "emag": dict(scale=3.0, layers=(12, 13, 14, 15), ema_dtype=torch.float32,
                     ema_window=RemainingStepsWindow(50, 150), apply_window=RemainingStepsWindow(50, 100),
                     additive_apply_window=RemainingStepsWindow(0, 100), guided_channels={4: 3},
                     guidance_scale=1.5, num_inference_steps=250,
                     reference_sampler="250-step ancestral DDPM (learned-range variance)"),
        "pag": dict(layers=middle(1)),
        "seg": dict(layers=middle(3)),
        "sag": dict(layers=middle(1)),
        "erg": dict(layers=middle(5)),
        "s2": dict(layers=every_block),  # every block may drop
        "slg": dict(layers=middle(3)),
        "stg": dict(layers=middle(3)),
        "tpg": dict(layers=middle(1)),
        # APG: the EMAG reference's DiT APG (threshold 5, eta 0); its scale is not recorded, so the DiT
        # preset's CFG 1.5 [unverified]; the RMS threshold over sqrt(numel) of the 256 px latent (4 x 32 x 32)
        "apg": dict(scale=1.5, norm_threshold=5.0, rms_threshold=5.0 / math.sqrt(4 * 32 * 32)),
    },
)


class DiTBackbone(Backbone):
    """One batched DiT pass over several branches (rows follow the order of the branches), or the same
    pass block by block: ``embed`` -> ``block(i)`` ... -> ``head`` equals the model's ``forward``."""

    family = DIT

    def __init__(self, transformer: nn.Module, scheduler: Any) -> None:
        self.transformer = transformer
        self.scheduler = scheduler

    def _label_embedders(self) -> list[nn.Module]:
        return [m for m in self.transformer.modules() if type(m).__name__ == "LabelEmbedding"]

    def _inputs(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[ClassCondition]):
        x = torch.cat(list(xs)) if len(xs) > 1 else xs[0]
        labels = torch.cat([c.labels for c in conds]) if len(conds) > 1 else conds[0].labels
        x = self.scheduler.scale_model_input(x, t)
        ts = t if torch.is_tensor(t) else torch.tensor([t], device=x.device)
        if ts.dim() == 0:
            ts = ts[None].to(x.device)
        return x, ts.expand(x.shape[0]), labels

    @contextmanager
    def context(self, conds: Sequence[ClassCondition], rows: Sequence[int]) -> Iterator[None]:
        """Rewrite the class-embedding vectors of the rows whose condition asks for it (CADS)."""
        hooks = CallHooks()  # act in this thread only; removed whatever raises
        try:
            if any(c.embedding is not None for c in conds):
                spans, start = [], 0
                for c, n in zip(conds, rows):
                    spans.append((slice(start, start + n), c.embedding))
                    start += n

                def rewrite(module, args, output):
                    output = output.clone()
                    for r, fn in spans:
                        if fn is not None:
                            output[r] = fn(output[r])
                    return output

                embedders = self._label_embedders()
                if not embedders:
                    raise RuntimeError("No LabelEmbedding found in the DiT transformer: cannot rewrite class embeddings.")
                for m in embedders:
                    hooks.post(m, rewrite)
            yield
        finally:
            hooks.remove()

    def forward(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[ClassCondition]) -> Tensor:
        x, ts, labels = self._inputs(xs, t, conds)
        with self.context(conds, [c.labels.shape[0] for c in conds]):
            return self.transformer(x, timestep=ts, class_labels=labels).sample

    def attention_geometry(self, x: Tensor, cond: ClassCondition) -> AttentionGeometry:
        """Self-attention over the patch grid's tokens."""
        cfg = self.transformer.config
        tokens = (x.shape[-2] // cfg.patch_size) * (x.shape[-1] // cfg.patch_size)
        return AttentionGeometry(cfg.num_attention_heads, cfg.attention_head_dim, tokens, tokens)

    # -- block by block ------------------------------------------------------------------------------
    def embed(self, xs: Sequence[Tensor], t: Tensor, conds: Sequence[ClassCondition]) -> RunState:
        x, ts, labels = self._inputs(xs, t, conds)
        return RunState(self.transformer.pos_embed(x), None, None, ts, labels, tuple(x.shape[-2:]))

    def block(self, i: int, s: RunState) -> RunState:
        hid = self.transformer.transformer_blocks[i](
            s.hidden, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
            timestep=s.timestep, cross_attention_kwargs=None, class_labels=s.labels)
        return replace(s, hidden=hid)

    def head(self, s: RunState) -> Tensor:
        tr = self.transformer
        cond = tr.transformer_blocks[0].norm1.emb(s.timestep, s.labels, hidden_dtype=s.hidden.dtype)
        shift, scale = tr.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        hidden = tr.norm_out(s.hidden) * (1 + scale[:, None]) + shift[:, None]
        hidden = tr.proj_out_2(hidden)
        p = tr.patch_size
        h = w = int(hidden.shape[1] ** 0.5)
        hidden = hidden.reshape(-1, h, w, p, p, tr.out_channels)
        hidden = torch.einsum("nhwpqc->nchpwq", hidden)
        return hidden.reshape(-1, tr.out_channels, h * p, w * p)
