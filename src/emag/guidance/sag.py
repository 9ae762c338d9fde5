"""SAG, Self-Attention Guidance (Hong, Lee, Jang, Kim, ICCV 2023, arXiv 2210.00939).

Per step (docs/guidance.md section 9.1):

1. The normal pass stores the self-attention of ONE block for the branch the guidance is built from:
   the unconditional branch when it runs this step (with CFG, paper Eq. 25), otherwise the conditional.
2. Mask: average the map over heads, ``m_j = [sum_i A[i, j] > threshold]`` (the mean of the key-received
   mass is 1 because rows sum to 1), on the token grid, upsampled (nearest) by the patch size.
3. Degrade the x0 estimate where attention concentrates: ``x0_bar = m * blur(x0) + (1 - m) * x0``.
4. Re-noise with the PREDICTED noise, not fresh noise: ``x_bar_t = x_t + a_t (x0_bar - x0)`` with
   ``a_t`` the signal coefficient of ``x_t`` (``sqrt(abar)`` VP, ``1 - t`` flow), i.e.
   ``sqrt(abar) x0_bar + sqrt(1 - abar) eps_hat`` (VP) and ``(1 - t) x0_bar + t eps_hat`` with
   ``eps_hat = x_t + (1 - t) v`` (flow): "x_bar_t = x0_bar + (x_t - x0)" in EDM form.
5. A second-stage pass on ``x_bar_t`` with the source branch's condition gives ``D(x_bar_t)``.
6. Guidance in x0 space: ``D += s (x0_bar - x0(D(x_bar_t)))`` (ComfyUI's form). For eps models this is
   exactly diffusers' ``eps += s (eps_hat - eps(x_bar_t))``; for flow ``v -= (s / t)(x0_bar - x0(...))``.

MMDiT (SD3): only the image->image sub-block of the joint attention counts, with its rows renormalised
over the image keys (so the mean key-received mass is 1 again and the threshold keeps its meaning); the
map is computed as ``softmax`` over the image keys, which is exactly that renormalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..layers import LayerSpec, format_layers, parse_layers
from ..parametrization import EpsilonVP, FlowMatching
from ..plumbing.edits import AttentionEdit, AttentionInfo
from ..windows import StepContext
from .base import Branch, GuidanceConfig, Setup, TermRuntime, check_scale, window_of
from .perturbation import resolve_layers
from .seg import gaussian_blur_2d

# The middle block, the analogue of diffusers' / ComfyUI's UNet mid-block attention (no official DiT / SD3
# setting; tune).


# -- the math (pure tensor functions) -------------------------------------------------------------------

def attention_received(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Key-received attention mass ``sum_i A[i, j]`` averaged over heads, ``[B, N]``.

    ``q``, ``k``: ``[B, heads, N, d]`` image queries and keys; ``A = softmax(q k^T * scale)`` over these
    keys, computed one head at a time in float32 (memory ``B N^2``, not ``B heads N^2``).
    """
    total = torch.zeros(q.shape[0], k.shape[2], dtype=torch.float32, device=q.device)
    for h in range(q.shape[1]):
        logits = (q[:, h].float() @ k[:, h].float().transpose(-2, -1)) * scale  # [B, Nq, Nk]
        total += logits.softmax(dim=-1).sum(dim=1)
    return total / q.shape[1]


def sag_mask(received: Tensor, grid: tuple[int, int], threshold: float) -> Tensor:
    """``m = [received > threshold]`` on the ``(H/p, W/p)`` grid (row-major tokens), ``[B, 1, H/p, W/p]`` float."""
    gh, gw = grid
    return (received > threshold).float().view(-1, 1, gh, gw)


def upsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest upsampling of a token-grid mask to the latent resolution ``size`` (an integer patch size)."""
    gh, gw = mask.shape[-2:]
    if size[0] % gh or size[1] % gw or size[0] // gh != size[1] // gw:
        raise RuntimeError(f"SAG: latent size {tuple(size)} is not an integer patch multiple of the "
                           f"token grid {gh}x{gw}.")
    p = size[0] // gh
    return mask.repeat_interleave(p, dim=-2).repeat_interleave(p, dim=-1)


def sag_degrade(x0: Tensor, mask: Tensor, blur_sigma: float, blur_kernel: int) -> Tensor:
    """``x0_bar = m * blur(x0) + (1 - m) * x0`` (paper Eq. 25), written ``x0 + m (blur(x0) - x0)`` so that
    ``m = 0`` returns ``x0`` bit for bit. ``mask`` ``[B, 1, H, W]`` broadcasts over channels."""
    blurred = gaussian_blur_2d(x0, blur_sigma, blur_kernel, clip="reflect")  # diffusers' SAG: the whole kernel
    return x0 + mask.to(x0.dtype) * (blurred - x0)


def signal_coefficient(param: Any) -> float:
    """``a_t`` in ``x_t = a_t x0 + n_t eps``: ``sqrt(abar)`` (VP) or ``1 - t`` (rectified flow)."""
    if isinstance(param, FlowMatching):
        return 1.0 - param.sigma
    if isinstance(param, EpsilonVP):
        return param.alpha_cumprod ** 0.5
    raise ValueError(f"SAG does not know the noise schedule {type(param).__name__}.")


def sag_renoise(x_t: Tensor, x0: Tensor, x0_bar: Tensor, param: Any) -> Tensor:
    """Re-noise ``x0_bar`` with the predicted noise: ``x_t + a_t (x0_bar - x0)``, i.e. ``a_t x0_bar + n_t eps_hat``
    where ``eps_hat`` is the noise that ``x0`` implies. ``x0_bar == x0`` returns ``x_t`` exactly."""
    return x_t + signal_coefficient(param) * (x0_bar - x0)


# -- plumbing -----------------------------------------------------------------------------------------------

class ReceivedAttention(AttentionEdit):
    """Observer on a normal branch: records the SAG mask of its rows (output unchanged).

    It reads the queries and keys the fused attention receives (after any QK-norm) and keeps only the
    image tokens, so on SD3 the map is the image->image block renormalised over the image keys.
    """

    modifies_output = False

    def __init__(self, runtime: "SAGRuntime", branch: str) -> None:
        self.runtime, self.branch = runtime, branch

    def query(self, q: Tensor, k: Tensor, v: Tensor, info: AttentionInfo, rows) -> Tensor:
        if info.grid is None:
            raise RuntimeError("SAG needs the image-token grid of this forward pass.")
        n = info.num_image_tokens
        received = attention_received(q[:, :, :n], k[:, :, :n], info.scale)
        self.runtime.masks[self.branch] = sag_mask(received, info.grid, self.runtime.config.threshold)
        return q


@dataclass(frozen=True)
class SAG(GuidanceConfig):
    """``D += s (x0_bar - x0(D(x_bar_t)))``: guidance away from a prediction whose salient regions were blurred.

    Args:
        scale: ``s`` (>= 0; 0 is off). Default 0.75, diffusers' SD1.5 ``sag_scale`` (ComfyUI uses 0.5;
            the official ADM code writes ``1 + s``).
        layers: the ONE block whose self-attention gives the mask. Default: the middle block (the
            analogue of the UNet mid block used by diffusers and ComfyUI; no official DiT / SD3 setting).
        window: step window, default every step.
        threshold: key-received mass above which a token is masked. Default 1.0, the mean [src: diffusers,
            ComfyUI]; 0 masks every token.
        blur_sigma, blur_kernel: the Gaussian blur of x0 in latent space, reflect padding. Default sigma 1.0,
            kernel 9: diffusers' SD1.5 SAG pipeline (ComfyUI: sigma 2.0, kernel 9; official ADM code in
            pixel space: kernel 31, sigma 3 or 9). The kernel is used whole as diffusers does; only on
            latents too small for its reflect padding (side <= kernel // 2) is it shortened to ``2 side - 1``.

    Cost: one extra pass per step, run after the normal passes (it needs their output). The mask block
    computes its image->image attention map explicitly, one head at a time, on every normal branch of
    the step (the source is known only after they ran); the fused attention output is left untouched.
    """

    scale: float = 0.75
    layers: LayerSpec | None = None
    window: Any = None
    threshold: float = 1.0
    blur_sigma: float = 1.0
    blur_kernel: int = 9

    def __post_init__(self) -> None:
        check_scale("scale", self.scale)
        check_scale("threshold", self.threshold)
        check_scale("blur_sigma", self.blur_sigma)
        if self.blur_sigma <= 0:
            raise ValueError(f"`blur_sigma` must be > 0, got {self.blur_sigma}.")
        if isinstance(self.blur_kernel, bool) or not isinstance(self.blur_kernel, int) or self.blur_kernel < 1 \
                or self.blur_kernel % 2 == 0:
            raise ValueError(f"`blur_kernel` must be a positive odd int, got {self.blur_kernel!r}.")
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
            if len(self.layers) != 1:
                raise ValueError(f"SAG builds its mask from ONE block; got layers={format_layers(self.layers)}.")
        window_of(self.window)

    def runtime(self, setup: Setup) -> TermRuntime:
        layers = resolve_layers(self.layers, setup, "sag", "SAG")
        return SAGRuntime(self, window_of(self.window), layers[0])


class SAGRuntime(TermRuntime):
    kind = "additive"
    space = "x0"
    space_sensitive = True  # its branch has its own (degraded) input: combined as x0 estimates
    name = "sag"

    def __init__(self, config: SAG, window, layer: int) -> None:
        super().__init__(config, window)
        self.layer = layer
        self.branch_name = f"sag:{layer}"
        self.masks: dict[str, Tensor] = {}  # normal branch -> token-grid mask of this step
        self.trace: list[dict] = []  # per active step: source branch and masked fraction
        self._branch: Branch | None = None
        self._ctx: StepContext | None = None
        self._x0_bar: Tensor | None = None

    def active(self, ctx: StepContext) -> bool:
        return self.config.scale != 0 and self.window.contains(ctx)

    def attention_layers(self) -> set[int]:
        return {self.layer}

    def shared_edits(self, ctx: StepContext, branch: str):
        # Observe both normal branches: which one is the source is known only once stage 0 has run.
        return {self.layer: [ReceivedAttention(self, branch)]}, {}

    def decide(self, stage: int, ctx: StepContext, outputs) -> None:
        if stage == 0:  # a new step: the masks are observed in its normal pass
            self.masks, self._ctx, self._x0_bar = {}, ctx, None
            self._branch = Branch(self.branch_name, "cond", make_input=self.degraded_input)
        else:  # the source's condition: uncond when that branch ran this step
            self._branch.condition = "uncond" if "uncond" in outputs else "cond"

    def branches(self, ctx: StepContext, stage: int) -> list[Branch]:
        return [self._branch] if stage == 1 else []

    def degraded_input(self, outputs: dict[str, Tensor], x_t: Tensor | None = None) -> Tensor:
        """``x_bar_t`` from the source branch's output of this step (stage 1)."""
        if x_t is None:
            raise RuntimeError(
                "SAG re-noises from the step's input x_t, but this engine calls Branch.make_input(outputs) "
                "without it; the engine must call make_input(outputs, x_t).")
        source = self._branch.condition
        ch = x_t.shape[1]
        param = self._ctx.param
        if param is None:
            raise ValueError("SAG needs the step's parametrisation (x0 conversion); this scheduler is not supported.")
        x0 = param.to_x0(x_t, outputs[source][:, :ch])
        mask = upsample_mask(self.masks[source], tuple(x_t.shape[-2:]))
        self._x0_bar = sag_degrade(x0, mask, self.config.blur_sigma, self.config.blur_kernel)
        self.trace.append({"step": self._ctx.index, "source": source, "masked": float(mask.mean())})
        return sag_renoise(x_t, x0, self._x0_bar, param)

    def delta(self, c: Tensor, p, ctx: StepContext) -> Tensor:
        return self.config.scale * (self._x0_bar - p[self.branch_name])

    def delta_parts(self, c: Tensor, p, ctx: StepContext) -> tuple[float, Tensor]:
        return self.config.scale, self._x0_bar - p[self.branch_name]

    def describe(self) -> dict:
        d = super().describe()
        d["layers"] = str(self.layer)
        return d
