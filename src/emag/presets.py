"""Named presets: the paper's settings per backbone, with where each number comes from."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import EMAG
from .windows import RemainingStepsWindow, SD3ReferenceWindow


# The hub models emag knows by name: hub id -> gated (the licence must be accepted on the hub and the user
# logged in, `hf auth login`, before downloading). The one place that names them: the presets' `model_id` and
# the download commands printed for a missing model (a folder named like one of these) read it.
SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"
DIT_XL_2_256 = "facebook/DiT-XL-2-256"
DIT_XL_2_512 = "facebook/DiT-XL-2-512"
HUB_MODELS: dict[str, bool] = {
    SD3_MEDIUM: True,
    "stabilityai/stable-diffusion-3.5-medium": True,
    "stabilityai/stable-diffusion-3.5-large": True,
    DIT_XL_2_256: False,
    DIT_XL_2_512: False,
}


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    emag: EMAG
    guidance_scale: float
    num_inference_steps: int
    resolution: int
    seed: int
    sampler: str
    model_id: str
    source: str


def _sd3(variant: str, name: str, source: str) -> Preset:
    return Preset(
        name=name, family="sd3",
        emag=EMAG(scale=1.5, layers=(6, 7, 8), beta=0.988, blend=1.0, variant=variant,
                  ema_window=SD3ReferenceWindow(250, 50, 0), apply_window=SD3ReferenceWindow(250, 50, 50),
                  combination="nested", ema_dtype="float16", preset_name=name),
        guidance_scale=7.0, num_inference_steps=28, resolution=1024, seed=8,
        sampler="FlowMatchEulerDiscrete (shift 3.0)",
        model_id=SD3_MEDIUM,
        source=source,
    )


def _dit(name: str, combination: str, apply_lo: int, source: str, resolution: int = 256) -> Preset:
    return Preset(
        name=name, family="dit",
        emag=EMAG(scale=3.0, layers=(12, 13, 14, 15), beta=0.988, blend=1.0, variant="full",
                  ema_window=RemainingStepsWindow(50, 150), apply_window=RemainingStepsWindow(apply_lo, 100),
                  combination=combination, ema_dtype="float32", guided_channels=3, preset_name=name),
        guidance_scale=1.5, num_inference_steps=250, resolution=resolution, seed=8,
        sampler="ddpm-250 (ancestral DDPM, learned-range variance, respaced like the original DiT)",
        model_id=DIT_XL_2_256 if resolution == 256 else DIT_XL_2_512,
        source=source,
    )


def _digits() -> Preset:
    return Preset(
        name="digits", family="dit",
        emag=EMAG(scale=2.0, layers=(3, 4), beta=0.988, blend=1.0, variant="full", ema_window=(0.0, 1.0),
                  apply_window=(0.2, 1.0), combination="nested", ema_dtype="float32", preset_name="digits"),
        guidance_scale=3.0, num_inference_steps=25, resolution=8, seed=0,
        sampler="the model's DDIM (trailing spacing, no clipping)", model_id="bundled",
        source="The bundled 8-block digits DiT (emag.digits): EMAG on its middle blocks 3-4 with fraction windows "
               "(the reference DiT windows are absolute and never open at 50 steps); chosen by eye, see "
               "benchmarks/quality.py for measured scales.",
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _sd3("full", "sd3-medium",
             "Paper Table 2 EMAG row (SD3-Medium, COCO, 28 steps, CFG 7, w_e 1.5, blocks 6-8, beta 0.988); "
             "windows and fp16 EMA from the reference SD3 pipeline (emag.md 3, 5.1)."),
        _sd3("q", "sd3-medium-q",
             "The reference SD3 scripts' default variant EMAG-Q (paper Table 4), otherwise as sd3-medium."),
        _dit("dit-xl-2", "nested", 50,
             "Paper DiT-XL/2 setting: 250-step DDPM, CFG 1.5, w_e 3, blocks 12-15, EMA 50<=curr<=150, "
             "replacement 50<=curr<=100, 3-of-4 channel CFG (emag.md 3, 5.2)."),
        _dit("dit-xl-2-512", "nested", 50, "As dit-xl-2 for the 512 px model.", resolution=512),
        _dit("dit-xl-2-additive", "additive", 0,
             "Reference DiT additive variant u + w(c-u) + w_e(c-u_e), doubled [x;x] batch, "
             "replacement whenever curr <= 100 (emag.md 5.2)."),
        _digits(),
    ]
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"Unknown EMAG preset {name!r}; available: {', '.join(PRESETS)}.")
    return PRESETS[name]


def preset_for(name: str, **emag_overrides) -> Preset:
    p = get_preset(name)
    return replace(p, emag=replace(p.emag, **emag_overrides)) if emag_overrides else p
