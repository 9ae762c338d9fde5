"""benchmarks/quality.py end to end in its reduced mode (every method, one scale, 20 samples)."""

import importlib.util
import json
import os

import pytest


def _load():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "quality.py")
    spec = importlib.util.spec_from_file_location("quality_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_benchmark_reduced_runs_and_resumes(tmp_path, capsys):
    pytest.importorskip("sklearn")
    q = _load()
    out = tmp_path / "quality.json"
    assert q.main(["--reduced", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    methods = {r["method"] for r in results.values()}
    assert {"none", "cfg", "emag-full", "emag-q", "emag+cfg", "apg", "cads+cfg", "emag+apg", "emag+cads", "pag+cfg",
            "seg+cfg", "sag+cfg", "erg", "s2+cfg", "slg+cfg"} <= methods
    for r in results.values():
        assert r["samples"] == 20 and 0.0 <= r["accuracy"] <= 1.0 and r["fd"] >= 0.0
    table = capsys.readouterr().out
    assert "| emag+cfg |" in table
    # a second run reuses every finished setting (resume): the file is unchanged
    before = out.read_text()
    assert q.main(["--reduced", "--out", str(out)]) == 0
    assert out.read_text() == before
