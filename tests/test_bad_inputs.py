"""Bad inputs get a clear error naming the argument (and what it takes) before any expensive work, or the
documented behaviour; nothing is dropped silently."""

import json
import shutil
import warnings

import pytest
import torch
from click.testing import CliRunner

import emag
from emag.cli import cli
from emag.generate import plan_generation
from emag.guidance.emag.runtime import can_act
from emag.io import read_png_params
from emag.families import DIT, family_of_transformer_config
from emag.loading import check_snapshot, check_transformer_family
from tiny_models import dit_latents, sd3_embeds, sd3_latents, tiny_dit_pipeline, tiny_sd3_pipeline, tiny_sd3_transformer

NAN, INF = float("nan"), float("inf")


def _counted(pipe, work):
    """Count the expensive work of a call: every transformer block run and every prompt encoding."""
    for block in pipe.transformer.transformer_blocks:
        block.register_forward_pre_hook(lambda *a: work.__setitem__(0, work[0] + 1))
    if hasattr(pipe, "encode_prompt"):
        encode = pipe.encode_prompt
        pipe.encode_prompt = lambda *a, **k: work.__setitem__(0, work[0] + 1) or encode(*a, **k)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def work():
    return [0]


@pytest.fixture(scope="module")
def sd3(work):
    return _counted(emag.StableDiffusion3EMAGPipeline.from_pipe(tiny_sd3_pipeline(num_layers=3)), work)


@pytest.fixture(scope="module")
def dit(work):
    return _counted(emag.DiTEMAGPipeline.from_pipe(tiny_dit_pipeline(num_layers=3)), work)


def E(**kw):
    return emag.EMAG(**{**dict(layers=[0, 1], ema_window=(0, 1), apply_window=(0.25, 1)), **kw})


def sd3_call(pipe, **kw):
    args = dict(**sd3_embeds(1), latents=sd3_latents(1), num_inference_steps=4, guidance_scale=5.0,
                output_type="latent")
    args.update(kw)
    return pipe(**args)


def dit_call(pipe, **kw):
    args = dict(class_labels=[1], num_inference_steps=4, output_type="latent", generator=torch.Generator().manual_seed(0))
    args.update(kw)
    return pipe(**args)


