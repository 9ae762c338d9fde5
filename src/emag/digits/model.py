"""Construction of the bundled digits DiT and its sampler from ``train_config.json``.

The transformer is diffusers' :class:`~diffusers.DiTTransformer2DModel` in pixel space (one input
channel, epsilon prediction) with ``num_embeds_ada_norm=10``, so class id 10 is the null
(unconditional) class used by classifier-free guidance.

Note on label dropout: diffusers builds one ``CombinedTimestepLabelEmbeddings`` per transformer block
(inside each block's ``AdaLayerNormZero``) with a hard-coded ``class_dropout_prob=0.1``, and the
output layer calls block 0's embedding a second time. In train mode every one of these
``LabelEmbedding`` modules draws its own dropout mask, so a sample would be unconditional in some
blocks and conditional in others. The training script therefore keeps the ``LabelEmbedding``
modules in eval mode (no built-in dropout) and replaces labels by the null class itself, with one
mask per sample shared by all blocks: :func:`disable_builtin_label_dropout`. The null-class rows of
the embedding tables exist because ``dropout_prob > 0`` at construction.

Note on the sampler: the saved DDIM scheduler has ``clip_sample=False``. With ``clip_sample=True``
diffusers' ``DDIMScheduler.step`` clips the predicted x0 but, unless ``use_clipped_model_output=True``
is passed (DiT pipelines do not), keeps the unclipped epsilon; early in sampling (x0 predictions far
outside [-1, 1], more so with guidance) the two no longer match and the samples end up as pixel noise.
Without clipping the samples are clean; the pipeline clamps the final images to [0, 1].
"""

from __future__ import annotations

import json
import math
from importlib import resources
from typing import Any

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn


def train_config() -> dict[str, Any]:
    """The committed training recipe (``emag/digits/train_config.json``)."""
    return json.loads(resources.files(__package__).joinpath("train_config.json").read_text())


def build_transformer(model_config: dict[str, Any], seed: int = 0) -> DiTTransformer2DModel:
    """A freshly initialised DiT with the original DiT initialisation.

    Linear layers xavier-uniform with zero bias; the patch embedding like a linear layer; label and
    timestep embeddings N(0, 0.02^2); the adaLN modulation of every block and the output layer zero
    (adaLN-Zero: each block starts as the identity and the model predicts zero).
    """
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**model_config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        proj = model.pos_embed.proj  # Conv2d patch embedding, initialised as a linear layer
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        for block in model.transformer_blocks:
            emb = block.norm1.emb
            nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (model.proj_out_1, model.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
    return model


def disable_builtin_label_dropout(model: nn.Module) -> int:
    """Put every ``LabelEmbedding`` of ``model`` in eval mode (call after ``model.train()``).

    Returns how many were found. See the module docstring for why the dropout is done by hand.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.eval()
            count += 1
    return count


def drop_labels(labels: torch.Tensor, null_class: int, prob: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by ``null_class`` with probability ``prob`` (one draw per sample)."""
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def make_scheduler(noise_schedule: dict[str, Any], sampler: dict[str, Any]) -> DDIMScheduler:
    """The DDIM sampler saved with the pipeline (same betas as training; eta=0 by default)."""
    if sampler.get("scheduler", "DDIMScheduler") != "DDIMScheduler":
        raise ValueError(f"Unsupported sampler {sampler.get('scheduler')!r}.")
    return DDIMScheduler(
        num_train_timesteps=noise_schedule["num_train_timesteps"],
        beta_schedule=noise_schedule["beta_schedule"],
        beta_start=noise_schedule["beta_start"],
        beta_end=noise_schedule["beta_end"],
        prediction_type=noise_schedule["prediction_type"],
        clip_sample=sampler["clip_sample"],
        timestep_spacing=sampler["timestep_spacing"],
        set_alpha_to_one=sampler["set_alpha_to_one"],
    )


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_fraction: float) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to ``min_fraction * base_lr``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_fraction + (1 - min_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
