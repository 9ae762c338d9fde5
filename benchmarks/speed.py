"""Side-by-side speed and memory of guidance methods, in ONE run, interleaved and repeated.

Builds random-weight transformers with real configurations (no download) or loads real weights when
a folder is given, runs CFG, EMAG (full, with dense and with factored EMA storage), EMAG-Q, PAG, SEG and
the straightforward EMAG path round-robin on identical inputs, and prints seconds per image, the ratio to
CFG (of medians, of minima, and the median of the per-round ratios, each round timing every method
once: CPU timings on shared machines are noisy and drift), the work done (batch rows x
transformer blocks executed, relative to CFG: noise-free), peak memory (CUDA: allocated; CPU: every
tensor counted by ``live_memory.LiveTensorBytes`` in the untimed warm-up round), the bytes held by the EMA state
and the max difference of each fast path against the straightforward one.

    python benchmarks/speed.py --size cpu-small            # CPU: 12 blocks, 256 wide, 32x32 latent
    python benchmarks/speed.py --size sd3-medium --device cuda --dtype float16 --batch 1 4
    python benchmarks/speed.py --size dit-xl-2-256 --device cuda --dtype float16

Timings are transformer-only (no text encoders / VAE); absolute numbers are only meaningful on the
GPU they were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from live_memory import LiveTensorBytes  # noqa: E402

SIZES = {
    # name: (family, transformer kwargs, latent hw, text tokens)
    "cpu-small": ("sd3", dict(num_layers=12, attention_head_dim=32, num_attention_heads=8, joint_attention_dim=256,
                              caption_projection_dim=256, pooled_projection_dim=64, in_channels=16, out_channels=16,
                              sample_size=32, patch_size=2, pos_embed_max_size=32), 32, 77),
    "cpu-small-dit": ("dit", dict(num_layers=12, num_attention_heads=8, attention_head_dim=32, in_channels=4,
                                  out_channels=8, sample_size=32, patch_size=2), 32, 0),
    "sd3-medium": ("sd3", dict(num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                               caption_projection_dim=1536, pooled_projection_dim=2048, in_channels=16,
                               out_channels=16, sample_size=128, patch_size=2, pos_embed_max_size=192), 128, 333),
    "dit-xl-2-256": ("dit", dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                 out_channels=8, sample_size=32, patch_size=2), 32, 0),
    "dit-xl-2-512": ("dit", dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                 out_channels=8, sample_size=64, patch_size=2), 64, 0),
}


def build(size: str, device: str, dtype: torch.dtype, model: str | None):
    import emag
    from diffusers import DDIMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    family, kw, hw, tokens = SIZES[size]
    torch.manual_seed(0)
    if model:
        cls = SD3Transformer2DModel if family == "sd3" else DiTTransformer2DModel
        tr = cls.from_pretrained(model, subfolder="transformer", torch_dtype=dtype)
    elif family == "sd3":
        with torch.device(device):  # initialise on the device: a 2B-parameter CPU init takes long
            tr = SD3Transformer2DModel(**kw)
    else:
        with torch.device(device):
            tr = DiTTransformer2DModel(num_embeds_ada_norm=1000, norm_type="ada_norm_zero", **kw)
        with torch.no_grad():  # adaLN-zero init makes every block an identity: randomise
            for name, p in tr.named_parameters():
                if device != "meta" and p.dim() >= 2 and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
    tr = tr.to(device=device, dtype=dtype).eval()
    if family == "sd3":
        pipe = emag.StableDiffusion3EMAGPipeline(
            transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    else:
        # deterministic DDIM (no noise, so outputs compare across methods); the sampler does not change the
        # network work per step, so the pipeline's hint about the reference DDPM sampler is silenced here
        warnings.filterwarnings("ignore", message="EMAG's published DiT numbers")
        pipe = emag.DiTEMAGPipeline(transformer=tr, vae=None, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return family, pipe, hw, tokens


def methods(family: str, n_blocks: int):
    import emag

    mid = n_blocks // 4 if family == "sd3" else n_blocks // 2
    layers = [mid, mid + 1, mid + 2] if family == "sd3" else [mid - 2, mid - 1, mid, mid + 1]
    w = 7.0 if family == "sd3" else 1.5
    e = dict(layers=layers)
    if family == "dit":  # fraction windows: the reference's absolute DiT windows never open below 51 steps
        e.update(ema_window=(0.396, 0.8), apply_window=(0.596, 0.8))
    return {
        "cfg": dict(guidance=[emag.CFG(w)]),
        "emag-full": dict(guidance=[emag.CFG(w), emag.EMAG(variant="full", ema_storage="dense", **e)]),
        "emag-q": dict(guidance=[emag.CFG(w), emag.EMAG(variant="q", **e)]),
        "emag-full-factored": dict(guidance=[emag.CFG(w), emag.EMAG(variant="full", ema_storage="factored", **e)]),
        # SD3, batching="all": the perturbed rows join the normal pass at the chosen block (one pass per
        # step). DiT chooses its block after the normal pass, so its perturbed pass cannot join it.
        **({"emag-full-joined": dict(guidance=[emag.CFG(w), emag.EMAG(variant="full", ema_storage="dense", **e)],
                                     batching="all"),
            "emag-q-joined": dict(guidance=[emag.CFG(w), emag.EMAG(variant="q", **e)], batching="all")}
           if family == "sd3" else {}),
        "emag-full-straightforward": dict(guidance=[emag.CFG(w), emag.EMAG(variant="full", **e)], fast=False),
        "emag-q-straightforward": dict(guidance=[emag.CFG(w), emag.EMAG(variant="q", **e)], fast=False),
        "pag": dict(guidance=[emag.CFG(w), emag.PAG(3.0, layers=[mid])]),
        "seg": ("seg", dict(scale=3.0, layers=[mid])),
    }


STRAIGHTFORWARD = {"emag-full": "emag-full-straightforward", "emag-full-factored": "emag-full-straightforward",
                   "emag-full-joined": "emag-full-straightforward", "emag-q": "emag-q-straightforward",
                   "emag-q-joined": "emag-q-straightforward"}


def ema_state_mib(pipe) -> float | None:
    """Bytes held by the call's EMAG state (dense maps or factored queries/keys), in MiB."""
    for r in getattr(pipe, "guidance_runtimes", None) or []:
        if r.name == "emag":
            return r.state.nbytes / 2**20
    return None


