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

Distances use the float64 identity ``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b`` (clamped at 0): exact for
integer-valued features, otherwise within float64 rounding (~1e-15 relative), which only matters
for points lying exactly on a ball's surface.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch



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


def _sqrt_eigenvalues(m: np.ndarray) -> np.ndarray | None:
    """Principal square roots of the eigenvalues of ``m`` (complex), or None if not finite."""
    try:
        eig = np.linalg.eigvals(m)
    except np.linalg.LinAlgError:
        return None
    roots = np.sqrt(eig.astype(np.complex128))
    return roots if np.all(np.isfinite(roots)) else None


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2))``, float64.

    ``tr(sqrt(M))`` is the sum of the principal square roots of the eigenvalues of ``M`` (the trace
    of the principal matrix square root ``scipy.linalg.sqrtm(M)`` without forming it). Safeguards
    as the ADM evaluator: if the result is not finite, ``eps`` is added to both covariance diagonals
    and the computation is retried (with a warning); imaginary parts (from rounding, the exact
    eigenvalues are real and >= 0) larger than ``1e-3`` raise ``ValueError``, smaller ones are
    dropped.
    """
    mu1, mu2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    sigma1, sigma2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"Mean vectors have different shapes: {mu1.shape} and {mu2.shape}.")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"Covariances must both be [{mu1.shape[0]}, {mu1.shape[0]}], got {sigma1.shape} and {sigma2.shape}.")
    diff = mu1 - mu2
    roots = _sqrt_eigenvalues(sigma1 @ sigma2)
    if roots is None:
        warnings.warn(f"Fréchet distance: sqrt(sigma1 sigma2) is singular; adding {eps} to the covariance diagonals.",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        roots = _sqrt_eigenvalues((sigma1 + offset) @ (sigma2 + offset))
        if roots is None:
            raise ValueError("Fréchet distance: the covariance product has non-finite eigenvalues even with the offset.")
    if not np.allclose(roots.imag, 0, atol=1e-3):
        raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(roots.imag)):.3g} in the matrix square root.")
    tr_covmean = float(np.sum(roots.real))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance_from_features(real_features, fake_features, eps: float = 1e-6) -> float:
    """:func:`frechet_distance` between the Gaussians fitted to two ``[N, D]`` feature sets."""
    mu1, s1 = feature_statistics(real_features)
    mu2, s2 = feature_statistics(fake_features)
    return frechet_distance(mu1, s1, mu2, s2, eps=eps)


# --------------------------------------------------------------------------------------------------
# distances, PRDC, diversity


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(dim=1)


def _sq_distances(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[len(a), len(b)]`` (float64, clamped at 0)."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def knn_radii(features, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest OTHER point of the same set, ``[N]``."""
    x = _features_2d(features, "features")
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} points, got {k}.")
    sq = _sq_norms(x)
    radii = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d = _sq_distances(x[start:stop], sq[start:stop], x, sq)
        rows = torch.arange(stop - start)
        d[rows, rows + start] = float("inf")  # exclude the point itself (duplicates still count)
        radii[start:stop] = d.topk(k, dim=1, largest=False).values[:, k - 1]
    return radii


def prdc(real_features, fake_features, k: int = 5, chunk_size: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake_features`` w.r.t. ``real_features``.

    With ``B(x, r)`` the closed ball and ``NND_k`` the distance to the k-th nearest other point of
    the same set:

    - precision = fraction of fake points inside at least one real ball ``B(x_i, NND_k(x_i))``;
    - recall = fraction of real points inside at least one fake ball ``B(y_j, NND_k(y_j))``;
    - density = (1 / (k M)) * sum over fake points of the number of real balls containing them;
    - coverage = fraction of real points whose own ball contains at least one fake point.

    Memory: blocks of ``chunk_size x N`` distances.
    """
    real = _features_2d(real_features, "real_features")
    fake = _features_2d(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"Feature dimensions differ: {real.shape[1]} (real) and {fake.shape[1]} (fake).")
    n, m = real.shape[0], fake.shape[0]
    real_radii = knn_radii(real, k, chunk_size)
    fake_radii = knn_radii(fake, k, chunk_size)
    real_sq, fake_sq = _sq_norms(real), _sq_norms(fake)

    in_real_balls = torch.zeros(m, dtype=torch.int64)     # per fake: how many real balls contain it
    real_in_fake_ball = torch.zeros(n, dtype=torch.bool)  # per real: inside some fake ball
    nearest_fake = torch.full((n,), float("inf"), dtype=torch.float64)  # per real: closest fake
    for start in range(0, m, chunk_size):
        stop = min(start + chunk_size, m)
        d = _sq_distances(fake[start:stop], fake_sq[start:stop], real, real_sq)  # [c, n]
        in_real_balls[start:stop] = (d <= real_radii[None, :]).sum(dim=1)
        real_in_fake_ball |= (d <= fake_radii[start:stop, None]).any(dim=0)
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
    return {
        "precision": float((in_real_balls > 0).double().mean()),
        "recall": float(real_in_fake_ball.double().mean()),
        "density": float(in_real_balls.double().sum() / (k * m)),
        "coverage": float((nearest_fake <= real_radii).double().mean()),
    }


def diversity(features, chunk_size: int = 1024) -> float:
    """Mean Euclidean distance over all pairs ``i < j`` of ``[N, D]`` features (float64)."""
    x = _features_2d(features, "features")
    n = x.shape[0]
    if n < 2:
        raise ValueError("diversity needs at least 2 feature vectors.")
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