GS = r"`guidance_scale` must be a finite number >= 0"
STEPS = r"`num_inference_steps` must be a whole number >= 1"
SHAPE = r"`latents` must have shape \(1, 4, 8, 8\)"
SD3_CASES = {
    "nan scale, no guidance terms": (dict(guidance_scale=NAN), ValueError, GS),
    "nan scale with emag": (dict(guidance_scale=NAN, emag=E()), ValueError, GS),
    "nan scale with guidance": (dict(guidance_scale=NAN, guidance=[E()]), ValueError, GS),
    "inf scale": (dict(guidance_scale=INF, emag=E()), ValueError, GS),
    "negative scale": (dict(guidance_scale=-1.0), ValueError, GS),
    "text scale": (dict(guidance_scale="7"), TypeError, r"`guidance_scale` must be a number"),
    "steps -1": (dict(num_inference_steps=-1), ValueError, STEPS),
    "steps 2.5": (dict(num_inference_steps=2.5, emag=E()), ValueError, STEPS),
    "steps 0": (dict(num_inference_steps=0, emag=E()), ValueError, STEPS),
    "empty prompt list": (dict(prompt=[], prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt_embeds=None,
                               negative_pooled_prompt_embeds=None, emag=E()), ValueError, r"`prompt` is an empty list"),
    "zero images per prompt": (dict(num_images_per_prompt=0), ValueError,
                               r"`num_images_per_prompt` must be a whole number >= 1"),
    "zero-size embeds": ({**{k: v[:0] for k, v in sd3_embeds(1).items()}, "latents": None, "emag": E()}, ValueError,
                         r"`prompt_embeds` has batch size 0"),
    "zero-size latents": (dict(latents=torch.zeros(0, 4, 8, 8), emag=E()), ValueError, SHAPE),
    "latents of another size than height": (dict(latents=torch.zeros(1, 4, 6, 8), height=16), ValueError,
                                             SHAPE + r".*height 16 and width 16"),
    "latents beyond the positional embedding": (dict(latents=torch.zeros(1, 4, 8, 40)), ValueError,
                                                r"`latents` of size 8x40 .*at most 32"),
    "latents of the wrong channels": (dict(latents=torch.zeros(1, 3, 8, 8)), ValueError,
                                      r"`latents` must have shape \(1, 4, 8, 8\)"),
    "latents of another batch": (dict(latents=torch.zeros(2, 4, 8, 8), emag=E()), ValueError, SHAPE),
    "height beyond the positional embedding": (dict(height=512, latents=None, emag=E()), ValueError,
                                               r"`height`=512 .*positional embedding.*at most 64 pixels"),
    "height 0": (dict(height=0, latents=None), ValueError, r"`height` must be a positive whole number"),
    "generator list longer than the batch": (
        dict(latents=None, generator=[torch.Generator() for _ in range(3)]), ValueError,
        r"`generator` is a list of 3 generator\(s\) but the call makes 1 sample"),
    "negative prompt list of another length": (
        dict(prompt=["a"], prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt=["x", "y"], emag=E()),
        ValueError, r"`negative_prompt` is a list of 2 but the call has 1 prompts"),
    "EMAG twice": (dict(guidance=[E(), E(scale=2.0)]), ValueError, r"emag\.EMAG is given twice in `guidance`"),
    "PAG twice on the same layers": (dict(guidance=[emag.PAG(layers=[1]), emag.PAG(layers=[1])]), ValueError,
                                     r"emag\.PAG is given twice.*need different `layers`"),
    "two base terms": (dict(guidance=[emag.CFG(3.0), emag.APG()]), ValueError, r"At most one CFG-like base term"),
    "a DiT preset": (dict(emag=emag.EMAG.preset("dit-xl-2")), ValueError,
                     r"EMAG\.preset\('dit-xl-2'\) is a preset for DiT models, but this is a SD3 model.*sd3-medium"),
    "unknown batching": (dict(batching="fast"), ValueError, r"Unknown `batching` 'fast'"),
    "a weak model of another layout": (
        dict(guidance=[emag.Autoguidance(2.0, model=tiny_sd3_transformer(num_layers=1).to(torch.float64))]),
        ValueError, r"Autoguidance: the separate `model` does not take the pipeline's inputs: .*torch\.float64"),
    "fast not a bool": (dict(fast="no", emag=E()), TypeError, r"`fast` must be True .* or False"),
    "prompt list of non-strings": (dict(prompt=["a", 3], prompt_embeds=None, pooled_prompt_embeds=None), TypeError,
                                   r"`prompt` must be a string or a list of strings"),
}


@pytest.mark.parametrize("case", list(SD3_CASES))
def test_sd3_bad_inputs_fail_before_any_work(sd3, work, case):
    kwargs, exc, match = SD3_CASES[case]
    work[0] = 0
    with pytest.raises(exc, match=match):
        sd3_call(sd3, **kwargs)
    assert work[0] == 0  # no prompt encoded, no block run


