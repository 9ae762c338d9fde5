"""Sample-quality metrics on feature vectors (any backbone: the digit classifier, Inception, ...).

Pure numpy / torch, statistics in float64:

- :func:`feature_statistics` and :func:`frechet_distance` (FID-style Fréchet distance between
  Gaussians fitted to two feature sets), with the safeguards of the guided-diffusion (ADM)
  evaluator: when the matrix square root of ``sigma1 @ sigma2`` is not finite, retry with ``eps``
  added to both diagonals; a non-negligible imaginary part (``> 1e-3``) is an error, a negligible
  one is dropped.
- :func:`prdc`: precision, recall, density and coverage (Naeem et al. 2020, "Reliable Fidelity and
  Diversity Metrics for Generative Models"; precision/recall as Kynkäänniemi et al. 2019) with
  k-nearest-neighbour balls. A point inside a ball means ``distance <= radius`` (the ADM evaluator's
  comparison). Distances are computed block by block, never materialising more than
  ``chunk_size x N`` of them.
- :func:`diversity`: mean pairwise Euclidean distance; :func:`classifier_accuracy`.

Distances: both sets are first centred on the real features' mean (distances are unchanged; the
rounding below then scales with the spread, not with a common offset), then computed block by block with
the float64 identity ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b``. Its rounding (up to ~1e-13 of
``|a|^2 + |b|^2``) depends on the block shape, so every decision it could flip is taken on exact
distances instead: the k nearest neighbours' distances and every pair within that error bound of a
ball's radius are recomputed from the coordinate differences. Results are therefore exact for the
``<=`` definition (duplicates at distance 0, points on a ball's surface inside it) and independent of
``chunk_size``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg


def _np64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _t64(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def _features_2d(x, name: str) -> torch.Tensor:
    t = _t64(x)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] array of feature vectors, got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values.")
    return t


# --------------------------------------------------------------------------------------------------
# Fréchet distance


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased, ``N - 1``) of ``[N, D]`` features, float64."""
    f = _features_2d(features, "features").numpy()
    if f.shape[0] < 2:
        raise ValueError("feature_statistics needs at least 2 feature vectors.")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm(m: np.ndarray) -> np.ndarray | None:
    """``scipy.linalg.sqrtm(m)`` (the principal square root, as pytorch-fid and the ADM evaluator take it),
    or None if it is not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "singular matrix": judged by finiteness below
        try:
            root = linalg.sqrtm(m)
        except (np.linalg.LinAlgError, ValueError):
            return None
    return root if np.all(np.isfinite(root)) else None


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2))``, float64.

    ``sqrt(M)`` is ``scipy.linalg.sqrtm(M)``, with the safeguards of pytorch-fid and the ADM evaluator:
    if it is not finite, ``eps`` is added to both covariance diagonals and it is retried (with a
    warning); if its DIAGONAL has an imaginary part (from rounding) larger than ``1e-3`` that is a
    ``ValueError``, otherwise the real part is used.
    """
    mu1, mu2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    sigma1, sigma2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"Mean vectors have different shapes: {mu1.shape} and {mu2.shape}.")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"Covariances must both be [{mu1.shape[0]}, {mu1.shape[0]}], got {sigma1.shape} and {sigma2.shape}.")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if covmean is None:
        warnings.warn(f"Fréchet distance: sqrt(sigma1 sigma2) is singular; adding {eps} to the covariance diagonals.",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise ValueError("Fréchet distance: the covariance product's square root is not finite even with the offset.")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(np.diagonal(covmean).imag))
            raise ValueError(f"Fréchet distance: imaginary component {m:.3g} in the matrix square root.")
        covmean = covmean.real
    tr_covmean = float(np.trace(covmean))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(real_features, fake_features, eps: float = 1e-6) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two ``[N, D]`` feature sets."""
    mu1, s1 = feature_statistics(real_features)
    mu2, s2 = feature_statistics(fake_features)
    return frechet_distance(mu1, s1, mu2, s2, eps=eps)


# --------------------------------------------------------------------------------------------------
# distances, PRDC, diversity


# A bound on the rounding of |a|^2 + |b|^2 - 2 a.b in float64, relative to |a|^2 + |b|^2 (about 2 D eps for
# D <= 4096 features; generous): pairs closer than this to a decision are decided on exact distances.
_DISTANCE_TOLERANCE = 1e-11
_EXACT_PAIRS = 1 << 16  # pairs recomputed per batch (memory: this many feature vectors twice)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=1)


def _sq_distances(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]`` by the float64 Gram identity (clamped at 0)."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _exact_sq_distances(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``|a[rows] - b[cols]|^2`` pair by pair, from the coordinate differences (exact up to one rounding
    per term; 0 for identical vectors), in batches of :data:`_EXACT_PAIRS` pairs."""
    out = torch.empty(rows.numel(), dtype=torch.float64)
    for s in range(0, rows.numel(), _EXACT_PAIRS):
        r, c = rows[s:s + _EXACT_PAIRS], cols[s:s + _EXACT_PAIRS]
        out[s:s + _EXACT_PAIRS] = (a[r] - b[c]).pow_(2).sum(dim=1)
    return out


