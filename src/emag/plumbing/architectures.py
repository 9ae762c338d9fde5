"""Per-architecture metadata: where the blocks are, how tokens are laid out, reference numerics."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """What the plumbing needs to know about one transformer family.

    ``token_layout``: ``"image_first_joint"`` for MMDiT joint attention over ``[image ; text]`` (SD3:
    image tokens FIRST; Flux is text-first and is not supported yet), ``"image_only"`` for plain
    self-attention over the ``(H/p) x (W/p)`` patch grid (DiT).
    ``scale_queries_first``: rounding order of the reference's explicit attention (DiT scales Q
    before the matmul, SD3 scales the logits after it).
    """

    family: str
    class_name: str
    blocks_attr: str
    attention_attr: str
    token_layout: str
    scale_queries_first: bool


ARCHITECTURES: dict[str, Architecture] = {
    "SD3Transformer2DModel": Architecture(
        family="sd3", class_name="SD3Transformer2DModel", blocks_attr="transformer_blocks",
        attention_attr="attn", token_layout="image_first_joint", scale_queries_first=False,
    ),
    "DiTTransformer2DModel": Architecture(
        family="dit", class_name="DiTTransformer2DModel", blocks_attr="transformer_blocks",
        attention_attr="attn1", token_layout="image_only", scale_queries_first=True,
    ),
}


def architecture_of(transformer: nn.Module) -> Architecture:
    """The registered architecture of ``transformer`` or a clear error naming what is supported."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__]
    raise ValueError(
        f"EMAG does not support the model family {type(transformer).__name__} yet; supported transformers: "
        f"{', '.join(ARCHITECTURES)} (Stable Diffusion 3 / 3.5 and DiT)."
    )


def num_blocks(transformer: nn.Module, arch: Architecture) -> int:
    return len(getattr(transformer, arch.blocks_attr))


def attention_modules(transformer: nn.Module, arch: Architecture, layers: tuple[int, ...]) -> dict[int, nn.Module]:
    """``{block index: attention module}`` for the selected blocks (the joint attention on SD3)."""
    blocks = getattr(transformer, arch.blocks_attr)
    out = {}
    for layer in layers:
        module = getattr(blocks[layer], arch.attention_attr, None)
        if module is None:
            raise ValueError(f"Block {layer} of {arch.class_name} has no attention module `{arch.attention_attr}`.")
        out[layer] = module
    return out
