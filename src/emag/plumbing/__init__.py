"""Model plumbing: how one block's attention is read and replaced for one slice of the batch."""

from .architectures import Architecture, architecture_of, attention_modules
from .emag_attention import EMAGAttention, LayerAction
from .intercept import route_attention

__all__ = ["Architecture", "EMAGAttention", "LayerAction", "architecture_of", "attention_modules", "route_attention"]
