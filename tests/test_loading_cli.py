"""The real loading path (save_pretrained -> from_pretrained from disk) and the command line."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from diffusers import DiTPipeline, StableDiffusion3Pipeline

import emag
from emag.cli import cli
from emag.io import read_png_params
from emag.loading import MissingWeightsError, check_weights_present, locate_model
from tiny_models import tiny_dit_pipeline, tiny_sd3_text_pipeline


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd3")
    tiny_sd3_text_pipeline(d / "build", num_layers=4).save_pretrained(d / "model")
    return d / "model"


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """Saved like the hub's DiT folders: a plain DiTPipeline plus id2label in model_index.json."""
    d = tmp_path_factory.mktemp("dit") / "model"
    tiny_dit_pipeline(num_layers=4).save_pretrained(d)
    index = json.loads((d / "model_index.json").read_text())
    index["id2label"] = {str(i): f"class{i}, digit {i}" for i in range(10)}
    (d / "model_index.json").write_text(json.dumps(index))
    return d


def test_sd3_from_pretrained_local_folder(sd3_dir):
    pipe = emag.StableDiffusion3EMAGPipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    base = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    for p in (pipe, base):
        p.set_progress_bar_config(disable=True)
    kw = dict(prompt="a small red cube", num_inference_steps=3, height=16, width=16, output_type="latent")
    a = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    b = base(**kw, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(a, b)
    e = pipe(**kw, generator=torch.Generator().manual_seed(0), emag=emag.EMAG(layers=[1, 2], scale=3.0,
                                                                             apply_window=(0.3, 1.0), ema_window=(0, 1)))
    assert not torch.equal(a, e.images)


def test_from_pretrained_checks_the_folder_and_explains_hub_misses(sd3_dir, dit_dir, tmp_path):
    pipe = emag.StableDiffusion3EMAGPipeline.from_pretrained(sd3_dir)  # saved without T5: taken as None
    assert pipe.text_encoder_3 is None and pipe.text_encoder is not None
    with pytest.raises(ValueError, match="DiTEMAGPipeline"):
        emag.StableDiffusion3EMAGPipeline.from_pretrained(dit_dir)
    with pytest.raises(ValueError, match="StableDiffusion3EMAGPipeline"):
        emag.DiTEMAGPipeline.from_pretrained(sd3_dir)
    broken = tmp_path / "broken"
    shutil.copytree(dit_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MissingWeightsError, match="holds no weights"):
        emag.DiTEMAGPipeline.from_pretrained(broken)
    with pytest.raises(MissingWeightsError, match="hf download"):
        emag.DiTEMAGPipeline.from_pretrained("nobody/not-a-cached-model", local_files_only=True)


def test_dit_from_pretrained_keeps_labels_and_round_trips(dit_dir, tmp_path):
    pipe = emag.DiTEMAGPipeline.from_pretrained(dit_dir)
    assert pipe.labels["digit 3"] == 3 and pipe.get_label_ids(["class7"]) == [7]
    base = DiTPipeline.from_pretrained(dit_dir)
    for p in (pipe, base):
        p.set_progress_bar_config(disable=True)
    a = pipe(class_labels=[3], num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="pt")
    b = base(class_labels=[3], num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="pt")
    assert torch.equal(a.images, b.images)
    pipe.save_pretrained(tmp_path / "again")  # our pipeline keeps id2label when saving
    again = emag.DiTEMAGPipeline.from_pretrained(tmp_path / "again")
    assert again.labels == pipe.labels


def test_missing_weights_errors(tmp_path, sd3_dir):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        locate_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        locate_model(tmp_path / "empty")
    with pytest.raises(MissingWeightsError, match="hf download stabilityai/"):
        locate_model("stabilityai/stable-diffusion-3-medium-diffusers")
    broken = tmp_path / "broken"
    shutil.copytree(sd3_dir, broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MissingWeightsError, match="no weights"):
        check_weights_present(broken, ["transformer", "vae"])


def test_cli_help_lists_examples():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "Examples:" in r.output and "emag generate" in r.output
    r = CliRunner().invoke(cli, ["generate", "--help"])
    assert r.exit_code == 0 and "--layers" in r.output and "--variant" in r.output


def test_console_script_entry_point():
    exe = shutil.which("emag") or [sys.executable, "-m", "emag.cli"]
    cmd = [exe, "--help"] if isinstance(exe, str) else exe + ["--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "generate" in out.stdout


def test_cli_generate_sd3_writes_png_with_metadata(sd3_dir, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, [
        "generate", "--model", str(sd3_dir), "--prompt", "a cat", "--prompt", "a dog", "--layers", "1,2",
        "--steps", "3", "--height", "16", "--width", "16", "--seed", "8", "--cfg", "4", "--variant", "q",
        "--out", str(out),
    ])
    assert r.exit_code == 0, r.output
    pngs = sorted(out.glob("0*.png"))
    assert [p.name for p in pngs] == ["00000_seed8.png", "00001_seed9.png"]
    meta = read_png_params(pngs[1])
    assert meta["condition"] == "a dog" and meta["seed"] == 9 and meta["guidance_scale"] == 4.0
    assert meta["emag"]["variant"] == "q" and meta["emag"]["layers"] == "1,2" and meta["emag"]["scale"] == 1.5
    assert json.loads(pngs[1].with_suffix(".json").read_text()) == meta


def test_cli_batching_and_ema_storage_reach_the_pipeline(sd3_dir, tmp_path, monkeypatch):
    """--batching and --ema-storage are passed to the call and recorded in the image's parameters."""
    seen = []
    original = emag.StableDiffusion3EMAGPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("batching"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(emag.StableDiffusion3EMAGPipeline, "__call__", spy)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, [
        "generate", "--model", str(sd3_dir), "--prompt", "a cat", "--layers", "1,2", "--steps", "8",
        "--height", "16", "--width", "16", "--batching", "all", "--ema-storage", "factored", "--out", str(out),
    ])
    assert r.exit_code == 0, r.output
    meta = read_png_params(next(out.glob("0*.png")))
    assert meta["batching"] == "all" and seen[0] == "all"
    assert meta["emag"]["ema_storage"] == "factored" and meta["emag"]["ema_storage_used"] == "factored"
    r = CliRunner().invoke(cli, ["generate", "--model", str(sd3_dir), "--prompt", "a", "--batching", "fast"])
    assert r.exit_code != 0 and "batching" in r.output
    # the reference's layout and arithmetic
    seen_fast = []
    monkeypatch.setattr(emag.StableDiffusion3EMAGPipeline, "__call__",
                        lambda self, *a, **k: seen_fast.append(k.get("fast")) or original(self, *a, **k))
    out2 = tmp_path / "ref"
    r = CliRunner().invoke(cli, [
        "generate", "--model", str(sd3_dir), "--prompt", "a cat", "--layers", "1,2", "--steps", "8",
        "--height", "16", "--width", "16", "--explicit-attention", "--straightforward", "--out", str(out2)])
    assert r.exit_code == 0, r.output
    meta = read_png_params(next(out2.glob("0*.png")))
    assert seen_fast == [False] and meta["fast"] is False and meta["emag"]["explicit_attention"] is True


def test_cli_resumes_an_interrupted_run_and_never_overwrites_other_work(dit_dir, tmp_path, monkeypatch):
    import emag.generate

    args = ["generate", "--model", str(dit_dir), "--class-label", "3", "--num-images", "3", "--layers", "1-2",
            "--steps", "4", "--sampler", "default", "--ema-window", "0,1", "--apply-window", "0.25,1",
            "--out", str(tmp_path)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    pngs = sorted(tmp_path.glob("0*.png"))
    assert len(pngs) == 3
    first = {p.name: p.read_bytes() for p in pngs}
    pngs[2].unlink()  # "interrupted" before the third image
    pngs[2].with_suffix(".json").unlink()
    loads = []
    real = emag.loading.load_pipeline
    monkeypatch.setattr(emag.generate, "load_pipeline", lambda *a, **k: loads.append(1) or real(*a, **k))
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "2 image(s) already" in r.output and len(loads) == 1
    assert {p.name: p.read_bytes() for p in sorted(tmp_path.glob("0*.png"))} == first  # same seeds, same images
    r = CliRunner().invoke(cli, args)  # all done: the model is not even loaded
    assert r.exit_code == 0 and len(loads) == 1 and "3 image(s) already" in r.output
    r = CliRunner().invoke(cli, args + ["--cfg", "2.5"])  # other parameters, same folder
    assert r.exit_code != 0 and "other parameters" in r.output and "Traceback" not in r.output
    assert {p.name: p.read_bytes() for p in sorted(tmp_path.glob("0*.png"))} == first
    r = CliRunner().invoke(cli, args + ["--cfg", "2.5", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert read_png_params(sorted(tmp_path.glob("0*.png"))[0])["guidance_scale"] == 2.5


def test_cli_generate_dit_by_class_name_is_reproducible(dit_dir, tmp_path):
    args = ["generate", "--model", str(dit_dir), "--class-label", "digit 3", "--class-label", "5", "--layers", "1-2",
            "--steps", "6", "--sampler", "default", "--ema-window", "0,1", "--apply-window", "0.2,1"]
    r1 = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "a")])
    r2 = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "b")])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output
    a, b = sorted((tmp_path / "a").glob("0*.png")), sorted((tmp_path / "b").glob("0*.png"))
    assert len(a) == 2 and a[0].read_bytes() == b[0].read_bytes()
    assert read_png_params(a[0])["condition"] == 3
    plain = ["generate", "--model", str(dit_dir), "--class-label", "3", "--steps", "6", "--sampler", "default"]
    r3 = CliRunner().invoke(cli, plain + ["--method", "cfg", "--out", str(tmp_path / "c")])
    assert r3.exit_code == 0 and read_png_params(sorted((tmp_path / "c").glob("*.png"))[0])["emag"] is None


