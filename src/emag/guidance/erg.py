"""ERG, Entropy Rectifying Guidance (Ifriqi et al., NeurIPS 2025, arXiv 2504.13987; no official code).

The weak prediction comes from the same network with a flattened (higher-entropy) attention energy:
the queries of selected blocks are multiplied by ``tau < 1``, i.e. attention temperature ``1 / tau``.
The ERG prediction REPLACES the unconditional one (docs/guidance.md section 10):

    D = D_ERG + w (D_c - D_ERG)

so a call costs two passes, like CFG, and it works without any unconditional branch ("I-ERG" for
unconditional models). The concrete codification followed here is ACE-Step's [src: ace-step
``pipeline_ace_step.py``, docs/guidance.md section 10.2]: ``tau = 0.01`` on the queries of a band of middle
blocks. The EMAG reference code's ERG baseline (queries scaled by tau_i = 0.01, then a "multistep"
attention update ``q <- q - gamma (q - alpha Attn(q, K, V))`` with alpha = gamma = 1 and one step,
whose result is the block's attention output) reduces exactly to this: the output is
``Attn(tau q, K, V)``.

Checked (2026-11; the paper's body was not reachable offline, only its abstract and a paper note): the
paper has two parts, I-ERG (attention temperature in the denoiser, from a kick-off step on, on selected
layers) and C-ERG (temperature on the self-attention of every text-encoder layer, for the whole
sampling run, giving a "blurred" condition); its per-model tau and layer choices were not found
[unverified], nor a default scale. No official code exists; ACE-Step (the codification followed here)
scales the query projections by 0.01 in denoiser blocks 15-19, lyric-encoder layers 4-5 and UMT5 text
encoder layers 8-10. ``text_tau`` below adds C-ERG the same way: the text encoders' query projections
of a band of layers are scaled (:mod:`emag.text_weakening`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..layers import LayerSpec, format_layers, parse_layers
from ..plumbing.edits import AttentionEdit, AttentionInfo
from ..plumbing.text_weakening import TextWeakening
from ..windows import StepContext
from .base import Branch, GuidanceConfig, Setup, TermRuntime, window_of
from .perturbation import WeakGuidanceRuntime, check_weak_scale, resolve_layers

# Default layers (the model family's, emag.families): five middle blocks around n/2 (SD3-Medium 10-14,
# DiT-XL/2 12-16). ACE-Step uses blocks 15-19 of its own 24-block transformer; there is no published SD3 /
# DiT setting [unverified]: tune.
CONDITIONS = ("cond", "uncond")
QUERIES = ("image", "all")


class ScaleQueries(AttentionEdit):
    """Multiply the queries the fused attention receives by ``tau`` (logits scaled by ``tau``).

    Applied AFTER any QK-norm: SD3.5's RMS ``norm_q`` would undo a scaling of ``to_q``'s output.
    ``which="image"`` scales only the image queries (on SD3 the ``to_q`` stream, the analogue of
    ACE-Step's ``to_q``); ``"all"`` also scales the text queries of MMDiT joint attention.
    """

    def __init__(self, tau: float, which: str = "image") -> None:
        self.tau, self.which = tau, which

    def query(self, q: Tensor, k: Tensor, v: Tensor, info: AttentionInfo, rows) -> Tensor:
        n = info.num_image_tokens
        if self.which == "all" or n == q.shape[2]:
            return q * self.tau
        return torch.cat([q[:, :, :n] * self.tau, q[:, :, n:]], dim=2)


@dataclass(frozen=True)
class ERG(GuidanceConfig):
    """Entropy rectifying guidance: a temperature-weakened prediction replaces the unconditional one.

    Args:
        scale: ``None`` (default): ERG replaces the unconditional prediction of the call's CFG-like term,
            whose scale applies: ``guidance=[emag.CFG(w), emag.ERG()]`` gives ``D_ERG + w (c - D_ERG)``,
            and with APG the projection acts on ``c - D_ERG`` (how the paper combines with APG). The
            plain unconditional pass is then skipped. ``w`` (a number): ERG
            is a guidance rule of its own, ``D = D_ERG + w (c - D_ERG)``, with no unconditional pass
            (works for unconditional models); ``w = 1`` is neutral. A CFG-like term given as well is then
            applied on top of that result, as with EMAG's nested combination.
        tau: query multiplier in (0, 1] (attention temperature ``1 / tau``). Default 0.01 (ACE-Step
            [unverified against the paper]); ``tau -> 0`` makes attention uniform.
        layers: blocks whose attention is weakened. Default: five middle blocks [unverified; tune].
        window: step window, default every step.
        condition: ``"cond"`` (default, the paper's I-ERG on the conditional input) or ``"uncond"``
            (ACE-Step's style: a temperature-weakened pass on the negative / null condition).
        queries: ``"image"`` (default) or ``"all"`` (also the text queries of SD3's joint attention).
        text_tau: C-ERG (text models only): the prompt of the weak branch is encoded once more with the
            query projections of the text encoders' layers in ``text_depth`` scaled by ``text_tau`` in
            (0, 1]. ``None`` (default): off. The paper's values were not found [unverified].
        text_depth: ``(start, stop)`` fractions of each text encoder's depth whose layers are weakened,
            ``start <= i / n < stop``. Default ``(2/3, 11/12)``: ACE-Step's UMT5 layers 8-10 of 12 (CLIP-L
            8-10, CLIP-G 22-29, T5-XXL 16-21); the paper note says every layer, ``(0, 1)``.
        text_encoders: which SD3 text encoders C-ERG weakens, names from ``("clip_l", "clip_g", "t5")``
            (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``). ``None`` (default): every loaded
            one; which ones the paper weakens for SD3 is not known (docs/guidance.md section 10.3). An encoder
            named here must be loaded.
        ``tau=1`` with ``text_tau`` set gives C-ERG alone (no denoiser edit).
    """

    scale: float | None = None
    tau: float = 0.01
    layers: LayerSpec | None = None
    window: Any = None
    condition: str = "cond"
    queries: str = "image"
    text_tau: float | None = None
    text_depth: tuple[float, float] = (2 / 3, 11 / 12)
    text_encoders: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_weak_scale(self.scale)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or math.isnan(self.tau) \
                or not 0 < self.tau <= 1:
            raise ValueError(f"`tau` must be in (0, 1] (1 = no weakening), got {self.tau!r}.")
        if self.condition not in CONDITIONS:
            raise ValueError(f"ERG `condition` must be one of {CONDITIONS}, got {self.condition!r}.")
        if self.queries not in QUERIES:
            raise ValueError(f"ERG `queries` must be one of {QUERIES}, got {self.queries!r}.")
        if self.layers is not None:
            object.__setattr__(self, "layers", parse_layers(self.layers))
        window_of(self.window)
        if self.text_tau is not None:
            if isinstance(self.text_tau, bool) or not isinstance(self.text_tau, (int, float)) \
                    or math.isnan(self.text_tau) or not 0 < self.text_tau <= 1:
                raise ValueError(f"`text_tau` must be in (0, 1] or None (C-ERG off), got {self.text_tau!r}.")
        if isinstance(self.text_depth, list):
            object.__setattr__(self, "text_depth", tuple(self.text_depth))
        if isinstance(self.text_encoders, list):
            object.__setattr__(self, "text_encoders", tuple(self.text_encoders))
        TextWeakening(self.condition, 1.0, self.text_depth, self.text_encoders)  # validates the depth band, names

    def uses_uncond(self, family: Any, guidance_scale: float) -> bool:
        return self.condition == "uncond"

    def text_conditions(self) -> list[TextWeakening]:
        """C-ERG: the weakened text condition the weak branch is fed (none when ``text_tau`` is None)."""
        if self.text_tau is None:
            return []
        return [TextWeakening(self.condition, float(self.text_tau), self.text_depth, self.text_encoders)]

    def runtime(self, setup: Setup) -> TermRuntime:
        if self.text_tau is not None and not setup.family.text_conditioned:
            raise ValueError(f"ERG `text_tau` (C-ERG) weakens a text encoder; the {setup.family.label} model has none.")
        layers = resolve_layers(self.layers, setup, "erg", "ERG")
        return ERGRuntime(self, window_of(self.window), layers, setup)


class ERGRuntime(WeakGuidanceRuntime):
    def __init__(self, config: ERG, window, layers: tuple[int, ...], setup: Setup) -> None:
        super().__init__(config, window, "erg", f"erg:{format_layers(layers)}", setup)
        self.layers = layers

    def attention_layers(self) -> set[int]:
        return set(self.layers) if self.config.tau != 1 else set()

    def make_branch(self, ctx: StepContext) -> Branch:
        edits = {l: [ScaleQueries(self.config.tau, self.config.queries)] for l in self.attention_layers()}
        texts = self.config.text_conditions()
        return Branch(self.branch_name, texts[0].name if texts else self.config.condition, attention=edits)

    def describe(self) -> dict:
        d = super().describe()
        d["layers"] = format_layers(self.layers)
        if self.config.text_tau is not None:
            d["text_tau"], d["text_depth"] = self.config.text_tau, list(self.config.text_depth)
            d["text_encoders"] = None if self.config.text_encoders is None else list(self.config.text_encoders)
        d["role"] = self.kind
        return d
