"""Where EMAG's time goes beyond its block work: framework overhead and per-operator time, side by side.

Two measurements, each in one run:

- ``--part overhead`` (default): a model with speed.py's SD3 layout (12 blocks) but so narrow that its
  arithmetic is negligible, so the time of a 28-step call IS the Python and dispatch overhead. Prints per
  method the median call time and the time spent in this package's own functions (cProfile tottime of
  ``src/emag``; profiled, so inflated ~2x), the rest being diffusers' and torch's.
- ``--part ops``: ``speed.py``'s ``cpu-small`` model under ``torch.profiler``; prints each operator's
  self CPU time for CFG, EMAG full and EMAG-Q (median of ``--repeats`` profiled calls) and the extra over
  CFG: the matrix products of the extra rows, the explicit attention maps, the EMA update and score.

    python benchmarks/overhead.py --part overhead
    python benchmarks/overhead.py --part ops --repeats 3

Run it with another checkout on ``PYTHONPATH`` to compare two versions of the package on one machine.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed  # noqa: E402

speed.SIZES["micro"] = ("sd3", dict(num_layers=12, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                    caption_projection_dim=16, pooled_projection_dim=8, in_channels=16, out_channels=16,
                                    sample_size=8, patch_size=2, pos_embed_max_size=8), 8, 4)
METHODS = ["cfg", "emag-full", "emag-q", "emag-full-joined", "pag"]


def setup(size: str):
    warnings.filterwarnings("ignore")
    family, pipe, hw, tokens = speed.build(size, "cpu", torch.float32, None)
    g = torch.Generator().manual_seed(0)
    cfg = pipe.transformer.config
    inputs = dict(prompt_embeds=torch.randn(1, tokens, cfg.joint_attention_dim, generator=g),
                  negative_prompt_embeds=torch.randn(1, tokens, cfg.joint_attention_dim, generator=g),
                  pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  latents=torch.randn(1, 16, hw, hw, generator=g), height=hw * 8, width=hw * 8)
    table = speed.methods(family, len(pipe.transformer.transformer_blocks))

    def call(name):
        with torch.no_grad():
            return pipe(**inputs, num_inference_steps=28, output_type="latent", **table[name])

    return call


def overhead(repeats: int) -> None:
    torch.set_num_threads(1)
    call = setup("micro")
    times = {n: [] for n in METHODS}
    for rep in range(repeats + 2):  # two untimed warm-up rounds, then interleaved rounds
        for n in METHODS:
            t = time.perf_counter()
            call(n)
            if rep >= 2:
                times[n].append(time.perf_counter() - t)
    print("| method | ms/call (median) | x CFG | emag's own Python, profiled ms/call |")
    print("|---|---|---|---|")
    for n in METHODS:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            call(n)
        prof.disable()
        own = sum(v[2] for k, v in pstats.Stats(prof).stats.items() if f"{os.sep}emag{os.sep}" in k[0]) / 3
        med = statistics.median(times[n])
        print(f"| {n} | {med * 1000:.1f} | {med / statistics.median(times['cfg']):.2f} | {own * 1000:.1f} |")


def ops(repeats: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    call = setup("cpu-small")
    names = ["cfg", "emag-full", "emag-q"]
    seen: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for n in names:
        call(n)  # warm-up
    for _ in range(repeats):
        for n in names:
            with profile(activities=[ProfilerActivity.CPU]) as p:
                call(n)
            seen[n].append({e.key: e.self_cpu_time_total / 1e6 for e in p.key_averages()})
    keys = set().union(*(d for v in seen.values() for d in v))

    def med(n, k):
        return statistics.median(d.get(k, 0.0) for d in seen[n])

    total = {n: sum(med(n, k) for k in keys) for n in names}
    print("| operator | CFG s | EMAG full s | EMAG-Q s | full - CFG | Q - CFG |")
    print("|---|---|---|---|---|---|")
    for k in sorted(keys, key=lambda k: -(med("emag-full", k) - med("cfg", k)))[:15]:
        print(f"| {k} | {med('cfg', k):.3f} | {med('emag-full', k):.3f} | {med('emag-q', k):.3f} | "
              f"{med('emag-full', k) - med('cfg', k):+.3f} | {med('emag-q', k) - med('cfg', k):+.3f} |")
    print(f"| all operators | {total['cfg']:.3f} | {total['emag-full']:.3f} | {total['emag-q']:.3f} | "
          f"{total['emag-full'] - total['cfg']:+.3f} | {total['emag-q'] - total['cfg']:+.3f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["overhead", "ops"], default="overhead")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    import emag

    print(f"# {args.part}: emag from {os.path.dirname(emag.__file__)}, torch {torch.__version__}, "
          f"{torch.get_num_threads() if args.part == 'ops' else 1} threads")
    (overhead if args.part == "overhead" else ops)(args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