DIT_CASES = {
    "nan scale, plain CFG": (dict(guidance_scale=NAN), ValueError, GS),
    "inf scale is named guidance_scale": (dict(guidance_scale=INF, emag=E()), ValueError, GS),
    "negative scale": (dict(guidance_scale=-2.0), ValueError, GS),
    "steps 0": (dict(num_inference_steps=0), ValueError, STEPS),
    "steps -1": (dict(num_inference_steps=-1), ValueError, STEPS),
    "steps 2.5": (dict(num_inference_steps=2.5, emag=E()), ValueError, STEPS),
    "generator list longer than the batch": (
        dict(guidance_scale=1.0, generator=[torch.Generator() for _ in range(3)]), ValueError,
        r"`generator` is a list of 3 generator\(s\) but the call makes 1 sample"),
    "generator list shorter than the batch": (
        dict(class_labels=[1, 2], generator=[torch.Generator()], emag=E()), ValueError,
        r"`generator` is a list of 1 generator\(s\) but the call makes 2 sample"),
    "empty label list": (dict(class_labels=[]), ValueError, r"`class_labels` is empty"),
    "empty label tensor": (dict(class_labels=torch.zeros(0, dtype=torch.long)), ValueError, r"`class_labels` is empty"),
    "zero-size latents": (dict(latents=torch.zeros(0, 4, 8, 8)), ValueError, SHAPE),
    "latents of another size": (dict(latents=dit_latents(1, size=6), emag=E()), ValueError, SHAPE),
    "unknown class name": (dict(class_labels=["golden retriever"]), ValueError,
                           r"Unknown class name 'golden retriever' in `class_labels`.*id2label.*'class0'"),
    "class id beyond the null class": (dict(class_labels=[1001]), ValueError,
                                       r"`class_labels` must be in 0\.\.999 .*or 1000, the null \(unconditional\)"),
    "fractional class id": (dict(class_labels=[1.5]), TypeError, r"`class_labels` takes class ids 0\.\.999"),
    "an SD3 preset": (dict(emag=emag.EMAG.preset("sd3-medium")), ValueError,
                      r"EMAG\.preset\('sd3-medium'\) is a preset for SD3 models, but this is a DiT model.*dit-xl-2"),
    "unknown output type": (dict(output_type="png"), ValueError, r"Unknown `output_type` 'png'"),
}


@pytest.mark.parametrize("case", list(DIT_CASES))
def test_dit_bad_inputs_fail_before_any_work(dit, work, case):
    kwargs, exc, match = DIT_CASES[case]
    work[0] = 0
    with pytest.raises(exc, match=match):
        dit_call(dit, **kwargs)
    assert work[0] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(ema_dtype=torch.int8), r"`ema_dtype` must be a floating dtype.*torch\.int8"),
    (dict(ema_dtype=torch.complex64), r"`ema_dtype` must be a floating dtype"),
    (dict(ema_dtype="int8"), r"Unknown `ema_dtype` 'int8'"),
    (dict(entropy_top_k=True), r"`entropy_top_k` must be a positive int"),
    (dict(guided_channels=True), r"`guided_channels` must be a positive int"),
])
def test_emag_config_is_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        emag.EMAG(**kwargs)


def test_dit_class_names_and_the_null_class_through_the_api(dit):
    by_id = dit_call(dit, class_labels=[3, 5]).images
    by_name = dit_call(dit, class_labels=["class3", "CLASS5"]).images
    assert torch.equal(by_id, by_name)
    assert torch.equal(dit_call(dit, class_labels="class3").images, dit_call(dit, class_labels=3).images)
    null = dit_call(dit, class_labels=[dit.null_class]).images  # documented: unconditional samples
    assert torch.isfinite(null).all() and not torch.equal(null, dit_call(dit, class_labels=[3]).images)


def test_non_finite_guidance_is_an_error_naming_the_step_and_the_terms(sd3, dit):
    with pytest.raises(ValueError, match=r"at step \d+ of 4 are not finite.*CFG\(scale=5\), EMAG\(scale=1e\+30\)"):
        sd3_call(sd3, emag=E(scale=1e30))
    with pytest.raises(ValueError, match=r"at step \d+ of 4 .*not finite.*EMAG\(scale=1e\+30\)"):
        dit_call(dit, emag=E(scale=1e30))
    # the combination itself overflowing from finite branch predictions: named at that step
    from emag.engine import GuidanceEngine
    from emag.windows import StepContext

    class Runtime:
        config = emag.PAG(scale=3.0e38, layers=[1])

    finite = {"cond": torch.ones(1, 4, 2, 2), "pag:1": torch.zeros(1, 4, 2, 2)}
    with pytest.raises(ValueError, match=r"guided prediction at step 2 of 4 .*every branch prediction was.*"
                                         r"PAG\(scale=3e\+38\) overflow float32"):
        GuidanceEngine._non_finite(torch.ones(1, 4, 2, 2), StepContext(2, 4), [Runtime()], finite, torch.float32)
    # non-finite inputs (the caller's latents) pass through, as in the base pipeline
    GuidanceEngine._non_finite(torch.full((1, 4, 2, 2), NAN), StepContext(2, 4), [Runtime()], finite, torch.float32)


