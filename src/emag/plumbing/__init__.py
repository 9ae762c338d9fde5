"""Model plumbing: how one block's attention is read and replaced for one slice of the batch."""

from .architectures import Architecture, architecture_of, attention_modules
from .edits import AttentionEdit, BlockEdit, EditScope, ForwardPlan, RowGroup
from .emag_attention import EMAGFeed, EMAGReplace, EMAGState
from .intercept import route_attention

__all__ = [
    "Architecture", "AttentionEdit", "BlockEdit", "EMAGFeed", "EMAGReplace", "EMAGState", "EditScope", "ForwardPlan",
    "RowGroup", "architecture_of", "attention_modules", "route_attention",
]
