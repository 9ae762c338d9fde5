"""``emag demo``: the configuration lines, the comparison session on the bundled model and a tiny SD3
(identical noise, the command line's images, EMAG's trace, negatives, cancelling, clear errors), the
Gradio page's outputs, and a real headless Chromium driving the page (skipped, with the reason, when the
browser or Playwright is not installed; a screenshot is kept in tests/artifacts/)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from emag.cli import cli
from emag.demo.configs import parse_configuration, parse_configurations, presets
from emag.demo.session import Cancelled, DemoSession
from emag.families import DIT, FLUX, SANA
from emag.io import read_png_params

ARTIFACTS = Path(os.environ.get("EMAG_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return DemoSession(out_dir=tmp_path_factory.mktemp("demo"))


def test_configuration_lines():
    c = parse_configuration("CFG 7 + EMAG 1.5 layers=6-8 + pag 3")
    assert c.names == ("cfg", "emag", "pag") and c.cfg_scale() == 7.0
    assert c.params["emag"] == {"scale": "1.5", "layers": "6-8"} and c.params["pag"] == {"scale": "3"}
    assert parse_configuration("EMAG-Q 2").params == {"emag": {"variant": "q", "scale": "2"}}
    assert [x.text for x in parse_configurations("CFG 3\n\n# a comment\nCFG 3 + SEG 2  # blur")] == \
        ["CFG 3", "CFG 3 + SEG 2"]
    for bad, match in [("CFG 7 + FOO 2", "Unknown guidance method 'foo'"), ("CFG 7 +", "empty term"),
                       ("CFG seven", "neither a scale nor field=value"), ("CFG 7 + CFG 3", "appears twice"),
                       ("", "No method configuration")]:
        with pytest.raises(ValueError, match=match):
            parse_configurations(bad)
    assert "PAG 0" in presets(FLUX, 3.5, 1.5)["CFG vs EMAG"]  # distilled: no CFG term
    assert "EMAG-Q" in presets(SANA, 4.5, 1.5)["CFG vs EMAG"] and "EMAG full vs Q" not in presets(SANA, 4.5, 1.5)
    assert presets(DIT, 3, 2)["CFG vs EMAG"] == "CFG 3\nCFG 3 + EMAG 2"


def test_a_comparison_runs_every_line_on_the_same_noise_with_the_command_lines_images(session, tmp_path):
    results = session.compare("CFG 3\nCFG 3 + EMAG 2\nCFG 3 + PAG 3", "7", 4, 12)
    assert [r.label for r in results] == ["CFG 3", "CFG 3 + EMAG 2", "CFG 3 + PAG 3"]
    assert all(r.params["seed"] == 4 and r.params["condition"] == 7 for r in results)
    assert results[1].trace and any(row["apply"] for row in results[1].trace) and not results[0].trace
    assert all(r.negatives is not None for r in results)
    # the PNG carries the parameters, and equals what `emag generate` writes for the same settings
    assert read_png_params(results[1].png) == json.loads(json.dumps(results[1].params, default=str))
    out = tmp_path / "cli"
    r = CliRunner().invoke(cli, ["generate", "--method", "cfg,emag", "--cfg", "3", "--scale", "2", "--class-label", "7",
                                 "--seed", "4", "--steps", "12", "--num-images", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    with Image.open(out / "00000_seed4.png") as cli_image:
        assert np.array_equal(np.asarray(cli_image), np.asarray(results[1].image))
    # the same noise: the same settings give the same image in a later comparison too
    again = session.compare("CFG 3", "7", 4, 12)
    assert np.array_equal(np.asarray(again[0].image), np.asarray(results[0].image))


def test_bad_input_is_a_clear_error_before_any_pass_and_the_session_keeps_working(session):
    for lines, match in [("CFG 3 + EMAG 2 layers=40", r"layers=40.*out of range"),
                         ("CFG -1", "must be a finite number >= 0"),
                         ("CFG 3 + EMAG 2 apply_window=0.99,1.0", "selects none of the 5 sampling steps"),
                         ("CFG 3 + NOPE 1", "Unknown guidance method")]:
        with pytest.raises(ValueError, match=match):
            session.compare(lines, "1", 0, 5)
    assert len(session.compare("CFG 3", "1", 0, 5)) == 1


def test_a_run_can_be_cancelled_and_leaves_no_hook(session):
    seen = []

    def progress(fraction, text):
        seen.append(text)
        if len(seen) == 3:
            session.cancel.set()

    with pytest.raises(Cancelled):
        session.compare("CFG 3 + EMAG 2", "2", 0, 10, progress=progress)
    assert len(seen) == 3
    tr = session._pipe.transformer
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tr.modules())
    assert len(session.compare("CFG 3", "2", 0, 5)) == 1  # the next run starts afresh


def test_a_text_model_takes_prompt_and_size(tmp_path):
    from tiny_models import tiny_sd3_text_pipeline

    tiny_sd3_text_pipeline(tmp_path / "build", num_layers=4).save_pretrained(tmp_path / "model")
    s = DemoSession(str(tmp_path / "model"), out_dir=tmp_path / "out")
    assert s.text_conditioned and s.sized
    results = s.compare("CFG 4\nCFG 4 + EMAG 1.5 layers=1,2", "a cat", 0, 4, height=16, width=24)
    assert results[0].image.size == (24, 16) and results[1].trace
    with pytest.raises(ValueError, match="height=18"):
        s.compare("CFG 4", "a cat", 0, 4, height=18, width=16)


def test_the_page_outputs(session):
    from emag.demo.app import CELL, outputs_of

    gallery, plot, negatives, files, status = outputs_of(session.compare("CFG 3\nCFG 3 + EMAG 2", "3", 0, 8))
    assert len(gallery) == 2 and min(gallery[0][0].size) >= CELL and "CFG 3 + EMAG 2" in gallery[1][1]
    assert plot is not None and len(negatives) == 2 and all(Path(f).exists() for f in files)
    _, plot, _, _, status = outputs_of(session.compare("CFG 3", "3", 0, 8))
    assert plot is None and "No EMAG term ran" in status


def _browser():
    """(playwright's sync API, a Chromium executable) or a skip that says what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("BROWSER TEST NOT RUN: playwright is not installed (pip install 'emag[browser]')")
    pytest.importorskip("gradio", reason="BROWSER TEST NOT RUN: gradio is not installed (pip install 'emag[demo]')")
    exe = os.environ.get("EMAG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("BROWSER TEST NOT RUN: no Chromium executable (apt-get install chromium, or set EMAG_CHROMIUM)")
    return sync_playwright, exe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_page_in_a_real_browser(session):
    sync_playwright, exe = _browser()
    from emag.demo.app import launch

    port = _free_port()
    app = launch(session, port=port, block=False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("#configs textarea")
            page.get_by_role("button", name="CFG, EMAG and perturbations").click()  # a preset, one click
            page.wait_for_function("document.querySelector('#configs textarea').value.includes('CFG 3 + PAG 3')",
                                   timeout=30_000)
            page.fill("#configs textarea", "CFG 3\nCFG 3 + EMAG 2\nCFG 3 + PAG 3")
            page.click("#run")
            page.wait_for_function("document.querySelectorAll('#images img').length >= 3", timeout=180_000)
            page.wait_for_selector("#plot img, #plot svg", timeout=60_000)
            page.wait_for_selector("#files a, #files button, #files td", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)
            # an invalid scale: the library's message in the page, the earlier results stay
            page.fill("#configs textarea", "CFG -1")
            page.click("#run")
            page.wait_for_selector("text=must be a finite number >= 0", timeout=60_000)
            assert page.locator("#images img").count() >= 3
            page.screenshot(path=str(ARTIFACTS / "demo_error.png"), full_page=True)
            # and the page keeps working
            page.fill("#configs textarea", "CFG 3 + SEG 2")
            page.click("#run")
            page.wait_for_function("document.querySelectorAll('#images img').length == 1", timeout=120_000)
            browser.close()
    finally:
        app.close()
    assert (ARTIFACTS / "demo.png").stat().st_size > 10_000


def test_emag_demo_without_gradio_is_a_clear_error(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio":
            raise ImportError("no gradio")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    r = CliRunner().invoke(cli, ["demo"])
    assert r.exit_code != 0 and "pip install 'emag[demo]'" in r.output
