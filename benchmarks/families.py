"""Work and peak memory of the guidance methods on every model family, at the REAL model sizes.

For SD3.5 Medium / Large, FLUX.1-dev, PixArt-Σ, Sana 1600M and Wan2.1-T2V-1.3B (configurations as on
the hub, random weights), each method runs once end to end through this package's pipeline of the
family. On the ``meta`` device (default; no GPU and no download) nothing is computed: the counts are the
peak tensor memory (weights + everything the call allocates, fused attention modelled as a flash
kernel; see ``live_memory.py``) and the work, batch rows x transformer blocks executed relative to the
family's baseline (CFG; FLUX.1-dev, guidance-distilled: the conditional pass alone). On CUDA the same
table adds seconds per image (median of ``--repeats``), as one interleaved run per family.

    python benchmarks/families.py                                   # meta, every family (~10 min, 1 core)
    python benchmarks/families.py --family flux-dev --device cuda --dtype bfloat16 --repeats 2

On meta, values do not exist: EMAG's data-dependent choice takes the lowest candidate block (the
longest perturbed suffix: the worst case for time and memory), and ``ema_storage="auto"`` compares the
dense maps with half of the host's free memory (the GPU's on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from live_memory import FlashAttentionModel, LiveTensorBytes  # noqa: E402
from peak_memory import keep_timesteps_on_cpu  # noqa: E402

GiB = 2**30
# name: (transformer class, config, pipeline class, preset, latent shape per sample, text tokens x width,
#        extra call arguments)
MODELS = {
    "sd35-medium": ("SD3Transformer2DModel", dict(
        num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
        caption_projection_dim=1536, pooled_projection_dim=2048, in_channels=16, out_channels=16, sample_size=128,
        patch_size=2, pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
        "StableDiffusion3EMAGPipeline", "sd35-medium", (16, 128, 128), (333, 4096), {}),
    "sd35-large": ("SD3Transformer2DModel", dict(
        num_layers=38, attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
        caption_projection_dim=2432, pooled_projection_dim=2048, in_channels=16, out_channels=16, sample_size=128,
        patch_size=2, pos_embed_max_size=192, qk_norm="rms_norm"),
        "StableDiffusion3EMAGPipeline", "sd35-large", (16, 128, 128), (333, 4096), {}),
    "flux-dev": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)),
        "FluxEMAGPipeline", "flux-dev", (16, 128, 128), (512, 4096), {}),
    "pixart-sigma": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2, interpolation_scale=2,
        use_additional_conditions=False),
        "PixArtSigmaEMAGPipeline", "pixart-sigma", (4, 128, 128), (300, 4096), {"use_resolution_binning": False}),
    "sana-1600m": ("SanaTransformer2DModel", dict(
        in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
        num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
        mlp_ratio=2.5, sample_size=32, patch_size=1),
        "SanaEMAGPipeline", "sana-1600m", (32, 32, 32), (300, 2304), {"use_resolution_binning": False}),
    "wan2.1-1.3b": ("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads"),
        "WanEMAGPipeline", "wan2.1-1.3b", (16, 21, 60, 104), (512, 4096), {}),
}


def build(name: str, device: str, dtype: torch.dtype):
    import diffusers

    import emag

    cls_name, config, pipe_name, _, _, _, _ = MODELS[name]
    torch.manual_seed(0)
    with torch.device(device):
        tr = getattr(diffusers, cls_name)(**config)
    tr = tr.to(device=device, dtype=dtype).eval()
    if device != "meta":
        with torch.no_grad():  # zero-initialised output / modulation layers would make every block trivial
            for p in tr.parameters():
                if p.dim() >= 2 and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
    pipe_cls = getattr(emag, pipe_name)
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=name == "flux-dev")
    if name.startswith("pixart"):
        scheduler = diffusers.DPMSolverMultistepScheduler()
    elif name.startswith("sana"):
        scheduler = diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                          flow_shift=3.0)
    elif name.startswith("wan"):
        scheduler = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=3.0)
    else:
        scheduler = flow
    components = {k: None for k in pipe_cls._get_signature_keys(pipe_cls)[0]}
    components.update(transformer=tr, scheduler=scheduler)
    pipe = pipe_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs_for(name: str, pipe, batch: int, device: str, dtype: torch.dtype) -> dict:
    _, _, _, _, latent, (tokens, width), extra = MODELS[name]
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    x = randn(batch, *latent)
    if name == "flux-dev":  # packed latents
        c, h, w = latent
        x = x.view(batch, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, (h // 2) * (w // 2), c * 4)
        return dict(prompt_embeds=randn(batch, tokens, width), pooled_prompt_embeds=randn(batch, 768), latents=x,
                    height=1024, width=1024)  # distilled: no negative prompt, no unconditional branch
    if name.startswith("sd35"):
        return dict(prompt_embeds=randn(batch, tokens, width), negative_prompt_embeds=randn(batch, tokens, width),
                    pooled_prompt_embeds=randn(batch, 2048), negative_pooled_prompt_embeds=randn(batch, 2048),
                    latents=x, height=1024, width=1024)
    if name.startswith("wan"):
        return dict(prompt_embeds=randn(batch, tokens, width), negative_prompt_embeds=randn(batch, tokens, width),
                    latents=x, height=480, width=832, num_frames=81)
    mask = torch.ones(batch, tokens, dtype=torch.long, device=device)
    return dict(prompt_embeds=randn(batch, tokens, width), prompt_attention_mask=mask,
                negative_prompt_embeds=randn(batch, tokens, width), negative_prompt_attention_mask=mask,
                negative_prompt=None, latents=x, height=1024, width=1024, **extra)


def methods(name: str, pipe) -> dict:
    """The family's preset EMAG (and its Q variant), PAG and SEG on its default blocks, beside the
    baseline (CFG at the preset's scale; the conditional pass alone for guidance-distilled Flux)."""
    from dataclasses import replace

    import emag

    preset = emag.EMAG.preset(MODELS[name][3])
    family = pipe.family
    w = emag.guidance.emag.config.get_preset(MODELS[name][3]).guidance_scale
    base = [] if family.distilled_guidance else [emag.CFG(w)]
    table = {"baseline": dict(guidance=base) if base else dict(guidance=[emag.PAG(0.0)])}
    if preset.variant == "full":
        table["emag-full"] = dict(guidance=[*base, preset])
    table["emag-q"] = dict(guidance=[*base, replace(preset, variant="q")])
    if "pag" not in family.undefined_methods:
        table["pag"] = dict(guidance=[*base, emag.PAG(3.0)])
    table["seg"] = dict(guidance=[*base, emag.SEG(3.0)])
    return table


class BlockRows:
    """Batch rows x transformer blocks executed (every block list of the family)."""

    def __init__(self, pipe):
        self.count = 0
        self.handles = [b.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for b in pipe.family.blocks(pipe.transformer)]

    def _hook(self, module, args, kwargs):
        self.count += int(kwargs.get("hidden_states", args[0] if args else None).shape[0])

    def remove(self):
        for h in self.handles:
            h.remove()


def ema_state_gib(pipe) -> float | None:
    for r in getattr(pipe, "guidance_runtimes", None) or []:
        if r.name == "emag":
            return r.state.nbytes / GiB
    return None


def run(pipe, inputs: dict, steps: int, kw: dict, device: str) -> dict:
    counter = BlockRows(pipe)
    cuda = device.startswith("cuda")
    try:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        mem = LiveTensorBytes(device) if not cuda else None
        with torch.no_grad(), FlashAttentionModel() if not cuda else _null(), mem or _null():
            t0 = time.perf_counter()
            pipe(**inputs, num_inference_steps=steps, output_type="latent", **kw)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
    finally:
        counter.remove()
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else mem.peak
    storage = next((r.state.storage for r in pipe.guidance_runtimes or [] if r.name == "emag"), None)
    return dict(peak_bytes=peak, block_rows=counter.count, ema_state_gib=ema_state_gib(pipe), storage=storage,
                seconds=seconds)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    ap.add_argument("--device", default="meta")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's")
    ap.add_argument("--repeats", type=int, default=1, help="CUDA: timed runs per method after one warm-up")
    ap.add_argument("--only", nargs="*", default=None, help="subset of method names")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import emag

    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    rows = []
    where = "no compute: shapes only" if args.device == "meta" else "real compute, random weights"
    gpu = f"; {torch.cuda.get_device_name()}" if cuda else ""
    print(f"# transformer only, {args.dtype} on {args.device} ({where}); torch {torch.__version__}{gpu}")
    print("# baseline: CFG at the preset's scale; flux-dev (guidance-distilled): the conditional pass alone")
    print("| family | steps | method | peak GiB | x baseline | EMA storage | EMA GiB | block-rows x baseline |"
          + (" s / image | time x baseline |" if cuda else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if cuda else ""), flush=True)
    for name in args.family:  # one family at a time; its rows are printed as soon as they are done
        pipe = build(name, args.device, dtype)
        if args.device == "meta":
            keep_timesteps_on_cpu(pipe.scheduler)
        weights = sum(t.numel() * t.element_size() for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()])
        steps = args.steps or emag.guidance.emag.config.get_preset(MODELS[name][3]).num_inference_steps
        table = methods(name, pipe)
        if args.only:
            table = {k: v for k, v in table.items() if k in args.only or k == "baseline"}
        inputs = inputs_for(name, pipe, 1, args.device, dtype)
        results: dict[str, list[dict]] = {k: [] for k in table}
        for rep in range(1 + (args.repeats if cuda else 0)):  # CUDA: the first round warms up
            for method, kw in table.items():
                r = run(pipe, inputs, steps, kw, args.device)
                if rep or not cuda:
                    results[method].append(r)
        base = results["baseline"][0]
        for method, rs in results.items():
            r = rs[0]
            row = dict(
                family=name, steps=steps, method=method, weights_gib=weights / GiB,
                peak_gib=(weights + max(x["peak_bytes"] for x in rs)) / GiB,
                ratio_to_baseline=(weights + r["peak_bytes"]) / (weights + base["peak_bytes"]),
                block_rows_ratio=r["block_rows"] / base["block_rows"], ema_state_gib=r["ema_state_gib"],
                storage=r["storage"],
                seconds=statistics.median(x["seconds"] for x in rs) if cuda else None,
                time_ratio=(statistics.median(x["seconds"] for x in rs)
                            / statistics.median(x["seconds"] for x in results["baseline"])) if cuda else None)
            rows.append(row)
            state = "-" if row["ema_state_gib"] is None else f"{row['ema_state_gib']:.3f}"
            line = (f"| {name} | {steps} | {method} | {row['peak_gib']:.2f} | {row['ratio_to_baseline']:.2f} | "
                    f"{row['storage'] or '-'} | {state} | {row['block_rows_ratio']:.3f} |")
            if cuda:
                line += f" {row['seconds']:.2f} | {row['time_ratio']:.2f} |"
            print(line, flush=True)
        del pipe
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