def _within(d: torch.Tensor, radius: torch.Tensor, bound: torch.Tensor, exact) -> torch.Tensor:
    """``d <= radius`` elementwise for approximate distances ``d`` (error <= ``bound``); the undecided
    entries are decided by ``exact(rows, cols)`` (their exact distances)."""
    inside = d <= radius - bound
    unsure = (d > radius - bound) & (d <= radius + bound)
    if unsure.any():
        rows, cols = unsure.nonzero(as_tuple=True)
        inside[rows, cols] = exact(rows, cols) <= radius.expand_as(d)[rows, cols]
    return inside


def _centred(*sets: torch.Tensor, on: torch.Tensor) -> list[torch.Tensor]:
    centre = on.mean(dim=0, keepdim=True)
    return [x - centre for x in sets]


def knn_radii(features, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest OTHER point of the same set, ``[N]``: exact
    (the candidates' distances are recomputed from differences; duplicates count, at distance 0)."""
    x = _features_2d(features, "features")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} points, got {k}.")
    (x,) = _centred(x, on=x)
    sq = _sq_norms(x)
    radii = torch.empty(n, dtype=torch.float64)
    extra = min(k + 8, n - 1)  # candidates per row: the k nearest and a margin
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d = _sq_distances(x[start:stop], sq[start:stop], x, sq)
        rows = torch.arange(stop - start)
        d[rows, rows + start] = float("inf")  # exclude the point itself (duplicates still count)
        near = d.topk(extra, dim=1, largest=False)
        cand_rows = (rows + start)[:, None].expand(-1, extra)
        exact = _exact_sq_distances(x, x, cand_rows.reshape(-1), near.indices.reshape(-1)).view(-1, extra)
        kth = exact.sort(dim=1).values[:, k - 1]
        # every point within the rounding bound of the k-th candidate must be among the candidates
        bound = _DISTANCE_TOLERANCE * (sq[start:stop] + sq.max())
        safe = (near.values[:, -1] > kth + 2 * bound) | (extra == n - 1)
        for i in (~safe).nonzero(as_tuple=True)[0].tolist():  # rare (many ties): the whole row exactly
            others = torch.cat([torch.arange(start + i), torch.arange(start + i + 1, n)])
            row = _exact_sq_distances(x, x, torch.full_like(others, start + i), others)
            kth[i] = row.kthvalue(k).values
        radii[start:stop] = kth
    return radii


def prdc(real_features, fake_features, k: int = 5, chunk_size: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake_features`` w.r.t. ``real_features``.

    With ``B(x, r)`` the closed ball and ``NND_k`` the distance to the k-th nearest other point of
    the same set:

    - precision = fraction of fake points inside at least one real ball ``B(x_i, NND_k(x_i))``;
    - recall = fraction of real points inside at least one fake ball ``B(y_j, NND_k(y_j))``;
    - density = (1 / (k M)) * sum over fake points of the number of real balls containing them;
    - coverage = fraction of real points whose own ball contains at least one fake point.

    Exact for these ``<=`` definitions and independent of ``chunk_size`` (module docstring). Memory:
    blocks of ``chunk_size x N`` distances. ``k = 5`` is the ``prdc`` package's default; the ADM
    evaluator's precision/recall use ``k = 3``.
    """
    real = _features_2d(real_features, "real_features")
    fake = _features_2d(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"Feature dimensions differ: {real.shape[1]} (real) and {fake.shape[1]} (fake).")
    n, m = real.shape[0], fake.shape[0]
    real_radii = knn_radii(real, k, chunk_size)
    fake_radii = knn_radii(fake, k, chunk_size)
    real, fake = _centred(real, fake, on=real)
    real_sq, fake_sq = _sq_norms(real), _sq_norms(fake)

    in_real_balls = torch.zeros(m, dtype=torch.int64)     # per fake: how many real balls contain it
    real_in_fake_ball = torch.zeros(n, dtype=torch.bool)  # per real: inside some fake ball
    real_ball_hit = torch.zeros(n, dtype=torch.bool)      # per real: its ball contains some fake
    for start in range(0, m, chunk_size):
        stop = min(start + chunk_size, m)
        d = _sq_distances(fake[start:stop], fake_sq[start:stop], real, real_sq)  # [c, n]
        bound = _DISTANCE_TOLERANCE * (fake_sq[start:stop, None] + real_sq[None, :])

        def exact(rows, cols, start=start):
            return _exact_sq_distances(fake, real, rows + start, cols)

        fake_in_real = _within(d, real_radii[None, :], bound, exact)
        in_real_balls[start:stop] = fake_in_real.sum(dim=1)
        real_ball_hit |= fake_in_real.any(dim=0)
        real_in_fake_ball |= _within(d, fake_radii[start:stop, None], bound, exact).any(dim=0)
    return {
        "precision": float((in_real_balls > 0).double().mean()),
        "recall": float(real_in_fake_ball.double().mean()),
        "density": float(in_real_balls.double().sum() / (k * m)),
        "coverage": float(real_ball_hit.double().mean()),
    }


def diversity(features, chunk_size: int = 1024) -> float:
    """Mean Euclidean distance over all pairs ``i < j`` of ``[N, D]`` features (float64)."""
    x = _features_2d(features, "features")
    n = x.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least 2 feature vectors.")
    (x,) = _centred(x, on=x)
    sq = _sq_norms(x)
    total = 0.0
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d = _sq_distances(x[start:stop], sq[start:stop], x, sq).sqrt_()
        cols = torch.arange(n)[None, :]
        rows = torch.arange(start, stop)[:, None]
        total += float(d[cols > rows].sum())
    return total / (n * (n - 1) / 2)


def classifier_accuracy(predictions, targets) -> float:
    """Fraction of samples whose predicted class equals the target.

    ``predictions``: class ids ``[N]`` or scores/logits ``[N, C]`` (argmax taken); ``targets``: ``[N]``.
    """
    p = torch.as_tensor(np.asarray(predictions) if not isinstance(predictions, torch.Tensor) else predictions)
    t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets).reshape(-1)
    if p.dim() == 2:
        if p.shape[1] < 2:
            raise ValueError(f"predictions of shape {tuple(p.shape)} are ambiguous: give class ids as [N] or "
                             "scores as [N, C] with C >= 2.")
        p = p.argmax(dim=1)
    p = p.reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"{p.numel()} predictions for {t.numel()} targets.")
    if p.numel() == 0:
        raise ValueError("classifier_accuracy of an empty set.")
    return float((p.cpu().long() == t.cpu().long()).double().mean())


__all__ = [
    "classifier_accuracy",
    "diversity",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "knn_radii",
    "prdc",
]
