"""dser.report on run directories written by hand: pairing, numbers, files, left-out runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from dser.report import ReportError, collect, find_run_dirs, gain_matrix, write_report


def categorical(ua: float, wa: float | None = None) -> dict:
    return {"samples": 16, "ua": ua, "wa": ua if wa is None else wa, "macro_f1": ua, "confusion": [[1]]}


def dimensional(ccc: float) -> dict:
    return {"samples": 16, "ccc_valence": ccc, "ccc_arousal": ccc, "ccc_dominance": ccc, "ccc_mean": ccc}


def write_run(path: Path, stage: int, evals: dict | None, source: str | None = "acted",
              target: str | None = "natural", init_from: str | None = None, recorded: str | None = None,
              checkpoint: str | None = None, precision: str | None = "bf16") -> Path:
    """A run directory as the recipe leaves it: config.yaml, and metrics.json when finished
    (``precision=None``: as the recipe left them before it recorded the precision)."""
    path.mkdir(parents=True)
    config = {"name": path.name, "source": source, "target": target, "task": "categorical",
              "stage2": {"init_from": init_from}}
    meta = {"stage": stage, "config": config}
    if precision:
        meta["precision"] = {"name": precision, "reason": "auto: test", "requested": "auto"}
    (path / "config.yaml").write_text(yaml.safe_dump(meta))
    # a finished run's export holds a config.yaml too; it must not count as a run
    (path / "export").mkdir()
    (path / "export" / "config.yaml").write_text(yaml.safe_dump({"stage": stage, **config}))
    if checkpoint:
        (path / "checkpoints").mkdir()
        (path / "checkpoints" / "latest").write_text(checkpoint)
    if evals is not None:
        extra = {"precision": precision, "precision_reason": "auto: test"} if precision else {}
        (path / "metrics.json").write_text(json.dumps({
            "stage": stage, "run_dir": recorded or str(path), "init_from": init_from, "steps": 10,
            "config": config, "params": {}, "eval": evals, **extra}))
    return path


def test_one_pair_numbers_markdown_csv_and_heatmap(tmp_path):
    runs = tmp_path / "runs"
    s1 = write_run(runs / "s1", 1, {"acted": categorical(0.8, 0.82), "natural": categorical(0.4, 0.45)})
    s2 = write_run(runs / "s2", 2, {"acted": categorical(0.75, 0.77), "natural": categorical(0.6, 0.62)},
                   init_from=str(s1))
    rep = write_report(runs, tmp_path / "out")

    assert rep.metrics == ["ua", "wa"] and rep.gain_metric == "ua" and rep.left_out == []
    (row,) = rep.rows
    assert (row.source, row.target, row.stage1_run, row.stage2_run) == ("acted", "natural", s1, s2)
    v = row.values
    assert (v["stage1_source_ua"], v["stage1_source_wa"], v["stage1_target_ua"], v["stage1_target_wa"]) == \
        (0.8, 0.82, 0.4, 0.45)
    assert (v["stage2_source_ua"], v["stage2_source_wa"], v["stage2_target_ua"], v["stage2_target_wa"]) == \
        (0.75, 0.77, 0.6, 0.62)
    assert v["target_gain_ua"] == pytest.approx(0.2) and v["source_change_ua"] == pytest.approx(-0.05)

    md = (tmp_path / "out" / "report.md").read_text()
    assert "| acted | natural | 0.800 | 0.820 | 0.400 | 0.450 | 0.750 | 0.770 | 0.600 | 0.620 | +0.200 | -0.050 " \
           "| bf16 |" in md
    assert "![target-domain gain](target_gain.png)" in md and "Runs not in the table" not in md
    assert rep.table() in rep.text()

    (line,) = list(csv.DictReader((tmp_path / "out" / "report.csv").read_text().splitlines()))
    assert float(line["stage2_target_ua"]) == 0.6 and float(line["target_gain_ua"]) == pytest.approx(0.2)
    assert line["stage1_run"] == str(s1) and line["stage2_run"] == str(s2)
    assert line["stage1_precision"] == line["stage2_precision"] == "bf16"

    img = matplotlib.image.imread(tmp_path / "out" / "target_gain.png")
    assert img.ndim == 3 and min(img.shape[:2]) > 50
    assert set(rep.files) == {"markdown", "csv", "heatmap"}


def test_incomplete_failed_and_unpaired_runs_are_listed(tmp_path):
    runs = tmp_path / "runs"
    s1 = write_run(runs / "grid" / "s1", 1, {"acted": categorical(0.8), "natural": categorical(0.4)})
    write_run(runs / "grid" / "s2", 2, {"acted": categorical(0.7), "natural": categorical(0.5)}, init_from=str(s1))
    write_run(runs / "grid" / "running", 2, None, init_from=str(s1), checkpoint="step00000006")
    write_run(runs / "lonely-s1", 1, {"acted": categorical(0.9), "natural": categorical(0.3)})
    write_run(runs / "orphan-s2", 2, {"acted": categorical(0.7), "natural": categorical(0.5)},
              init_from=str(tmp_path / "nowhere"))
    broken = write_run(runs / "broken", 1, None)
    (broken / "metrics.json").write_text("{not json")
    write_run(runs / "no-target", 2, {"acted": categorical(0.7)}, target=None, init_from=str(s1))

    rep = write_report(runs)
    assert [(r.source, r.target) for r in rep.rows] == [("acted", "natural")]
    why = {x.run.name: x.reason for x in rep.left_out}
    assert set(why) == {"running", "lonely-s1", "orphan-s2", "broken", "no-target"}
    assert "no metrics.json" in why["running"] and "step00000006" in why["running"]
    assert "no finished stage-2 run" in why["lonely-s1"]
    assert "not found" in why["orphan-s2"] and "nowhere" in why["orphan-s2"]
    assert "unreadable" in why["broken"]
    assert "'target' is not set" in why["no-target"]
    md = (runs / "report.md").read_text()
    assert "## Runs not in the table" in md and "grid/running" in md and "step00000006" in md
    assert "runs not in the table (5)" in rep.text()


def test_run_dirs_are_outermost_and_skip_exports(tmp_path):
    a = write_run(tmp_path / "a", 1, {"acted": categorical(0.5)})
    b = write_run(tmp_path / "deep" / "er" / "b", 2, None)
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "config.yaml").write_text("name: x\n")
    assert find_run_dirs(tmp_path) == [a, b]


def test_dimensional_runs_report_ccc(tmp_path):
    s1 = write_run(tmp_path / "s1", 1, {"acted": dimensional(0.5), "natural": dimensional(0.2)})
    write_run(tmp_path / "s2", 2, {"acted": dimensional(0.45), "natural": dimensional(0.35)}, init_from=str(s1))
    rep = write_report(tmp_path)
    assert rep.metrics == ["ccc_mean"] and rep.gain_metric == "ccc_mean"
    assert rep.rows[0].values["target_gain_ccc_mean"] == pytest.approx(0.15)
    assert "S2 target CCC" in rep.table() and "UA" not in rep.table()
    assert (tmp_path / "target_gain.png").is_file()


def test_grid_heatmap_matrix_means_repeats_and_leaves_gaps(tmp_path):
    def pair(name, source, target, gain, seed=0):
        s1 = write_run(tmp_path / f"{name}-s1-{seed}", 1, {source: categorical(0.5), target: categorical(0.3)},
                       source=source, target=None)
        write_run(tmp_path / f"{name}-s2-{seed}", 2, {source: categorical(0.5), target: categorical(0.3 + gain)},
                  source=source, target=target, init_from=str(s1))

    pair("a", "crema-d", "msp-podcast", 0.10)
    pair("a", "crema-d", "msp-podcast", 0.20, seed=1)  # the same pair again: the cell is the mean
    pair("b", "crema-d", "iemocap", 0.05)
    pair("c", "ravdess", "msp-podcast", -0.02)
    rep = collect(tmp_path)
    assert len(rep.rows) == 4
    sources, targets, grid = gain_matrix(rep)
    assert sources == ["crema-d", "ravdess"] and targets == ["iemocap", "msp-podcast"]
    assert grid[0][0] == pytest.approx(0.05) and grid[0][1] == pytest.approx(0.15)
    assert math.isnan(grid[1][0]) and grid[1][1] == pytest.approx(-0.02)


def test_pairs_by_recorded_relative_path_from_another_directory(tmp_path, monkeypatch):
    # Jobs ran in `project/` with relative run dirs; the report runs from elsewhere.
    project = tmp_path / "project"
    write_run(project / "runs" / "g" / "stage1-x", 1, {"acted": categorical(0.5), "natural": categorical(0.2)},
              recorded="runs/g/stage1-x")
    write_run(project / "runs" / "g" / "stage2-x", 2, {"acted": categorical(0.4), "natural": categorical(0.3)},
              init_from="runs/g/stage1-x", recorded="runs/g/stage2-x")
    monkeypatch.chdir(tmp_path)
    rep = collect(Path("project/runs/g"))
    assert len(rep.rows) == 1 and rep.left_out == []
    assert rep.rows[0].values["target_gain_ua"] == pytest.approx(0.1)


def test_stage1_outside_runs_dir_is_read_from_disk(tmp_path):
    s1 = write_run(tmp_path / "elsewhere" / "s1", 1, {"acted": categorical(0.5), "natural": categorical(0.2)})
    write_run(tmp_path / "runs" / "s2", 2, {"acted": categorical(0.4), "natural": categorical(0.3)},
              init_from=str(s1))
    rep = collect(tmp_path / "runs")
    assert len(rep.rows) == 1 and rep.rows[0].stage1_run == s1


def test_missing_or_empty_runs_dir_is_one_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no such directory"):
        write_report(tmp_path / "nope")
    with pytest.raises(ReportError, match="no run directories"):
        write_report(tmp_path)


def test_only_unfinished_runs_write_no_heatmap(tmp_path):
    write_run(tmp_path / "s1", 1, None)
    rep = write_report(tmp_path)
    assert rep.rows == [] and "heatmap" not in rep.files and not (tmp_path / "target_gain.png").exists()
    assert "No finished source -> target pair" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.csv").read_text().startswith("source,target,")


def test_same_recorded_path_in_two_projects_pairs_within_each(tmp_path, monkeypatch):
    # Two projects ran the same grid with the same relative run dirs; one report over both.
    for name, gain in (("p1", 0.1), ("p2", 0.3)):
        root = tmp_path / name
        write_run(root / "runs" / "stage1-x", 1, {"acted": categorical(0.5), "natural": categorical(0.2)},
                  recorded="runs/stage1-x")
        write_run(root / "runs" / "stage2-x", 2, {"acted": categorical(0.4), "natural": categorical(0.2 + gain)},
                  init_from="runs/stage1-x", recorded="runs/stage2-x")
    monkeypatch.chdir(tmp_path)
    rep = collect(tmp_path)
    got = {r.stage2_run.parent.parent.name: (r.stage1_run.parent.parent.name, r.values["target_gain_ua"])
           for r in rep.rows}
    assert got["p1"][0] == "p1" and got["p1"][1] == pytest.approx(0.1)
    assert got["p2"][0] == "p2" and got["p2"][1] == pytest.approx(0.3)
    assert rep.left_out == []


def test_the_precision_of_every_run_is_shown(tmp_path):
    runs = tmp_path / "runs"
    s1 = write_run(runs / "s1", 1, {"acted": categorical(0.8), "natural": categorical(0.4)}, precision="bf16")
    write_run(runs / "s2", 2, {"acted": categorical(0.7), "natural": categorical(0.5)}, init_from=str(s1),
              precision="fp32")
    old = write_run(runs / "old1", 1, {"acted": categorical(0.8), "natural": categorical(0.4)}, precision=None)
    write_run(runs / "old2", 2, {"acted": categorical(0.7), "natural": categorical(0.5)}, init_from=str(old),
              precision=None)
    write_run(runs / "running", 1, None, checkpoint="step00000004", precision="fp32")
    rep = write_report(runs)
    assert [r.precision() for r in rep.rows] == ["?", "bf16 -> fp32"]  # rows sorted by run; old runs say nothing
    assert "| bf16 -> fp32 | s1 -> s2 |" in rep.table()
    lines = list(csv.DictReader((runs / "report.csv").read_text().splitlines()))
    assert [(x["stage1_precision"], x["stage2_precision"]) for x in lines] == [("", ""), ("bf16", "fp32")]
    (running,) = rep.left_out
    assert running.precision == "fp32"  # from config.yaml: the run has not finished
    assert "| running | 1 | fp32 | no metrics.json" in rep.left_out_table()