def test_latents_that_become_non_finite_between_steps_are_an_error(sd3):
    """Finite guided predictions, then non-finite latents entering the next step (the sampler's update
    overflowed, or, as here by construction, a callback made them so): an error naming that step. The
    caller's own non-finite latents at the first step pass through, as in the base pipeline."""
    def poison(pipe, i, t, kw):
        return {"latents": kw["latents"] * float("inf")} if i == 1 else {}

    with pytest.raises(ValueError, match=r"latents entering step 2 of 4 are not finite"):
        sd3_call(sd3, emag=E(), callback_on_step_end=poison)
    out = sd3_call(sd3, emag=E(), latents=torch.full_like(sd3_latents(1), NAN)).images
    assert torch.isnan(out).all()


def _emag_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if "EMAG can never act" in str(w.message)]


def test_emag_that_can_never_act_warns(sd3, dit):
    assert not can_act([0], [0], 1) and can_act([0], [0], 2) and can_act([0, 1], [1], 1) and can_act([0], [1], 1)
    # SD3, 1 step: the only replacement step is the EMA's first update (E := R in the same pass)
    msgs = _emag_warnings(lambda: sd3_call(sd3, num_inference_steps=1, emag=emag.EMAG(layers=[0, 1])))
    assert len(msgs) == 1 and "1-step schedule" in msgs[0] and "replacement step(s) [0]" in msgs[0]
    assert "EMA window" in msgs[0] and "replacement window" in msgs[0]
    assert not _emag_warnings(lambda: sd3_call(sd3, num_inference_steps=2, emag=emag.EMAG(layers=[0, 1])))
    # DiT nested: the cond and uncond passes feed the EMA twice per step, so one step can act ...
    one_step = dict(num_inference_steps=1, emag=E(apply_window=(0, 1)))
    assert not _emag_warnings(lambda: dit_call(dit, **one_step))
    # ... but not when only the conditional pass feeds it
    assert _emag_warnings(lambda: dit_call(dit, num_inference_steps=1, emag=E(apply_window=(0, 1), cond_only_score=True)))
    assert _emag_warnings(lambda: sd3_call(sd3, emag=E(blend=0.0)))
    assert not _emag_warnings(lambda: sd3_call(sd3, num_inference_steps=1, emag=emag.EMAG(layers=[0, 1], scale=1.0)))


