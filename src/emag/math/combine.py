"""How the branch predictions are combined into the guided prediction (docs/method.md section 5).

Symbols: ``u``, ``c`` are the unconditional / conditional predictions of the normal pass, ``u_e``,
``c_e`` the same from the perturbed (EMAG) pass, ``w`` the CFG scale, ``w_e`` the EMAG scale.

Each combination is evaluated as the reference writes it (docs/method.md section 5): in float16 a different but
algebraically equal spelling moves SD3 outputs by ~1e-3 relative over a run. The neutral EMAG scale is
special-cased so that it reproduces plain CFG bit for bit (the reference's ``c_e + 1 (c - c_e)`` equals
``c`` only up to rounding).
"""

from __future__ import annotations

from torch import Tensor


def cfg(pred_uncond: Tensor, pred_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``u + w (c - u)`` (Ho & Salimans 2022, Imagen convention)."""
    return pred_uncond + scale * (pred_cond - pred_uncond)


def emag_only(pred_cond: Tensor, pred_cond_emag: Tensor, emag_scale: float) -> Tensor:
    """EMAG without CFG, ``c' = c_e + w_e (c - c_e)`` (paper Eq. 14), evaluated in that order; ``w_e = 1``
    gives ``c`` itself."""
    if emag_scale == 1.0:
        return pred_cond
    return pred_cond_emag + emag_scale * (pred_cond - pred_cond_emag)


def emag_nested(
    pred_uncond: Tensor | None,
    pred_cond: Tensor,
    pred_cond_emag: Tensor,
    cfg_scale: float,
    emag_scale: float,
) -> Tensor:
    """The paper's EMAG + CFG (Eqs. 14-15): ``c' = c_e + w_e (c - c_e)``, then ``u + w (c' - u)``.

    Equals ``u + w (c - u) + w (w_e - 1)(c - c_e)``: ``w_e = 1`` is plain CFG, and EMAG's strength
    scales with ``w``. Without an unconditional prediction (CFG off) it returns ``c'``.
    """
    guided_cond = emag_only(pred_cond, pred_cond_emag, emag_scale)
    if pred_uncond is None:
        return guided_cond
    return cfg(pred_uncond, guided_cond, cfg_scale)


def emag_additive(
    pred_uncond: Tensor,
    pred_cond: Tensor,
    pred_uncond_emag: Tensor,
    cfg_scale: float,
    emag_scale: float,
) -> Tensor:
    """The reference's additive "CFG" mode: ``u + w (c - u) + w_e (c - u_e)``.

    Note that it uses the PERTURBED UNCONDITIONAL prediction ``u_e`` (docs/method.md section 5.2); outside
    the replacement window ``u_e = u`` and it reduces to ``u + (w + w_e)(c - u)``.
    """
    return cfg(pred_uncond, pred_cond, cfg_scale) + emag_scale * (pred_cond - pred_uncond_emag)


def merge_guided_channels(guided: Tensor, base: Tensor, num_channels: int) -> Tensor:
    """Take the first ``num_channels`` channels from ``guided`` and the rest from ``base``.

    The original DiT repository guides only 3 of the 4 latent noise channels "for exact
    reproducibility"; channel 4 and the learned-variance channels come from the conditional
    prediction. ``base`` must have at least as many channels as ``guided``.
    """
    out = base.clone()
    out[:, :num_channels] = guided[:, :num_channels]
    return out
