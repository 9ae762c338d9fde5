"""emag sweep (a resumable grid) and emag report (tables, Pareto frontiers, matched guidance, plots)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from emag.cli import cli
from emag.evaluation.report import load_rows, matched_guidance, operating_point, pareto, table_csv, table_markdown, write_report
from emag.evaluation.sweep import Point, parse_grid, plan_sweep, run_sweep


def test_grids_multiply_their_fields_and_check_them():
    pts = parse_grid("cfg,emag: cfg=2,3; emag.scale=1,2")
    assert [p.values for p in pts] == [(("cfg", "2"), ("emag.scale", "1")), (("cfg", "2"), ("emag.scale", "2")),
                                       (("cfg", "3"), ("emag.scale", "1")), (("cfg", "3"), ("emag.scale", "2"))]
    assert pts[1].name == "cfg+emag_cfg-2_emag.scale-2"
    kw = pts[1].plan_kwargs({"method_params": {"emag": {"beta": "0.9"}, "pag": {"scale": "3"}}})
    assert kw["guidance_scale"] == 2.0 and kw["method_params"] == {"emag": {"beta": "0.9", "scale": "2"}}
    assert parse_grid("cfg") == [Point("cfg")]
    for bad, msg in [("", "methods first"), ("cfg:scale=1", "METHOD.FIELD"), ("cfg:pag.scale=1", "not in"),
                     ("cfg:cfg=", "no values")]:
        with pytest.raises(ValueError, match=msg):
            parse_grid(bad)


def test_a_point_listed_twice_is_refused():
    with pytest.raises(ValueError, match="listed twice"):
        plan_sweep(["cfg:cfg=2", "cfg:cfg=2.0"], None, "digits", num_samples=10, num_inference_steps=2)
    with pytest.raises(ValueError, match="Grid point cfg_cfg--1"):
        plan_sweep(["cfg:cfg=-1"], None, "digits", num_samples=10)


def test_a_sweep_resumes_without_sampling_or_scoring_again(tmp_path, monkeypatch):
    plan = plan_sweep(["cfg:cfg=1,3", "cfg,emag:emag.scale=2"], None, "digits", num_samples=20, batch_size=10,
                      num_inference_steps=3)
    rows = run_sweep(plan, tmp_path / "sw", cache_dir=tmp_path / "cache")
    assert [r["point"] for r in rows] == ["cfg_cfg-1", "cfg_cfg-3", "cfg+emag_emag.scale-2"]
    assert rows[0]["metrics"]["fd"] != rows[1]["metrics"]["fd"]  # the points really differ
    assert "diversity" in rows[0]["metrics"]  # two samples per class
    def no_scoring(*args, **kwargs):
        raise RuntimeError("scored again")

    monkeypatch.setattr("emag.evaluation.sweep.score_folder", no_scoring)
    monkeypatch.setattr("emag.evaluation.sampling.prepare_pipeline", lambda *a, **k: pytest.fail("sampled again"))
    again = run_sweep(plan, tmp_path / "sw", cache_dir=tmp_path / "cache")
    assert [r["metrics"] for r in again] == [r["metrics"] for r in rows]
    listed = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["point"] for r in listed] == [r["point"] for r in rows]
    with pytest.raises(RuntimeError, match="scored again"):  # another k: stale scores are recomputed
        run_sweep(plan, tmp_path / "sw", cache_dir=tmp_path / "cache", k=3)


def _result(folder: Path, method: str, scale: float, fd: float, quality: float) -> Path:
    folder.mkdir(parents=True)
    guidance = [{"method": "CFG", "scale": scale if method == "cfg" else 2.0}]
    if method != "cfg":
        guidance.append({"method": "EMAG", "scale": scale})
    (folder / "results.json").write_text(json.dumps({
        "config": {"method": method, "guidance": guidance, "guidance_scale": guidance[0]["scale"]},
        "metrics": {"fd": fd, "hps": quality}}))
    return folder


def test_report_marks_the_best_finds_frontiers_and_matches_guidance(tmp_path):
    pts = [("cfg", 1, 10.0, 0.20), ("cfg", 2, 12.0, 0.30), ("cfg", 3, 20.0, 0.40),
           ("emag", 1, 9.0, 0.25), ("emag", 2, 11.0, 0.35), ("emag", 3, 11.5, 0.33)]
    folders = [_result(tmp_path / f"{m}{s}", m, s, fd, q) for m, s, fd, q in pts]
    rows = load_rows(folders)
    assert [(r.method, r.scale) for r in rows][:3] == [("cfg", 1.0), ("cfg", 2.0), ("cfg", 3.0)]
    md = table_markdown(rows)
    assert "| emag1 | emag | 1 | **9.0000** |" in md and "**0.4000**" in md  # fd: lowest; hps: highest
    assert "cfg3,cfg,3.0,20.0,0.4,hps" in table_csv(rows).replace("\r", "")
    assert pareto([(9.0, 0.25), (11.0, 0.35), (11.5, 0.33)]) == [0, 1]  # the third is beaten by the second
    assert operating_point([(9.0, 0.25), (11.0, 0.35)], (9.0, 20.0, 0.2, 0.4)) == 1
    matched = {m["method"]: m for m in matched_guidance(rows, "fd", "hps")}
    assert matched["emag"]["point"] == "emag2"
    assert matched["emag"]["cfg_fd_at_same_hps"] == pytest.approx(12.0 + (20.0 - 12.0) * 0.5)  # hps 0.35 on CFG
    report = write_report(folders, tmp_path / "report")
    assert {Path(p).suffix for p in report["plots"]} == {".png", ".svg"}
    assert any("fd_hps_plane" in p for p in report["plots"])
    assert "| emag | emag2 | 2 | 11.0000 | 0.3500 | 16.0000 |" in (tmp_path / "report" / "matched_guidance.md").read_text()


def test_cli_sweep_then_report(tmp_path):
    r = CliRunner().invoke(cli, ["sweep", "--protocol", "digits", "--num-samples", "10", "--batch-size", "10",
                                 "--steps", "2", "--grid", "cfg:cfg=1,2", "--cache-dir", str(tmp_path / "c"),
                                 "--out", str(tmp_path / "sw")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "sw"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "| cfg_cfg-2 | cfg | 2 |" in r.output and (tmp_path / "rep" / "fd_precision_plane.svg").exists()
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "c"), "--out", str(tmp_path / "rep2")])
    assert r.exit_code != 0 and "no results.json" in r.output
    (tmp_path / "notes.json").write_text("not json")
    r = CliRunner().invoke(cli, ["report", str(tmp_path / "notes.json"), "--out", str(tmp_path / "rep3")])
    assert r.exit_code != 0 and "notes.json is not an emag results file" in r.output and "Traceback" not in r.output
