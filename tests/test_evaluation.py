"""Evaluation at scale: protocols, per-sample seeds, sample folders (resume, refusal, damage), torchrun
sharding and scoring, on the bundled digits model and tiny saved models (CPU, offline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler
from PIL import Image

import emag
from emag import metrics as M
from emag.cli import cli
from emag.digits.classifier import features as digit_features
from emag.digits.classifier import predict as digit_predict
from emag.evaluation import FolderError, SampleFolder, eval_set, plan_sampling, run_sampling, sample_seed
from emag.evaluation.scoring import StreamingStats, score_folder
from emag.evaluation.seeds import sample_generators
from tiny_models import tiny_dit_pipeline

FAST = dict(num_inference_steps=4)  # few steps: these tests check plumbing, not quality


def digits_plan(n=20, batch=8, **kw):
    return plan_sampling(None, "digits", num_samples=n, batch_size=batch, **{**FAST, **kw})


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


# -- seeds and protocols --------------------------------------------------------------------------
def test_sample_seeds_are_fixed_distinct_and_in_range():
    seeds = {sample_seed(s, i) for s in range(4) for i in range(500)}
    assert len(seeds) == 2000  # no two (seed, index) pairs share a stream, not even (s, i+1) and (s+1, i)
    assert all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(0, 7) == sample_seed(0, 7)
    assert sample_seed(-1, 0) != sample_seed(1, 0)
    g = sample_generators(3, [5, 2])
    assert torch.equal(torch.randn(4, generator=g[1]), torch.randn(4, generator=torch.Generator().manual_seed(sample_seed(3, 2))))
    with pytest.raises(ValueError):
        sample_seed(0, -1)


def test_coco_protocol_takes_the_first_caption_of_each_image_in_file_order(tmp_path):
    data = {"images": [{"id": 1}, {"id": 2}, {"id": 3}],
            "annotations": [{"image_id": 2, "id": 10, "caption": "two a"}, {"image_id": 1, "id": 11, "caption": "one a"},
                            {"image_id": 2, "id": 12, "caption": "two b"}, {"image_id": 3, "id": 13, "caption": "three"}]}
    f = tmp_path / "captions_val2014.json"
    f.write_text(json.dumps(data))
    s = eval_set("coco2014", 2, str(f))
    assert s.conditions == ("two a", "one a") and s.text
    assert s.source["images_with_captions"] == 3 and len(s.source["sha256"]) == 64
    with pytest.raises(ValueError, match="captions for 3 images"):
        eval_set("coco2014", 4, str(f))
    with pytest.raises(ValueError, match="cocodataset.org"):
        eval_set("coco2014", 2, str(tmp_path / "missing.json"))


def test_label_protocols_are_balanced_and_prompts_cycle(tmp_path):
    s = eval_set("imagenet", 3000, num_classes=1000)
    assert s.conditions[:3] == (0, 1, 2) and s.conditions[1000] == 0
    assert np.bincount(s.conditions).tolist() == [3] * 1000
    with pytest.raises(ValueError, match="multiple of the 1000 classes"):
        eval_set("imagenet", 1500, num_classes=1000)
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n a dog \n")
    assert eval_set("prompts", 5, str(f)).conditions == ("a cat", "a dog", "a cat", "a dog", "a cat")
    with pytest.raises(ValueError, match="needs --source"):
        eval_set("prompts", 5)
    with pytest.raises(ValueError, match="Unknown protocol"):
        eval_set("cifar", 5)


def test_protocol_and_model_must_agree(tmp_path):
    with pytest.raises(ValueError, match="leave out --model"):
        plan_sampling("somewhere", "digits", num_samples=10)
    with pytest.raises(ValueError, match="needs --model"):
        plan_sampling(None, "imagenet", num_samples=1000)
    with pytest.raises(ValueError, match="multiple of the 10 classes"):
        plan_sampling(None, "digits", num_samples=15)
    with pytest.raises(ValueError, match="batch-size"):
        plan_sampling(None, "digits", num_samples=10, batch_size=0)


# -- per-sample noise -----------------------------------------------------------------------------
def test_ancestral_noise_is_drawn_per_sample_whatever_the_batch():
    """DDPM draws fresh noise at every step: with one generator per sample, a sample's trajectory does
    not depend on the other samples of its batch (CFG only: nothing batch-global)."""
    base = tiny_dit_pipeline(num_layers=2, scheduler=DDPMScheduler(num_train_timesteps=1000))
    pipe = emag.DiTEMAGPipeline(transformer=base.transformer, vae=base.vae, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=5, guidance=[emag.CFG(2.0)], noise_layout="samples", output_type="latent")
    both = pipe(class_labels=[1, 2], generator=sample_generators(0, [0, 1]), **kw).images
    alone = pipe(class_labels=[2], generator=sample_generators(0, [1]), **kw).images
    other = pipe(class_labels=[2], generator=sample_generators(0, [2]), **kw).images
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    assert (other - alone).abs().max() > 1e-2  # another seed really gives other noise


# -- sample folders -------------------------------------------------------------------------------
def test_sampling_writes_an_index_a_manifest_and_resumes(tmp_path):
    plan = digits_plan()
    out = tmp_path / "run"
    first = run_sampling(plan, out)
    assert (first.generated, first.already_done) == (20, 0)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["index"] for r in index] == list(range(20)) and [r["label"] for r in index] == [i % 10 for i in range(20)]
    assert all(r["seed"] == sample_seed(plan.generation.seed, r["index"]) and r["config_hash"] == plan.config_hash
               for r in index)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config_hash"] == plan.config_hash and manifest["versions"]["torch"] == torch.__version__
    assert manifest["config"]["batch_size"] == 8 and len(manifest["config"]["model"]) == 64
    before = pngs(out)
    assert len(before) == 20
    again = run_sampling(plan, out)
    assert (again.generated, again.already_done) == (0, 20)
    (out / "000005.png").unlink()
    third = run_sampling(plan, out)
    assert third.generated == 1 and pngs(out) == before  # the lost sample comes back byte for byte


def test_a_folder_of_another_configuration_is_refused_before_any_work(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_sampling(digits_plan(n=10, batch=10), out)
    other = digits_plan(n=10, batch=10, emag_overrides={"scale": 3.0})
    monkeypatch.setattr("emag.evaluation.sampling.prepare_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(FolderError, match="another configuration.*differ in: .*emag"):
        run_sampling(other, out)
    with pytest.raises(FolderError, match=r"another configuration.*differ in: batch_size\.$"):
        run_sampling(digits_plan(n=10, batch=5), out)


def test_damaged_and_foreign_files_are_detected(tmp_path):
    out = tmp_path / "run"
    plan = digits_plan(n=10, batch=10)
    run_sampling(plan, out)
    folder = SampleFolder(out)
    data = (out / "000003.png").read_bytes()
    (out / "000003.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(FolderError, match="000003.png is truncated"):
        run_sampling(plan, out)
    with pytest.raises(FolderError, match="truncated"):
        score_folder(out)
    (out / "000003.png").write_bytes(data)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FolderError, match="not this run's samples: notes.txt"):
        run_sampling(plan, out)
    (out / "notes.txt").unlink()
    (out / "000001.png").write_bytes((out / "000002.png").read_bytes())  # a sample under another index
    with pytest.raises(FolderError, match="not sample 1"):
        run_sampling(plan, out)
    assert folder.extra_pngs(10) == []


def test_leftover_temporary_files_of_a_killed_run_are_removed(tmp_path):
    out = tmp_path / "run"
    plan = digits_plan(n=10, batch=10)
    run_sampling(plan, out)
    tmp = out / ".000004.png.123.0123456789abcdef.tmp"
    tmp.write_bytes(b"\x89PNG half")
    assert run_sampling(plan, out).generated == 0
    assert not tmp.exists()


# -- scoring ---------------------------------------------------------------------------------------
def test_streaming_statistics_and_frechet_distance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    whole = StreamingStats(6)
    whole.add(x)
    parts = StreamingStats(6)
    for chunk in np.array_split(x, 7):
        parts.add(chunk)
    mu, cov = parts.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False), atol=1e-12)
    mu_w, cov_w = whole.mean_cov()
    assert abs(M.frechet_distance(mu_w, cov_w, mu, cov)) < 1e-8  # a set against itself: 0
    shifted = StreamingStats(6)
    shifted.add(x + 0.5)
    assert M.frechet_distance(mu_w, cov_w, *shifted.mean_cov()) == pytest.approx(6 * 0.25, rel=1e-6)


def test_digits_sample_then_score_matches_a_direct_computation(tmp_path):
    out = tmp_path / "run"
    run_sampling(digits_plan(n=20, batch=10), out)
    results = score_folder(out, cache_dir=tmp_path / "cache")
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == results["metrics"] and saved["num_samples"] == 20
    assert saved["extractor"]["name"] == "digits-classifier" and len(saved["extractor"]["weights_sha256"]) == 64
    assert saved["config"]["method"] == "emag" and saved["reference"]["count"] == 1797
    assert "| emag |" in (out / "results.md").read_text()
    # independently: the classifier's features of the PNGs and of the real digits, emag.metrics directly
    from emag.digits.data import MAX_INTENSITY, load_arrays

    images = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(20)])
    fake = digit_features(torch.from_numpy(images[:, None].astype(np.float32) / 255.0), value_range=(0.0, 1.0))
    real_u8 = np.rint(load_arrays()[0] / MAX_INTENSITY * 255.0)
    real = digit_features(torch.from_numpy(real_u8[:, None].astype(np.float32) / 255.0), value_range=(0.0, 1.0))
    assert results["metrics"]["fd"] == pytest.approx(M.frechet_distance_from_features(real, fake), rel=1e-6)
    for k, v in M.prdc(real, fake, k=5).items():
        assert results["metrics"][k] == pytest.approx(v, abs=1e-12)
    labels = torch.tensor([i % 10 for i in range(20)])
    expected_acc = float((digit_predict(torch.from_numpy(images[:, None] / 255.0), value_range=(0.0, 1.0)) == labels).float().mean())
    assert results["metrics"]["accuracy"] == pytest.approx(expected_acc)
    # the reference was cached, and the cache is used
    cached = list((tmp_path / "cache").glob("reference-digits-classifier-*.npz"))
    assert len(cached) == 1
    again = score_folder(out, cache_dir=tmp_path / "cache")
    assert again["metrics"] == results["metrics"] and again["reference"]["hash"] == results["reference"]["hash"]


def test_scoring_refuses_an_unfinished_folder(tmp_path):
    out = tmp_path / "run"
    run_sampling(digits_plan(n=10, batch=10), out)
    (out / "000009.png").unlink()
    with pytest.raises(FolderError, match="1 of 10 samples are missing"):
        score_folder(out)


def test_imagenet_protocol_writes_the_adm_npz(tmp_path):
    model = tmp_path / "dit"
    tiny_dit_pipeline(num_layers=2).save_pretrained(model)
    plan = plan_sampling(str(model), "imagenet", num_samples=1000, batch_size=500, method="cfg", guidance_scale=1.5,
                         num_inference_steps=1)
    assert plan.samples.conditions[999] == 999
    out = tmp_path / "run"
    run_sampling(plan, out)
    with np.load(out / "samples.npz") as z:
        arr = z["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape[0] == 1000 and arr.shape[3] == 3
    assert np.array_equal(arr[17], SampleFolder(out).load(17))


# -- the command line, torchrun, SIGKILL ----------------------------------------------------------
def test_cli_sample_and_score_on_the_bundled_model(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["sample", "--protocol", "digits", "--num-samples", "10", "--batch-size", "5",
                                 "--steps", "4", "--method", "cfg", "--cfg", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "10 sample(s) generated" in r.output
    r = CliRunner().invoke(cli, ["score", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    assert "| cfg | CFG 2.0 | 10 |" in r.output
    r = CliRunner().invoke(cli, ["sample", "--protocol", "imagenet", "--num-samples", "10", "--out", str(out)])
    assert r.exit_code != 0 and "needs --model" in r.output and "Traceback" not in r.output


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("WORLD_SIZE", None)
    return env


SAMPLE_ARGS = ["sample", "--protocol", "digits", "--num-samples", "40", "--batch-size", "8", "--steps", "4"]


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on Linux/macOS")
def test_torchrun_two_processes_give_the_same_files_and_scores_as_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "emag"]
    subprocess.run([sys.executable, "-m", "emag", *SAMPLE_ARGS, "--out", str(one)], env=_env(), check=True,
                   capture_output=True, timeout=180)
    r = subprocess.run([*torchrun, *SAMPLE_ARGS, "--out", str(two)], env=_env(), capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "over 2 process(es)" in r.stderr
    assert pngs(one) == pngs(two) and len(pngs(one)) == 40
    cache = ["--cache-dir", str(tmp_path / "cache")]
    subprocess.run([sys.executable, "-m", "emag", "score", str(one), *cache], env=_env(), check=True,
                   capture_output=True, timeout=180)
    r = subprocess.run([*torchrun, "score", str(two), *cache], env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    a = json.loads((one / "results.json").read_text())
    b = json.loads((two / "results.json").read_text())
    assert b["processes"] == 2
    for k, v in a["metrics"].items():
        assert b["metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_a_run_killed_mid_batch_resumes_with_every_index_exactly_once(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "emag", *SAMPLE_ARGS, "--out", str(ref)], env=_env(), check=True,
                   capture_output=True, timeout=180)
    proc = subprocess.Popen([sys.executable, "-m", "emag", *SAMPLE_ARGS, "--out", str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("0*.png"))) < 12:  # inside the second batch
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("0*.png")))
    assert 0 < done < 40, "the run was not killed mid-way; the test did not test anything"
    r = subprocess.run([sys.executable, "-m", "emag", *SAMPLE_ARGS, "--out", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{40 - done} sample(s) generated" in r.stderr
    assert pngs(out) == pngs(ref)  # every index exactly once, each identical to an uninterrupted run
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


# -- a text protocol end to end, with small random networks through the extractor interface -----
class RandomFeatures:
    """A small random feature network (the interface of emag.evaluation.features.Extractor)."""

    name = "random-conv"
    fd_metric = "fid"

    def __init__(self):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                       torch.nn.Flatten())

    def fingerprint(self):
        return "0" * 64

    @torch.no_grad()
    def __call__(self, images, conditions=None):
        x = torch.from_numpy(np.asarray(images)).float().permute(0, 3, 1, 2) / 255.0
        return {"features": self.net(x).double().numpy()}


class FakeHPS:
    """An image-text scorer: a fixed function of the prompt's length and the image's mean."""

    name = kind = "hps"

    def __init__(self):
        self.seen = []

    def __call__(self, images, conditions):
        self.seen += list(conditions)
        return {"hps": np.array([len(c) / 100 + float(np.mean(im)) / 1e4 for im, c in zip(images, conditions)])}

    def describe(self):
        return {"name": "hps", "model": "fake", "weights_sha256": "f" * 64}


def test_a_prompt_protocol_end_to_end_with_injected_networks(tmp_path):
    from tiny_models import tiny_sd3_text_pipeline

    model = tmp_path / "sd3"
    tiny_sd3_text_pipeline(tmp_path / "build", num_layers=2).save_pretrained(model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse at dusk\na bowl of fruit\n")
    plan = plan_sampling(str(model), "prompts", source=str(prompts), num_samples=6, batch_size=3, method="cfg",
                         guidance_scale=4.0, num_inference_steps=2, negative_prompt="blurry")
    assert plan.config["negative_prompt"] == "blurry"
    out = tmp_path / "run"
    run_sampling(plan, out)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in index] == ["a red fox", "a lighthouse at dusk", "a bowl of fruit"] * 2
    ref = tmp_path / "real"
    ref.mkdir()
    for i in range(6):  # a "real" folder: the samples themselves, brightened
        im = np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB"))
        Image.fromarray(np.clip(im.astype(int) + 40, 0, 255).astype(np.uint8)).save(ref / f"{i}.png")
    hps = FakeHPS()
    res = score_folder(out, extractor=RandomFeatures(), scorers=(hps,), reference=ref, reference_size=16, k=2)
    assert hps.seen == [r["prompt"] for r in index]  # each image scored against its own prompt
    expected = [len(r["prompt"]) / 100 + float(np.mean(np.asarray(Image.open(out / f"{i:06d}.png")
                                                                   .convert("RGB")))) / 1e4 for i, r in enumerate(index)]
    assert res["metrics"]["hps"] == pytest.approx(100 * np.mean(expected))
    assert res["metrics"]["hps_median"] == pytest.approx(100 * np.median(expected))
    assert res["metrics"]["fid"] > 0 and {"precision", "recall"} <= set(res["metrics"])
    assert res["scorers"][0]["model"] == "fake" and res["config"]["protocol"] == "prompts"
    assert res["reference"]["policy"] == "centre crop to a square, Lanczos resize to 16x16"


def test_cli_score_of_an_imagenet_folder_names_what_is_missing_before_any_work(tmp_path, monkeypatch):
    model = tmp_path / "dit"
    tiny_dit_pipeline(num_layers=2).save_pretrained(model)
    out = tmp_path / "run"
    run_sampling(plan_sampling(str(model), "imagenet", num_samples=1000, batch_size=1000, method="cfg",
                               num_inference_steps=1), out)
    monkeypatch.setattr("emag.cli.score_folder", lambda *a, **k: pytest.fail("scored without its networks"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    r = CliRunner().invoke(cli, ["score", str(out)])
    assert r.exit_code != 0 and "needs --reference" in r.output and "VIRTUAL_imagenet256_labeled.npz" in r.output
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    r = CliRunner().invoke(cli, ["score", str(out), "--reference", str(tmp_path / "ref.npz"),
                                 "--weights-dir", str(tmp_path / "weights")])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert ("install the eval extra" in r.output  # without torch-fidelity
            or "weights-inception-2015-12-05-6726825d.pth was not found" in r.output)  # with it, without weights


def test_a_run_extends_to_more_samples_and_refuses_fewer(tmp_path):
    out = tmp_path / "run"
    run_sampling(digits_plan(n=20, batch=10), out)
    before = pngs(out)
    more = run_sampling(digits_plan(n=30, batch=10), out)  # N is not part of the configuration
    assert (more.generated, more.already_done) == (10, 20)
    after = pngs(out)
    assert len(after) == 30 and all(after[k] == v for k, v in before.items())
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 30
    assert len((out / "index.jsonl").read_text().splitlines()) == 30
    with pytest.raises(FolderError, match="beyond --num-samples 20"):
        run_sampling(digits_plan(n=20, batch=10), out)
