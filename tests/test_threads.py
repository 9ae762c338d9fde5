"""The CPU thread count of a generation run: one thread for small models, the user's choice otherwise."""

import pytest
import torch
from click.testing import CliRunner

from emag.cli import cli
from emag.digits import bundled_model_path, load_digits_pipeline
from emag.generate import generate, plan_generation
from emag.threads import SMALL_WORK, choose_threads, torch_threads, transformer_parameters


def test_parameters_counted_from_the_headers_equal_the_loaded_model():
    pipe = load_digits_pipeline()
    assert transformer_parameters(bundled_model_path()) == sum(p.numel() for p in pipe.transformer.parameters())


@pytest.fixture
def no_thread_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)


def test_the_choice(no_thread_env, monkeypatch):
    small, tokens = 1_000_000, int(SMALL_WORK // 1_000_000) - 1  # parameters x tokens just below the bound
    assert choose_threads("cpu", None, small, tokens)[0] == 1
    assert "small model" in choose_threads("cpu", None, small, tokens)[1]
    assert choose_threads("cpu", None, small, tokens + 1)[0] is None  # torch's default
    assert choose_threads("cpu", None, None, tokens)[0] is None  # unknown size (no safetensors)
    assert choose_threads("cpu", 3, small, tokens) == (3, "3 CPU thread(s), as asked (--threads)")
    assert choose_threads("cuda", None, small, tokens)[0] is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads("cpu", None, small, tokens)[0] is None  # the user's environment wins
    assert "OMP_NUM_THREADS=2" in choose_threads("cpu", None, small, tokens)[1]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="--threads"):
            choose_threads("cpu", bad, small, tokens)


def test_torch_threads_restores_the_setting_also_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with torch_threads(before + 1):
            assert torch.get_num_threads() == before + 1
            raise RuntimeError
    assert torch.get_num_threads() == before


class Recorder:
    """A pipeline that records the thread count each call ran with."""

    def __init__(self, pipe):
        self.pipe, self.seen = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.seen.append(torch.get_num_threads())
        return self.pipe(*args, **kwargs)


@pytest.mark.parametrize("asked, expected", [(None, 1), (2, 2)])
def test_the_bundled_job_runs_with_the_chosen_threads_and_restores_them(no_thread_env, asked, expected):
    plan = plan_generation(None, class_labels=["3"], num_inference_steps=2, threads=asked)
    assert plan.threads == expected
    rec = Recorder(load_digits_pipeline())
    outside = 3
    with torch_threads(outside):
        for _ in generate(plan, pipe=rec):
            assert torch.get_num_threads() == outside  # the caller's setting between images
    assert rec.seen == [expected] * len(plan.jobs)


def test_the_cli_says_how_many_threads_it_uses(no_thread_env, tmp_path):
    r = CliRunner().invoke(cli, ["generate", "--class-label", "3", "--steps", "2", "--num-images", "1",
                                 "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "1 CPU thread: small model (0.8 M parameters, 64 image tokens)" in r.output
    r = CliRunner().invoke(cli, ["generate", "--class-label", "3", "--steps", "2", "--num-images", "1",
                                 "--threads", "0", "--out", str(tmp_path / "b")])
    assert r.exit_code != 0 and "--threads" in r.output
