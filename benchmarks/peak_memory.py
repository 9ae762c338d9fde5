"""Peak memory of guidance methods at REAL model sizes, measured without running the compute.

Each method runs once, end to end through the pipeline, on the ``meta`` device (shapes, no values) under
:class:`live_memory.LiveTensorBytes`, which counts every tensor the call allocates: the peak is the
analogue of ``torch.cuda.max_memory_allocated`` for the transformer (weights + activations + guidance
state), with fused attention modelled as a flash kernel (output only). No GPU and no download needed;
SD3-Medium at 1024 px takes ~20 s per method on a laptop CPU.

    python benchmarks/peak_memory.py                               # SD3-Medium 1024 px b1/b4, DiT-XL/2 256/512
    python benchmarks/peak_memory.py --case cpu-small --device cpu # the same count with real compute

What a meta run cannot know: values. Data-dependent choices take their first option (EMAG chooses the
lowest candidate block: the longest perturbed suffix, the worst case for time and memory); the
scheduler's timesteps stay real (on the CPU). Not counted: the CUDA caching allocator's rounding and
fragmentation, cuBLAS / attention-kernel workspaces, text encoders and VAE (transformer only, as in
``speed.py``). ``--device cpu`` runs the same count with real compute (small sizes): on the tiny test
models the meta count equals the CPU count exactly (tests/test_live_memory.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from live_memory import FlashAttentionModel, LiveTensorBytes  # noqa: E402
from speed import BlockRows, build, ema_state_mib  # noqa: E402

GiB = 2**30
CASES = {  # name: (size, batch)
    "sd3-medium-1024-b1": ("sd3-medium", 1),
    "sd3-medium-1024-b4": ("sd3-medium", 4),
    "dit-xl-2-256-b1": ("dit-xl-2-256", 1),
    "dit-xl-2-512-b1": ("dit-xl-2-512", 1),
    "cpu-small": ("cpu-small", 1),
    "cpu-small-dit": ("cpu-small-dit", 1),
}


def methods(family: str, n_blocks: int) -> dict:
    """The published settings (presets) at real sizes; scaled-down candidates for the small models."""
    from dataclasses import replace

    import emag
    from emag.guidance.seg import SEG

    if family == "sd3":
        full = emag.EMAG.preset("sd3-medium")
        q = emag.EMAG.preset("sd3-medium-q")
        w, mid = 7.0, n_blocks // 4
    else:
        full = emag.EMAG.preset("dit-xl-2")
        q = emag.EMAG.preset("dit-xl-2", variant="q")
        w, mid = 1.5, n_blocks // 2
    if n_blocks < 24:  # the small models: the candidates of speed.py
        layers = (mid, mid + 1, mid + 2) if family == "sd3" else (mid - 2, mid - 1, mid, mid + 1)
        full, q = replace(full, layers=layers), replace(q, layers=layers)
    table = {
        "cfg": dict(guidance=[emag.CFG(w)]),
        "emag-full": dict(guidance=[emag.CFG(w), replace(full, ema_storage="dense")]),
        "emag-full-factored": dict(guidance=[emag.CFG(w), replace(full, ema_storage="factored")]),
        "emag-q": dict(guidance=[emag.CFG(w), q]),
        "emag-full-straightforward": dict(guidance=[emag.CFG(w), replace(full, ema_storage="dense")], fast=False),
        "pag": dict(guidance=[emag.CFG(w), emag.PAG(3.0, layers=[mid])]),
        "seg": dict(guidance=[emag.CFG(w), SEG(scale=3.0, layers=[mid])]),
    }
    if family == "sd3":
        table["emag-full-joined"] = dict(guidance=[emag.CFG(w), replace(full, ema_storage="dense")], batching="all")
    else:  # opt-in, NOT the reference's numerics: the DiT EMA in float16 instead of float32
        table["emag-full-fp16-ema"] = dict(guidance=[emag.CFG(w), replace(full, ema_storage="dense",
                                                                         ema_dtype=torch.float16)])
    return table


def inputs_for(family: str, pipe, hw: int, tokens: int, batch: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    if family == "sd3":
        c = pipe.transformer.config
        x = dict(prompt_embeds=torch.randn(batch, tokens, c.joint_attention_dim, generator=g),
                 negative_prompt_embeds=torch.randn(batch, tokens, c.joint_attention_dim, generator=g),
                 pooled_prompt_embeds=torch.randn(batch, c.pooled_projection_dim, generator=g),
                 negative_pooled_prompt_embeds=torch.randn(batch, c.pooled_projection_dim, generator=g),
                 latents=torch.randn(batch, 16, hw, hw, generator=g), height=hw * 8, width=hw * 8)
    else:
        x = dict(class_labels=list(range(batch)), latents=torch.randn(batch, 4, hw, hw, generator=g))
    return {k: (v.to(device, dtype) if torch.is_tensor(v) else v) for k, v in x.items()}


def keep_timesteps_on_cpu(scheduler) -> None:
    """On ``meta`` the schedule must keep its values: the scheduler's tensors stay on the CPU."""
    original = scheduler.set_timesteps

    @functools.wraps(original)  # keeps the signature: pipelines inspect it for `sigmas` / `timesteps`
    def set_timesteps(*args, **kwargs):
        kwargs["device"] = "cpu"
        return original(*args, **kwargs)

    scheduler.set_timesteps = set_timesteps