class BlockRows:
    """Counts batch rows x transformer blocks executed: a noise-free measure of the work of a call."""

    def __init__(self, transformer):
        self.count = 0
        self.handles = [b.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for b in transformer.transformer_blocks]

    def _hook(self, module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self.count += int(hidden.shape[0])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu-small")
    ap.add_argument("--model", default=None, help="load real weights from this diffusers folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--steps", type=int, default=None, help="default: 28 (SD3) / 50 (DiT)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="subset of method names")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU; default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    family, pipe, hw, tokens = build(args.size, args.device, dtype, args.model)
    n_blocks = len(pipe.transformer.transformer_blocks)
    steps = args.steps or (28 if family == "sd3" else 50)
    table = methods(family, n_blocks)
    if "seg" in table:
        try:
            from emag.guidance.seg import SEG

            _, kw = table["seg"]
            table["seg"] = dict(guidance=[table["cfg"]["guidance"][0], SEG(**kw)])
        except ImportError:
            del table["seg"]
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only}
    rows = []
    for batch in args.batch:
        g = torch.Generator().manual_seed(0)
        if family == "sd3":
            inputs = dict(
                prompt_embeds=torch.randn(batch, tokens, pipe.transformer.config.joint_attention_dim, generator=g),
                negative_prompt_embeds=torch.randn(batch, tokens, pipe.transformer.config.joint_attention_dim, generator=g),
                pooled_prompt_embeds=torch.randn(batch, pipe.transformer.config.pooled_projection_dim, generator=g),
                negative_pooled_prompt_embeds=torch.randn(batch, pipe.transformer.config.pooled_projection_dim, generator=g),
                latents=torch.randn(batch, 16, hw, hw, generator=g), height=hw * 8, width=hw * 8)
            inputs = {k: (v.to(args.device, dtype) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        else:
            inputs = dict(class_labels=list(range(batch)), latents=torch.randn(batch, 4, hw, hw, generator=g).to(args.device, dtype))
        times = {k: [] for k in table}
        peaks, outs, states, work = {}, {}, {}, {}
        counter = BlockRows(pipe.transformer)
        cuda = args.device.startswith("cuda")
        weights = sum(t.numel() * t.element_size() for t in [*pipe.transformer.parameters(), *pipe.transformer.buffers()])
        for rep in range(args.repeats + 1):  # the first round warms up and is not timed
            for name, kw in table.items():
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                counter.count = 0
                # CPU memory: the exact tensor count, in the untimed warm-up round (it slows the call)
                mem = LiveTensorBytes(args.device) if not rep and not cuda else contextlib.nullcontext()
                with torch.no_grad(), mem:
                    t0 = time.perf_counter()
                    out = pipe(**inputs, num_inference_steps=steps, output_type="latent", **kw).images
                    if cuda:
                        torch.cuda.synchronize()
                    dt = time.perf_counter() - t0
                if rep:
                    times[name].append(dt / batch)
                if cuda:
                    peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**30)
                elif not rep:
                    peaks[name] = (weights + mem.peak) / 2**30
                states[name] = ema_state_mib(pipe)
                work[name] = counter.count
                outs[name] = out.float().cpu()
        cfg_t = statistics.median(times["cfg"]) if "cfg" in times else None
        cfg_min = min(times["cfg"]) if "cfg" in times else None
        for name in table:
            med = statistics.median(times[name])
            ref = STRAIGHTFORWARD.get(name)
            diff = (outs[name] - outs[ref]).abs().max().item() if ref in outs else None
            rows.append(dict(size=args.size, batch=batch, method=name, s_per_image=med,
                             ratio_to_cfg=(med / cfg_t) if cfg_t else None,
                             ratio_of_minima=(min(times[name]) / cfg_min) if cfg_min else None,
                             paired_ratio=(statistics.median(a / b for a, b in zip(times[name], times["cfg"]))
                                           if "cfg" in times else None),
                             block_rows_ratio=(work[name] / work["cfg"]) if "cfg" in work else None, peak_gib=peaks[name], ema_state_mib=states[name],
                             max_diff_vs_straightforward=diff))
    mem_kind = ("peak allocated GiB (CUDA)" if args.device.startswith("cuda")
                else "peak tensor GiB (weights + live tensors, counted)")
    print(f"# {args.size} {args.dtype} on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), {steps} steps, {args.repeats} timed repeats, interleaved; "
          f"torch {torch.__version__}")
    print(f"| size | batch | method | s/image (median) | x CFG (medians) | x CFG (minima) | x CFG (paired) | block-rows x CFG "
          f"| {mem_kind} | EMA state MiB | max diff vs straightforward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['ratio_to_cfg']:.2f}" if r["ratio_to_cfg"] else "-"
        diff = "-" if r["max_diff_vs_straightforward"] is None else f"{r['max_diff_vs_straightforward']:.1e}"
        state = "-" if r["ema_state_mib"] is None else f"{r['ema_state_mib']:.2f}"
        rmin = f"{r['ratio_of_minima']:.2f}" if r["ratio_of_minima"] else "-"
        paired = f"{r['paired_ratio']:.2f}" if r["paired_ratio"] else "-"
        work_ratio = f"{r['block_rows_ratio']:.3f}" if r["block_rows_ratio"] else "-"
        print(f"| {r['size']} | {r['batch']} | {r['method']} | {r['s_per_image']:.3f} | {ratio} | {rmin} | {paired} | {work_ratio} | "
              f"{r['peak_gib']:.3f} | {state} | {diff} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
