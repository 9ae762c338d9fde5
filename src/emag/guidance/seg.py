"""SEG, Smoothed Energy Guidance (Hong, NeurIPS 2024, arXiv 2408.00760).

The weak branch blurs the image-token QUERIES of selected self-attention layers with a 2-D Gaussian of
std ``sigma`` over the token grid. The attention logits are linear in the queries, so this is the paper's
blur of the attention weights along the query axes, i.e. a smoothed (lower-curvature) attention energy.
``sigma -> inf`` replaces every image query by its spatial mean. Combine (same form as PAG,
[src: SusungHong/SEG-SDXL ``pipeline_seg.py``]):

    D = u + w (c - u) + s (c - c_SEG)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers import LayerSpec, parse_layers
from ..plumbing.edits import AttentionEdit, AttentionInfo
from .base import GuidanceConfig, Setup, TermRuntime, check_scale, window_of
from .perturbation import PerturbationRuntime, resolve_layers

# A band of three middle blocks. SEG has no official SD3 / DiT setting (the SDXL default is the UNet
# ``mid`` block); docs/guidance.md section 15 lists "middle blocks (tune)".

# sigma above this is infinite blur: SEG-SDXL's ``inf_blur_threshold`` (9999.0).
INF_BLUR_THRESHOLD = 9999.0


# -- the blur (pure tensor functions) -------------------------------------------------------------------

def seg_kernel_size(sigma: float) -> int:
    """``k = ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2)``: the smallest odd size covering +-3 sigma
    [src: SEG-SDXL ``pipeline_seg.py``]."""
    c = math.ceil(6.0 * sigma)
    return c + 1 - c % 2


CLIP_RULES = ("seg", "reflect")


def clip_kernel_size(size: int, length: int, rule: str = "seg") -> int:
    """Clip an odd kernel size to an axis of ``length`` cells.

    ``"seg"``: SEG-SDXL's ``min(k, L - (L mod 2 - 1))``, i.e. ``L`` for odd ``L`` and ``L + 1`` for even
    ``L`` [src: SusungHong/SEG-SDXL ``pipeline_seg.py`` ``gaussian_blur_2d``]. ``"reflect"``: only as far as
    reflect padding requires (``k // 2 < L``, the largest such odd ``k`` is ``2 L - 1``), so a kernel that
    fits is used whole, as diffusers' SAG (which never clips) does.
    """
    if rule not in CLIP_RULES:
        raise ValueError(f"Unknown kernel clipping rule {rule!r}; expected one of {CLIP_RULES}.")
    limit = length + 1 - length % 2 if rule == "seg" else 2 * length - 1
    return min(size, limit)


def gaussian_kernel_1d(size: int, sigma: float, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """The normalised Gaussian ``exp(-x^2 / (2 sigma^2))`` sampled at ``x = -(k-1)/2 .. (k-1)/2``."""
    half = (size - 1) / 2.0
    x = torch.linspace(-half, half, size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype=dtype, device=device)


def gaussian_blur_2d(x: Tensor, sigma: float, kernel_size: int | None = None, clip: str = "seg") -> Tensor:
    """Blur ``x`` ``[N, C, H, W]`` over ``(H, W)``, each channel on its own, with a normalised separable
    Gaussian and reflect padding.

    ``kernel_size`` defaults to :func:`seg_kernel_size`; it is clipped per axis by :func:`clip_kernel_size`
    (``clip``: ``"seg"``, SEG-SDXL's rule, or ``"reflect"``). SEG-SDXL clips one kernel for both axes by
    the side it reads (its grids are square); per axis, a non-square grid gets a shorter kernel along its
    short side only. Half-precision inputs are blurred in float32.
    """
    if sigma <= 0:
        raise ValueError(f"The blur sigma must be > 0, got {sigma}.")
    size = seg_kernel_size(sigma) if kernel_size is None else kernel_size
    if size < 1 or size % 2 == 0:
        raise ValueError(f"The blur kernel size must be a positive odd int, got {size}.")
    n, c, h, w = x.shape
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    kh, kw = clip_kernel_size(size, h, clip), clip_kernel_size(size, w, clip)
    gy = gaussian_kernel_1d(kh, sigma, work.dtype, work.device).view(1, 1, kh, 1).expand(c, 1, kh, 1)
    gx = gaussian_kernel_1d(kw, sigma, work.dtype, work.device).view(1, 1, 1, kw).expand(c, 1, 1, kw)
    out = F.conv2d(F.pad(work, (0, 0, kh // 2, kh // 2), mode="reflect"), gy, groups=c)  # along H
    out = F.conv2d(F.pad(out, (kw // 2, kw // 2, 0, 0), mode="reflect"), gx, groups=c)  # along W
    return out.to(x.dtype)


def is_infinite_blur(sigma: float) -> bool:
    return sigma > INF_BLUR_THRESHOLD


def blur_image_queries(q: Tensor, num_image_tokens: int, grid: tuple[int, ...], sigma: float) -> Tensor:
    """Blur the image queries of ``q`` ``[B, heads, N, d]`` (image tokens FIRST, row-major on ``grid``)
    per head channel over the ``(H/p, W/p)`` token grid; the text queries that follow are returned as
    they are. Infinite ``sigma``: every image query becomes the spatial mean of the image queries. A video
    grid ``(frames, H/p, W/p)`` is blurred frame by frame (each frame's own spatial mean when infinite)."""
    n = num_image_tokens
    frames, (gh, gw) = (grid[0], grid[1:]) if len(grid) == 3 else (1, grid)
    if frames * gh * gw != n:
        raise RuntimeError(f"SEG: the token grid {'x'.join(map(str, grid))} does not match the {n} image tokens of "
                           "this attention.")
    b, heads, _, d = q.shape
    q_img = q[:, :, :n].reshape(b, heads, frames, gh * gw, d)
    if is_infinite_blur(sigma):
        blurred = q_img.mean(dim=3, keepdim=True).expand_as(q_img)
    else:  # one plane per (frame, head, channel)
        planes = q_img.permute(0, 2, 1, 4, 3).reshape(b * frames, heads * d, gh, gw)
        blurred = gaussian_blur_2d(planes, sigma).reshape(b, frames, heads, d, gh * gw).permute(0, 2, 1, 4, 3)
    return torch.cat([blurred.reshape(b, heads, n, d), q[:, :, n:]], dim=2)


class BlurQueries(AttentionEdit):
    """SEG's perturbation: blur the image queries the fused attention receives.

    It acts on the query tensor handed to ``scaled_dot_product_attention``, i.e. AFTER any QK-norm. On
    SD3-Medium (no QK-norm) this equals blurring ``to_q``'s output. On SD3.5 (RMS ``norm_q`` after
    ``to_q``) a blur of ``to_q``'s output would be renormalised per token, partly undoing it; blurring the
    normalised queries keeps SEG's defining property that the attention LOGITS are blurred.
    """

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def query(self, q: Tensor, k: Tensor, v: Tensor, info: AttentionInfo, rows) -> Tensor:
        if info.grid is None:
            raise RuntimeError("SEG needs the image-token grid of this forward pass.")
        return blur_image_queries(q, info.num_image_tokens, info.grid, self.sigma)


# -- the term ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SEG(GuidanceConfig):
    """``D += s (c - c_SEG)``: the weak branch blurs the image queries of ``layers`` on the token grid.

    Args:
        scale: ``s`` (>= 0; 0 is off). Default 3.0, the paper's "generally fixed" value [src: SEG-SDXL README].
        sigma: Gaussian std in tokens (> 0). Default infinite (SEG-SDXL's default 9999999); any value above
            9999 (or ``float("inf")``) is infinite blur, i.e. the spatial mean. The paper sweeps sigma
            exponentially (1, 4, 16, ...).
        layers: blocks to perturb. Default: the three middle blocks (SD3 11-13, DiT-XL/2 13-15). There is
            no official SD3 / DiT setting: tune it.
        window: step window, default every step.
    """

    scale: float = 3.0
    sigma: float = math.inf
    layers: LayerSpec | None = None
    window: Any = None

    def __post_init__(self) -> None:
        check_scale("scale", self.scale)
        if isinstance(self.sigma, bool) or not isinstance(self.sigma, (int, float)) or math.isnan(self.sigma) \
                or self.sigma <= 0:
            raise ValueError(f"`sigma` must be a number > 0 (float('inf') = infinite blur), got {self.sigma!r}.")
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        layers = resolve_layers(self.layers, setup, "seg", "SEG")
        return SEGRuntime(self, window_of(self.window), layers, "seg")


class SEGRuntime(PerturbationRuntime):
    queries_only = True  # a blur of the image queries
    def attention_layers(self) -> set[int]:
        return set(self.layers)

    def attention_edits(self, ctx):
        return {l: [BlurQueries(self.config.sigma)] for l in self.layers}