def measure(pipe, inputs: dict, steps: int, kw: dict, device: str) -> dict:
    counter = BlockRows(pipe.transformer)
    try:
        with torch.no_grad(), FlashAttentionModel(), LiveTensorBytes(device) as mem:
            pipe(**inputs, num_inference_steps=steps, output_type="latent", **kw)
    finally:
        for h in counter.handles:
            h.remove()
    return dict(peak_bytes=mem.peak, block_rows=counter.count, ema_state_mib=ema_state_mib(pipe))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs="+", choices=sorted(CASES),
                    default=["sd3-medium-1024-b1", "sd3-medium-1024-b4", "dit-xl-2-256-b1", "dit-xl-2-512-b1"])
    ap.add_argument("--device", choices=["meta", "cpu"], default="meta")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--only", nargs="*", default=None, help="subset of method names")
    ap.add_argument("--steps", type=int, default=None, help="default: 28 (SD3) / 250 (DiT), the presets'")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows, built = [], {}
    for case in args.case:
        size, batch = CASES[case]
        if size not in built:
            built = {size: build(size, args.device, dtype, None)}  # one model alive at a time
        family, pipe, hw, tokens = built[size]
        if args.device == "meta":
            keep_timesteps_on_cpu(pipe.scheduler)
        weights = sum(t.numel() * t.element_size() for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()])
        n_blocks = len(pipe.transformer.transformer_blocks)
        steps = args.steps or (28 if family == "sd3" else 250)
        table = methods(family, n_blocks)
        if args.only:
            table = {k: v for k, v in table.items() if k in args.only}
        inputs = inputs_for(family, pipe, hw, tokens, batch, args.device, dtype)
        results = {}
        for name, kw in table.items():
            t0 = time.perf_counter()
            results[name] = measure(pipe, inputs, steps, kw, args.device)
            results[name]["seconds"] = time.perf_counter() - t0
        cfg = results.get("cfg")
        for name, r in results.items():
            total = weights + r["peak_bytes"]
            rows.append(dict(case=case, size=size, batch=batch, steps=steps, method=name, weights_gib=weights / GiB,
                             peak_gib=total / GiB, above_weights_gib=r["peak_bytes"] / GiB,
                             ratio_to_cfg=(total / (weights + cfg["peak_bytes"])) if cfg else None,
                             block_rows_ratio=(r["block_rows"] / cfg["block_rows"]) if cfg else None,
                             ema_state_gib=None if r["ema_state_mib"] is None else r["ema_state_mib"] / 1024))
    print(f"# peak tensor memory, transformer only, {args.dtype} on {args.device} "
          f"({'no compute: shapes only' if args.device == 'meta' else 'real compute'}); torch {torch.__version__}")
    print("| case | steps | method | peak GiB (weights + tensors) | x CFG | above weights GiB | EMA state GiB | block-rows x CFG |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = "-" if r["ratio_to_cfg"] is None else f"{r['ratio_to_cfg']:.2f}"
        work = "-" if r["block_rows_ratio"] is None else f"{r['block_rows_ratio']:.3f}"
        state = "-" if r["ema_state_gib"] is None else f"{r['ema_state_gib']:.3f}"
        print(f"| {r['case']} | {r['steps']} | {r['method']} | {r['peak_gib']:.3f} | {ratio} | "
              f"{r['above_weights_gib']:.3f} | {state} | {work} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