def test_cli_composes_methods_with_params(dit_dir, tmp_path):
    r = CliRunner().invoke(cli, ["generate", "--model", str(dit_dir), "--class-label", "3", "--steps", "4",
                                 "--sampler", "default", "--method", "cfg,pag", "--param", "pag.scale=2.5",
                                 "--param", "pag.layers=1-2", "--cfg", "3", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    meta = read_png_params(sorted(tmp_path.glob("*.png"))[0])
    assert meta["method"] == "cfg,pag" and meta["emag"] is None
    assert meta["guidance"] == [
        {"method": "CFG", "scale": 3.0, "window": None, "interval": None, "rescale": 0.0, "rescale_space": "native",
         "guided_channels": None},
        {"method": "PAG", "scale": 2.5, "layers": [1, 2], "window": None}]


def test_cli_metadata_records_the_backbone_defaults_that_ran(dit_dir, tmp_path):
    """APG's None defaults are per backbone: the metadata holds the numbers used, not None."""
    r = CliRunner().invoke(cli, ["generate", "--model", str(dit_dir), "--class-label", "3", "--steps", "3",
                                 "--sampler", "default", "--method", "apg", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    apg = read_png_params(sorted(tmp_path.glob("*.png"))[0])["guidance"][0]
    assert apg["method"] == "APG" and apg["scale"] == 1.5 and apg["norm_threshold"] == 5.0


@pytest.mark.parametrize("extra, message", [
    (["--method", "cfg,nope"], "Unknown guidance method"),
    (["--method", "cfg,pag", "--param", "pag.size=3"], "no parameter 'size'"),
    (["--method", "cfg", "--param", "pag.scale=3"], "--param given for"),
    (["--method", "cfg", "--param", "pagscale=3"], "METHOD.FIELD=VALUE"),
    (["--method", "cfg,pag", "--param", "pag.layers=9"], "out of range"),
    (["--method", "cfg", "--layers", "1"], "does not include emag"),
    (["--method", "cfg,pag", "--param", "pag.scale=abc"], "pag.scale='abc'"),
])
def test_cli_method_errors(dit_dir, extra, message):
    r = CliRunner().invoke(cli, ["generate", "--model", str(dit_dir), "--class-label", "3"] + extra)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_cli_methods_lists_every_method():
    r = CliRunner().invoke(cli, ["methods"])
    assert r.exit_code == 0
    for name in ("cfg", "emag", "pag", "slg", "stg", "cfg-zero-star"):
        assert f"\n{name} (" in "\n" + r.output


@pytest.mark.parametrize("args, message", [
    (["--model", "stabilityai/stable-diffusion-3-medium-diffusers", "--prompt", "x"], "hf download"),
    (["--model", "{sd3}", "--prompt", "x", "--layers", "9"], "out of range"),
    (["--model", "{sd3}", "--prompt", "x", "--height", "17"], "multiple of"),
    (["--model", "{sd3}", "--class-label", "3"], "prompt"),
    (["--model", "{sd3}", "--prompt", "x", "--preset", "dit-xl-2"], "is for DiT models"),
    (["--model", "{dit}", "--class-label", "zebra"], "Unknown class label"),
    (["--model", "{dit}", "--class-label", "3", "--height", "64"], "only generates"),
    (["--model", "{dit}", "--prompt", "a cat"], "class-conditional"),
    (["--model", "{sd3}", "--prompt", "x", "--ema-window", "0.5"], "START,STOP"),
    (["--model", "{dit}", "--class-label", "3", "--negative-prompt", "x"], "text-conditioned models only"),
    (["--model", "{dit}", "--class-label", "3", "--guided-channels", "9"], "exceeds"),
    (["--model", "{dit}", "--class-label", "3", "--method", "cfg,apg,emag"], "At most one"),
    (["--model", "{dit}", "--class-label", "3", "--method", "cfg-zero-star,emag"], "flow-matching"),
    (["--model", "{dit}", "--class-label", "3", "--steps", "4", "--preset", "dit-xl-2"], "selects none"),
    (["--model", "{sd3}", "--prompt", "x", "--ema-window", "0.5,0.5"], "window"),
    (["--model", "{sd3}", "--prompt", "x", "--device", "banana"], "device"),
    (["--model", "{sd3}", "--prompt", "x", "--height", "0"], "range"),
    (["--model", "{sd3}", "--prompt", "x", "--cfg", "nan"], "--cfg"),
])
def test_cli_bad_input_fails_fast_without_traceback(sd3_dir, dit_dir, monkeypatch, args, message):
    import emag.generate

    monkeypatch.setattr(emag.generate, "load_pipeline", lambda *a, **k: pytest.fail("weights were loaded"))
    args = [a.format(sd3=sd3_dir, dit=dit_dir) for a in args]
    if "--layers" not in args:
        args += ["--layers", "1"]
    r = CliRunner().invoke(cli, ["generate"] + args)
    assert r.exit_code != 0 and message in r.output
    assert "Traceback" not in r.output


def _broken_copy(src, dst, breaker):
    shutil.copytree(src, dst)
    breaker(dst)
    return dst


@pytest.mark.parametrize("breaker, message", [
    (lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 10), "safetensors"),
    (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").unlink(), "holds no weights"),
    (lambda d: shutil.rmtree(d / "scheduler"), "scheduler"),
    (lambda d: (d / "model_index.json").write_text("[1, 2]"), "JSON object"),
    (lambda d: (d / "model_index.json").write_text("{oops"), "not valid JSON"),
])
def test_cli_incomplete_or_corrupt_snapshots_fail_before_loading(dit_dir, tmp_path, monkeypatch, breaker, message):
    import emag.generate

    monkeypatch.setattr(emag.generate, "load_pipeline", lambda *a, **k: pytest.fail("weights were loaded"))
    model = _broken_copy(dit_dir, tmp_path / "m", breaker)
    r = CliRunner().invoke(cli, ["generate", "--model", str(model), "--class-label", "3", "--method", "cfg",
                                 "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_snapshot_check_covers_text_encoders(sd3_dir, tmp_path):
    from emag.loading import check_snapshot

    check_snapshot(sd3_dir)
    broken = _broken_copy(sd3_dir, tmp_path / "m", lambda d: [p.unlink() for p in (d / "text_encoder").glob("*.safetensors")])
    with pytest.raises(MissingWeightsError, match="text_encoder"):
        check_snapshot(broken)


def test_cli_output_folder_problems_come_before_any_work(dit_dir, tmp_path, monkeypatch):
    import emag.generate

    monkeypatch.setattr(emag.generate, "load_pipeline", lambda *a, **k: pytest.fail("weights were loaded"))
    args = ["generate", "--model", str(dit_dir), "--class-label", "3", "--method", "cfg"]
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    r = CliRunner().invoke(cli, args + ["--out", str(blocker / "sub")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "00000_seed123.png").write_bytes(b"")  # an image of another run
    r = CliRunner().invoke(cli, args + ["--out", str(other)])
    assert r.exit_code != 0 and "another run" in r.output


def test_a_term_whose_window_selects_no_step_is_an_error(dit_dir, tmp_path):
    r = CliRunner().invoke(cli, ["generate", "--model", str(dit_dir), "--class-label", "3", "--steps", "2",
                                 "--sampler", "default", "--method", "cfg,pag", "--param", "pag.layers=1",
                                 "--param", "pag.window=0.9,1", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "selects no step" in r.output and "Traceback" not in r.output


def test_plan_generation_takes_a_single_prompt_string(sd3_dir):
    from emag.generate import plan_generation

    plan = plan_generation(str(sd3_dir), prompts="a red fox", emag_overrides={"layers": "1"})
    assert plan.prompts == ["a red fox"]
    with pytest.raises(ValueError, match="dtype"):
        plan_generation(str(sd3_dir), prompts="a", dtype="float8", emag_overrides={"layers": "1"})


def test_cli_default_is_the_bundled_digits_model_offline(tmp_path):
    r = CliRunner().invoke(cli, ["generate", "--class-label", "3", "--class-label", "seven", "--num-images", "2",
                                 "--steps", "6", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert len(list(tmp_path.glob("0*.png"))) == 4 and (tmp_path / "grid.png").is_file()
    meta = read_png_params(tmp_path / "00002_seed2.png")
    assert meta["model"] == "bundled:digits" and meta["preset"] == "digits" and meta["condition"] == 7
    assert meta["emag"]["layers"] == "3,4" and meta["emag"]["ema_storage_used"] == "dense"
