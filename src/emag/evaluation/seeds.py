"""One seed per evaluation sample, derived from the run's global seed and the sample's index.

``sample_seed(seed, i)`` is SplitMix64's output function applied to ``seed`` and ``i`` (docs/eval.md
section 2): a fixed, well-mixed 63-bit integer, so that no two samples of a run, nor sample ``i`` of seed
``s`` and sample ``j`` of seed ``s + 1``, share a noise stream. Every sample draws all its noise (the
initial latent and, with an ancestral sampler, every step's noise) from its own generator, so its noise
does not depend on the batch it runs in, on the number of processes or on an interruption.
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a run with global ``seed``: in ``[0, 2**63)``."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}.")
    return _splitmix64(_splitmix64(seed & _MASK) ^ index) >> 1


def sample_generators(seed: int, indices, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample index, each seeded with :func:`sample_seed` (CPU generators by default:
    the noise is then the same on any device)."""
    return [torch.Generator(device=device).manual_seed(sample_seed(seed, int(i))) for i in indices]
