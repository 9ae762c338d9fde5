"""How many CPU threads a generation run uses.

On a small model every operation is tiny, so torch's intra-op threads gain little and wait for each
other whenever another process keeps a core busy. Measured on 2 cores (benchmarks/cpu_threads.py,
benchmarks/results/cpu_threads.txt), the bundled digits job took 35 s with one thread and 39 s with
torch's default two when the machine was idle, 37 s against 113 s beside one busy process, and 56 s
against 34 minutes beside two. So a run whose per-sample work (transformer parameters x image tokens)
is below :data:`SMALL_WORK` uses one thread; larger models (where two threads were 1.2-1.6x faster on
an idle machine), GPUs, an explicit ``--threads`` and a user's ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``
keep what they ask for.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

# Below this many (transformer parameters x image tokens per sample) a run uses one CPU thread: the
# digits model is 0.8 M x 64 = 5e7; a 3.8 M-parameter DiT at 64 tokens (2.5e8) already ran 1.18x faster
# on two idle cores, DiT-XL/2 at 256 px is 675 M x 256.
SMALL_WORK = 2e8
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def transformer_parameters(folder: Path) -> int | None:
    """The number of parameters of ``folder/transformer`` from its safetensors headers (no tensor is
    read), or None when its weights are not safetensors."""
    files = sorted((Path(folder) / "transformer").glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total


def choose_threads(device: str, requested: int | None, parameters: int | None,
                   tokens: int | None) -> tuple[int | None, str]:
    """``(threads, why)``: the torch intra-op thread count for a run (None: leave torch's) and the reason,
    for the run's header line. ``parameters``: the transformer's; ``tokens``: image tokens per sample."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--threads (threads) must be an integer >= 1, got {requested!r}.")
        return requested, f"{requested} CPU thread(s), as asked (--threads)"
    if torch.device(device).type != "cpu":
        return None, ""
    for var in THREAD_ENV:
        if os.environ.get(var):
            return None, f"{torch.get_num_threads()} CPU thread(s) ({var}={os.environ[var]})"
    if parameters is not None and tokens is not None and parameters * tokens < SMALL_WORK:
        return 1, (f"1 CPU thread: small model ({parameters / 1e6:.1f} M parameters, {tokens} image tokens), where "
                   "more threads gain little and slow down badly when another process uses the CPU; --threads N "
                   "to change")
    return None, f"{torch.get_num_threads()} CPU thread(s) (torch's default; --threads N to change)"


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (None: leave the setting), restored afterwards."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
