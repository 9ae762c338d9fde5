"""What a new user meets first: missing weights (CLI and Python), the help's examples, the install section,
the output files' modes, and an interrupted run resumed (issue 13, "Promises of the README")."""

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import emag
from emag.cli import EXAMPLES, cli
from emag.io import read_png_params, save_grid, save_png
from emag.families import hub_models
from tiny_models import tiny_dit_pipeline

ROOT = Path(__file__).resolve().parents[1]
SD3_ID = "stabilityai/stable-diffusion-3-medium-diffusers"


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dit") / "model"
    tiny_dit_pipeline(num_layers=4).save_pretrained(d)
    return d


@pytest.fixture
def no_download(monkeypatch):
    """A download attempt fails as it does offline (and never reaches the network, whatever HF_HUB_OFFLINE says);
    a cache look-up (local_files_only=True) finds nothing."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake(repo_id, *args, local_files_only=False, **kwargs):
        calls.append((repo_id, local_files_only, kwargs.get("local_dir")))
        if local_files_only:
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder on the local disk.")
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known\n"
                                      "An error happened while trying to locate the files on the Hub.")

    monkeypatch.setattr(emag.loading, "snapshot_download", fake)
    return calls


def _generate(*args):
    return CliRunner().invoke(cli, ["generate", *args])


# -- missing weights: the command line ---------------------------------------------------------------


@pytest.mark.parametrize("folder, hub_id, gated", [
    ("./models/stable-diffusion-3-medium-diffusers", SD3_ID, True),
    ("./models/DiT-XL-2-256", "facebook/DiT-XL-2-256", False),
    ("./models/DiT-XL-2-512", "facebook/DiT-XL-2-512", False),
])
def test_cli_missing_known_folder_prints_the_readme_download_command(folder, hub_id, gated, tmp_path, monkeypatch,
                                                                     no_download):
    monkeypatch.chdir(tmp_path)
    r = _generate("--model", folder, "--prompt", "x")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert f"Model folder {folder} does not exist" in r.output
    assert f"hf download {hub_id} --local-dir {folder}\n" in r.output
    assert ("hf auth login" in r.output) == gated and ("gated" in r.output) == gated
    assert f"--model {folder}" in r.output and "add --download" in r.output
    assert no_download == []  # nothing downloaded, not even looked up: a path is not a hub id
    # the README's own commands for this folder are the ones printed
    if "DiT-XL-2-512" not in folder:
        assert f"hf download {hub_id} --local-dir {folder}\n" in (ROOT / "README.md").read_text()


def test_cli_missing_unknown_folder_says_what_is_expected(tmp_path, monkeypatch, no_download):
    monkeypatch.chdir(tmp_path)
    r = _generate("--model", "./models/sd3-medium", "--prompt", "x")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "Model folder ./models/sd3-medium does not exist" in r.output
    assert "diffusers pipeline folder" in r.output and "model_index.json" in r.output and "hub id" in r.output
    assert re.search(r"hf download \S+/\S+ --local-dir ./models/\S+", r.output)
    for hub_id in hub_models():  # the known models, from their one home (the families)
        assert hub_id in r.output
    r = _generate("--model", "./models/sd3-medium", "--prompt", "x", "--download")
    assert r.exit_code != 0 and "add --download" not in r.output and no_download == []


def test_cli_hub_id_not_cached_prints_the_download_command(tmp_path, monkeypatch, no_download):
    monkeypatch.chdir(tmp_path)
    r = _generate("--model", SD3_ID, "--prompt", "x")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "not in the Hugging Face cache" in r.output and "nothing is downloaded without --download" in r.output
    assert f"hf download {SD3_ID} --local-dir ./models/stable-diffusion-3-medium-diffusers\n" in r.output
    assert "hf auth login" in r.output
    assert no_download == [(SD3_ID, True, None)]  # a cache look-up only


@pytest.mark.parametrize("model", [SD3_ID, "./models/stable-diffusion-3-medium-diffusers"])
def test_cli_failed_download_says_it_was_attempted_and_why(model, tmp_path, monkeypatch, no_download):
    monkeypatch.chdir(tmp_path)
    r = _generate("--model", model, "--prompt", "x", "--download")
    assert r.exit_code != 0 and "Traceback" not in r.output
    out = r.output.strip()
    assert "was attempted and failed: LocalEntryNotFoundError: Got: ConnectError: [Errno -2] Name or service not known" in out
    assert "An error happened" not in out  # the first line of the reason only
    assert "allow downloading with --download" not in out and "add --download" not in out
    assert not out.endswith("--download.") and "hf download" in out and "hf auth login" in out
    assert no_download[-1][1] is False  # a real attempt
    if model.startswith("./"):  # a known folder name: downloaded into that folder
        assert no_download[-1][0] == SD3_ID and Path(no_download[-1][2]) == Path(model)
        assert not Path(model).exists()


# -- missing weights: Python ------------------------------------------------------------------------


def _no_chain(exc):
    return exc.__cause__ is None and (exc.__suppress_context__ or exc.__context__ is None)


@pytest.fixture
def diffusers_not_called(monkeypatch):
    from diffusers import DiffusionPipeline

    def fail(cls, *a, **k):
        raise AssertionError("diffusers' from_pretrained was called")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(fail))


@pytest.mark.parametrize("cls_name, folder, hub_id", [
    ("StableDiffusion3EMAGPipeline", "./models/stable-diffusion-3-medium-diffusers", SD3_ID),
    ("DiTEMAGPipeline", "./models/DiT-XL-2-256", "facebook/DiT-XL-2-256"),
])
def test_from_pretrained_missing_folder_raises_missing_weights_with_the_command(
        cls_name, folder, hub_id, tmp_path, monkeypatch, diffusers_not_called):
    assert "MissingWeightsError" in emag.__all__ and emag.MissingWeightsError is emag.loading.MissingWeightsError
    monkeypatch.chdir(tmp_path)
    cls = getattr(emag, cls_name)
    with pytest.raises(emag.MissingWeightsError) as info:
        cls.from_pretrained(folder)
    msg = str(info.value)
    assert f"hf download {hub_id} --local-dir {folder}\n" in msg
    assert f"{cls_name}.from_pretrained('{folder}')" in msg
    assert "--model" not in msg and "--download" not in msg
    assert _no_chain(info.value)


@pytest.mark.parametrize("cls_name, hub_id, kwargs", [
    ("StableDiffusion3EMAGPipeline", SD3_ID, {}),
    ("DiTEMAGPipeline", "facebook/DiT-XL-2-256", {}),
    ("DiTEMAGPipeline", "facebook/DiT-XL-2-256", {"local_files_only": True}),
])
def test_from_pretrained_uncached_hub_id_offline_is_explained_before_diffusers(
        cls_name, hub_id, kwargs, monkeypatch, no_download, diffusers_not_called):
    import huggingface_hub.constants

    if not kwargs:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cls = getattr(emag, cls_name)
    with pytest.raises(emag.MissingWeightsError) as info:
        cls.from_pretrained(hub_id, **kwargs)
    msg = str(info.value)
    name = hub_id.split("/")[-1]
    assert "not in the Hugging Face cache" in msg
    assert f"hf download {hub_id} --local-dir ./models/{name}\n" in msg
    assert f"{cls_name}.from_pretrained('./models/{name}')" in msg
    assert ("hf auth login" in msg) == (hub_id == SD3_ID)
    assert "--model" not in msg and "--download" not in msg
    assert len(msg.splitlines()) < 10 and _no_chain(info.value)
    assert no_download == [(hub_id, True, None)]


def test_from_pretrained_online_leaves_the_download_to_diffusers(monkeypatch):
    """Online (no HF_HUB_OFFLINE, local_files_only=False) a hub id goes to diffusers unchanged; only its failure is
    explained, with the first line of the reason."""
    import huggingface_hub.constants
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    seen = []

    def fake(cls, model, **kwargs):
        seen.append((model, kwargs))
        if model == "facebook/DiT-XL-2-256":
            return "downloaded"
        try:
            raise ConnectionError("Name or service not known")
        except ConnectionError as cause:
            raise OSError(f"Cannot load model {model}: not cached\nsecond line") from cause

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(fake))
    assert emag.DiTEMAGPipeline.from_pretrained("facebook/DiT-XL-2-256", local_files_only=False) == "downloaded"
    assert seen == [("facebook/DiT-XL-2-256", {"local_files_only": False})]
    with pytest.raises(emag.MissingWeightsError) as info:
        emag.StableDiffusion3EMAGPipeline.from_pretrained(SD3_ID)
    msg = str(info.value)
    assert "attempted and failed: ConnectionError: Name or service not known" in msg and "second line" not in msg
    assert f"hf download {SD3_ID} --local-dir ./models/stable-diffusion-3-medium-diffusers" in msg
    assert "--model" not in msg and "--download" not in msg and _no_chain(info.value)


# -- the help's examples and the README -----------------------------------------------------------------


def test_help_examples_use_the_readme_paths_and_output_folders():
    readme = (ROOT / "README.md").read_text()
    help_text = CliRunner().invoke(cli, ["--help"]).output
    folders = set(re.findall(r"--model (\S+)", help_text))
    assert folders == {"./models/stable-diffusion-3-medium-diffusers", "./models/DiT-XL-2-256"}
    for folder in folders:  # every folder the examples use is one the README's download commands make
        assert re.search(rf"^hf download \S+ --local-dir {re.escape(folder)}$", readme, re.M), folder
    outs = re.findall(r"--out (\S+)", help_text)
    assert outs and all(o.startswith("outputs/") for o in outs), outs
    assert "emag generate --out outputs/" in readme
    # docs/cli-help.txt was regenerated with these examples
    doc = (ROOT / "docs" / "cli-help.txt").read_text()
    for line in EXAMPLES.splitlines():
        line = line.strip()
        if line and line != "\b":
            assert line in doc, line


def test_readme_install_gives_the_pinned_versions_a_venv_and_the_constraints():
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## The two commands")]
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "constraints.txt").read_text().split() if "==" in line)
    for name in ("diffusers", "transformers", "accelerate", "torch"):
        assert f"{name} {pins[name]}" in install, name
    assert "python -m venv .venv && . .venv/bin/activate" in install
    assert 'pip install -c .ci/constraints.txt -e ".[test]"' in install
    assert "huggingface-cli" not in readme  # not installed by huggingface_hub >= 1 (the pinned one): `hf`


# -- output files ------------------------------------------------------------------------------------


def _image():
    from PIL import Image

    return Image.new("RGB", (8, 8), (10, 20, 30))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_output_files_follow_the_umask(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        png = save_png(_image(), tmp_path / "00000_seed0.png", {"seed": 0})
        grid = save_grid([[_image(), _image()]], tmp_path / "grid.png")
    finally:
        os.umask(old)
    for path in (png, png.with_suffix(".json"), grid):
        assert (path.stat().st_mode & 0o777) == mode, (path.name, oct(path.stat().st_mode))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000_seed0.json", "00000_seed0.png", "grid.png"]


def test_a_failed_write_leaves_neither_a_temporary_file_nor_a_changed_target(tmp_path):
    from emag.io import atomic_write

    target = tmp_path / "a.json"
    target.write_text("old")

    def boom(tmp):
        Path(tmp).write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


# -- an interrupted run, resumed -----------------------------------------------------------------------


def _dit_args(model, out):
    return ["--model", str(model), "--class-label", "3", "--num-images", "2", "--layers", "1-2", "--steps", "3",
            "--sampler", "default", "--ema-window", "0,1", "--apply-window", "0.3,1", "--seed", "0", "--out", str(out)]


def _check_finished(out, n=2):
    pngs = sorted(out.glob("0*_seed*.png"))
    assert len(pngs) == n
    for png in pngs:
        assert json.loads(png.with_suffix(".json").read_text()) == read_png_params(png)
    assert not list(out.glob(".*.tmp"))
    return pngs


def test_sigint_between_the_two_writes_then_resume_ends_complete(dit_dir, tmp_path, monkeypatch):
    import emag.io

    out = tmp_path / "out"
    real = emag.io.atomic_write
    writes = []

    def interrupted(path, write):
        writes.append(Path(path).name)
        if Path(path).name == "00001_seed1.png":  # the second image: its sidecar is written, then SIGINT
            raise KeyboardInterrupt
        return real(path, write)

    monkeypatch.setattr(emag.io, "atomic_write", interrupted)
    r = _generate(*_dit_args(dit_dir, out))
    assert r.exit_code != 0  # aborted
    assert writes == ["00000_seed0.json", "00000_seed0.png", "00001_seed1.json", "00001_seed1.png"]
    assert (out / "00001_seed1.json").is_file() and not (out / "00001_seed1.png").exists()
    monkeypatch.setattr(emag.io, "atomic_write", real)
    r = _generate(*_dit_args(dit_dir, out))
    assert r.exit_code == 0, r.output
    assert "1 image(s) already" in r.output
    _check_finished(out)


@pytest.mark.parametrize("damage", ["missing", "unreadable", "different"])
def test_resume_repairs_the_sidecar_of_a_finished_png(damage, dit_dir, tmp_path):
    """A PNG whose sidecar an interruption lost (the order of earlier versions) or damaged: the resumed run keeps
    the PNG (same parameters) and rewrites the sidecar from the PNG's embedded parameters."""
    out = tmp_path / "out"
    r = _generate(*_dit_args(dit_dir, out))
    assert r.exit_code == 0, r.output
    png = _check_finished(out)[1]
    image_bytes = png.read_bytes()
    side = png.with_suffix(".json")
    if damage == "missing":
        side.unlink()
    elif damage == "unreadable":
        side.write_text('{"seed": 1, "trunc')
    else:
        side.write_text(json.dumps({**read_png_params(png), "seed": 99}))
    r = _generate(*_dit_args(dit_dir, out))
    assert r.exit_code == 0, r.output
    assert "2 image(s) already" in r.output
    _check_finished(out)
    assert png.read_bytes() == image_bytes


def test_a_finished_png_of_other_parameters_is_not_repaired(dit_dir, tmp_path):
    out = tmp_path / "out"
    assert _generate(*_dit_args(dit_dir, out)).exit_code == 0
    side = out / "00000_seed0.json"
    side.unlink()
    r = _generate(*_dit_args(dit_dir, out), "--cfg", "2.5")
    assert r.exit_code != 0 and "other parameters" in r.output
    assert not side.exists()