def test_warnings_point_at_the_callers_line(sd3, dit):
    """However deep in the call a warning is raised, it is reported at the user's line (this file)."""
    for call in (lambda: sd3_call(sd3, num_inference_steps=1, emag=emag.EMAG(layers=[0, 1])),
                 lambda: sd3_call(sd3, guidance_scale=1.0),
                 lambda: dit_call(dit, num_inference_steps=1, emag=E(apply_window=(0, 1), cond_only_score=True))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        ours = [w for w in caught if "EMAG" in str(w.message) or "no effect" in str(w.message)]
        assert ours and all(w.filename == __file__ for w in ours), [(w.filename, str(w.message)[:40]) for w in ours]


def test_an_unused_negative_condition_is_reported(sd3):
    def negative_warnings(**kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sd3_call(sd3, **kw)
        return [str(w.message) for w in caught if "no effect: this call runs no unconditional" in str(w.message)]

    msgs = negative_warnings(guidance_scale=1.0)  # diffusers: no CFG, the negative embeds silently unused
    assert len(msgs) == 1 and "`negative_prompt_embeds`, `negative_pooled_prompt_embeds`" in msgs[0]
    assert negative_warnings(guidance_scale=1.0, emag=E(combination="emag_only"))
    assert not negative_warnings(guidance_scale=5.0) and not negative_warnings(guidance_scale=5.0, emag=E())


# -- model folders, plan_generation and the command line ------------------------------------------------

@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    """A DiT model_index.json over an SD3 transformer."""
    d = tmp_path_factory.mktemp("mixed") / "model"
    tiny_dit_pipeline(num_layers=2).save_pretrained(d)
    shutil.rmtree(d / "transformer")
    tiny_sd3_transformer(num_layers=2).save_pretrained(d / "transformer")
    return d


@pytest.fixture
def no_loading(monkeypatch):
    import emag.cli
    import emag.generate

    def refuse(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(emag.generate, "load_pipeline", refuse)


def test_a_folder_mixing_two_families_is_refused_before_loading(mixed_dir, tmp_path, no_loading):
    match = r"model_index\.json names a DiTPipeline \(DiT\), but transformer/config\.json holds a SD3Transformer2DModel"
    with pytest.raises(ValueError, match=match):
        check_snapshot(mixed_dir)
    with pytest.raises(ValueError, match=match):
        emag.DiTEMAGPipeline.from_pretrained(mixed_dir)
    r = CliRunner().invoke(cli, ["generate", "--model", str(mixed_dir), "--class-label", "1", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "holds a SD3Transformer2DModel" in r.output and "Traceback" not in r.output
    # the hub's DiT folders save the legacy Transformer2DModel name, which diffusers loads as a DiT
    legacy = {"_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"}
    assert family_of_transformer_config(legacy) is DIT
    good = tmp_path / "legacy"
    (good / "transformer").mkdir(parents=True)
    (good / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    (good / "transformer" / "config.json").write_text(json.dumps(legacy))
    check_transformer_family(good)


def test_the_null_class_is_explicit_on_the_command_line(tmp_path, no_loading):
    r = CliRunner().invoke(cli, ["generate", "--class-label", "10", "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "Class id 10 is this model's null (unconditional) class" in r.output
    assert "ids 0..9" in r.output and "--class-label null" in r.output
    r = CliRunner().invoke(cli, ["generate", "--class-label", "11", "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "ids 0..9" in r.output and "0..10" not in r.output
    with pytest.raises(ValueError, match=r"null \(unconditional\) class"):
        plan_generation(class_labels=[10])
    assert plan_generation(class_labels=["null", "3"]).class_labels == [10, 3]
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be a whole number >= 1"):
        plan_generation(class_labels=["3"], num_inference_steps=2.5)


def test_cli_samples_the_null_class_when_asked(tmp_path):
    r = CliRunner().invoke(cli, ["generate", "--class-label", "null", "--steps", "2", "--num-images", "1",
                                 "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert read_png_params(next(tmp_path.glob("0*.png")))["condition"] == 10


def test_cli_out_errors_name_out(tmp_path, monkeypatch, no_loading):
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = CliRunner().invoke(cli, ["generate", "--class-label", "1", "--out", str(afile / "sub")])
    assert r.exit_code == 1 and f"--out {afile / 'sub'}" in r.output and "is a file, not a folder" in r.output
    assert "Errno" not in r.output and "Traceback" not in r.output

    def unwritable(plan, out):
        raise PermissionError(13, "Permission denied", str(out))

    import emag.cli
    import emag.generate

    monkeypatch.setattr(emag.cli, "check_output_folder", unwritable)
    r = CliRunner().invoke(cli, ["generate", "--class-label", "1", "--out", str(tmp_path / "ro")])
    assert r.exit_code == 1 and "--out" in r.output and "no permission to write" in r.output
    assert "writable" in r.output and "Errno" not in r.output
