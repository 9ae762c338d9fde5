"""Windows, layer syntax, presets and configuration errors."""

import math

import pytest
import torch

import emag
from emag.guidance.emag import resolve
from emag.layers import parse_layers
from emag.windows import (GuiderWindow, RemainingStepsWindow, SD3ReferenceWindow, StepContext, StrictWindow, Window,
                          window_steps)


def test_fraction_window_is_half_open():
    w = Window(0.25, 0.75)
    assert window_steps(w, 8) == [2, 3, 4, 5]
    assert window_steps(Window(0.3, 1.0), 10) == list(range(3, 10))  # 0.3 * 10 is not 3.0000000001
    assert window_steps(Window(0, 1), 5) == [0, 1, 2, 3, 4]
    assert window_steps(Window(0.5, 0.5), 10) == []


def test_dit_reference_windows_at_250_steps():
    ema = window_steps(RemainingStepsWindow(50, 150), 250)
    apply = window_steps(RemainingStepsWindow(50, 100), 250)
    assert ema == list(range(99, 200))  # curr = 249 - i in [50, 150]
    assert apply == list(range(149, 200))
    assert window_steps(RemainingStepsWindow(50, 150), 50) == []  # absolute: never at <= 50 steps
    # the fraction equivalents of the reference at 250 steps
    assert window_steps(Window(99 / 250, 200 / 250), 250) == ema
    assert window_steps(Window(149 / 250, 200 / 250), 250) == apply


def test_sd3_reference_window_matches_table_at_28():
    assert window_steps(SD3ReferenceWindow(250, 50, 0), 28) == list(range(0, 23))
    assert window_steps(SD3ReferenceWindow(250, 50, 50), 28) == list(range(5, 23))


def test_the_reference_slg_window_and_diffusers_guider_windows():
    """docs/method.md section 6.4: the SD3.5 reference's ``i > N*start and i < N*stop`` and diffusers' guiders'
    ``int(start*N) <= i < int(stop*N)`` (strict lower bound for perturbation guiders)."""
    for n in (10, 28, 50, 100):
        assert window_steps(StrictWindow(0.01, 0.2), n) == [i for i in range(n) if i > n * 0.01 and i < n * 0.2]
    assert window_steps(StrictWindow(0.01, 0.2), 28) == [1, 2, 3, 4, 5]
    assert window_steps(StrictWindow(0.01, 0.2), 100) == list(range(2, 20))  # half-open [0.01, 0.2): 1..19
    assert window_steps(Window(0.01, 0.2), 100) == list(range(1, 20))
    assert window_steps(GuiderWindow(0.01, 0.2), 28) == [0, 1, 2, 3, 4]
    assert window_steps(GuiderWindow(0.01, 0.2, strict_start=True), 28) == [1, 2, 3, 4]
    assert window_steps(GuiderWindow(0.0, 1.0, strict_start=True), 4) == [1, 2, 3]  # step 0 never perturbed
    assert emag.SLG().window == StrictWindow(0.01, 0.2)
    with pytest.raises(ValueError, match="fraction"):
        StrictWindow(0.5, 1.5)
    with pytest.raises(ValueError, match="start"):
        GuiderWindow(0.6, 0.5)


def test_step_context():
    ctx = StepContext(3, 10, 500.0)
    assert ctx.remaining == 6 and ctx.progress == 0.3


@pytest.mark.parametrize("spec, expected", [
    ("6,7,8", (6, 7, 8)), ("6-8", (6, 7, 8)), ("2,12-13", (2, 12, 13)), (7, (7,)), ([8, 6, 6], (6, 8)),
    (" 1 , 10 ", (1, 10)),
])
def test_layer_syntax(spec, expected):
    assert parse_layers(spec) == expected


@pytest.mark.parametrize("spec", ["", "a", "3-1", "1,,2", [-1], [1.5], True, "-1"])
def test_layer_syntax_errors(spec):
    with pytest.raises((ValueError, TypeError)):
        parse_layers(spec)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=1.0), "beta"), (dict(beta=-0.1), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(scale=-1.0), "scale"), (dict(scale=float("nan")), "scale"), (dict(scale=math.inf), "scale"),
    (dict(blend=1.5), "blend"), (dict(variant="qk"), "variant"), (dict(rows="rows"), "rows"),
    (dict(selection="max"), "selection"), (dict(combination="cfg++"), "combination"),
    (dict(variant="q", rows="img2img"), "image_rows"), (dict(variant="q", selection="entropy"), "full"),
    (dict(ema_dtype="int8"), "dtype"), (dict(guided_channels=0), "guided_channels"),
    (dict(ema_window=(0.5, 0.2)), "start"), (dict(apply_window=(0, 2)), "stop"), (dict(entropy_top_k=0), "top_k"),
])
def test_bad_config_is_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        emag.EMAG(**kwargs)


def test_resolve_fills_backbone_defaults_and_checks_range():
    r = resolve(emag.EMAG(), "sd3", 24)
    assert r.layers == (6, 7, 8) and r.scale == 1.5 and r.ema_dtype == torch.float16
    r = resolve(emag.EMAG(), "dit", 28)
    assert r.layers == (12, 13, 14, 15) and r.scale == 3.0 and r.ema_dtype == torch.float32
    assert resolve(emag.EMAG(combination="additive"), "dit", 28).apply_window == RemainingStepsWindow(0, 100)
    with pytest.raises(ValueError, match="out of range"):
        resolve(emag.EMAG(layers=[6, 24]), "sd3", 24)
    with pytest.raises(ValueError, match="DiT"):
        resolve(emag.EMAG(selection="entropy"), "sd3", 24)
    with pytest.raises(ValueError, match="text"):
        resolve(emag.EMAG(rows="img2txt"), "dit", 28)


def test_presets_carry_the_paper_defaults():
    p = emag.get_preset("sd3-medium")
    assert (p.emag.scale, p.emag.layers, p.emag.beta, p.guidance_scale, p.num_inference_steps, p.seed) == \
        (1.5, (6, 7, 8), 0.988, 7.0, 28, 8)
    d = emag.get_preset("dit-xl-2")
    assert (d.emag.scale, d.emag.layers, d.emag.guided_channels, d.guidance_scale, d.num_inference_steps) == \
        (3.0, (12, 13, 14, 15), 3, 1.5, 250)
    assert emag.EMAG.preset("sd3-medium-q").variant == "q"
    assert emag.EMAG.preset("sd3-medium", scale=2.0).scale == 2.0
    with pytest.raises(ValueError, match="Unknown EMAG preset"):
        emag.EMAG.preset("sdxl")
