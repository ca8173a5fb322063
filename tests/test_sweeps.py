"""Sweeps through the real CLI: launchers, restarts, resume after SIGTERM, failures, the report."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest
from conftest import QUIET, REPO, TINY, cli_env, load_results, run_cli, train_cli

pytestmark = pytest.mark.slow

GRID = ["depth=score,stacked", "seed=0,1"]
# Hydra names a sweep's run folders by their sorted overrides (override_dirname).
SUFFIX = ",task.model.hidden=32,trainer.max_epochs=2"
RUNS = {f"depth={d},seed={s}" for d in ("score", "stacked") for s in (0, 1)}
HELPERS_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def sweep(sweep_dir: Path, *overrides: str, launcher: str = "basic", **kw):
    return run_cli(
        "-m", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}", *QUIET, *overrides, **kw
    )


def results(sweep_dir: Path) -> dict[str, dict]:
    """Results by run folder name, without the TINY overrides every folder name ends with."""
    return {
        p.parent.name.removesuffix(SUFFIX): json.loads(p.read_text())
        for p in sweep_dir.glob("*/results.json")
    }


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "basic"
    out = sweep(sweep_dir, *GRID, *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir


def test_basic_sweep_runs_the_grid_one_folder_per_configuration(basic_sweep):
    res = results(basic_sweep)
    assert set(res) == RUNS
    assert all(r["status"] == "ok" for r in res.values())
    assert {(r["depth_preset"], r["seed"]) for r in res.values()} == {
        (d, s) for d in ("score", "stacked") for s in (0, 1)
    }


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_parallel_launchers_run_the_same_grid(tmp_path, basic_sweep, launcher):
    extra = (
        ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=20"]
    )
    out = sweep(tmp_path / launcher, *GRID, *TINY, *extra, launcher=launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    res = results(tmp_path / launcher)
    assert set(res) == RUNS and all(r["status"] == "ok" for r in res.values())
    # Same seed on CPU = same numbers, whichever launcher ran the job.
    ref = results(basic_sweep)
    for name in RUNS:
        assert res[name]["test"]["rmse"] == pytest.approx(ref[name]["test"]["rmse"], rel=1e-6)


def test_rerunning_a_sweep_skips_finished_runs(basic_sweep):
    before = {p: p.stat().st_mtime_ns for p in basic_sweep.glob("*/results.json")}
    # Another launcher and progress-bar setting name the same run folders (excluded keys).
    out = sweep(basic_sweep, *GRID, *TINY, "trainer.enable_progress_bar=true")
    assert out.returncode == 0, out.stderr[-3000:]
    # Skipped before launching (score_exp.runs.cluster.finished_run): no job ran.
    assert "sweep summary: 4 job(s), 0 launched, 4 skipped (already finished)" in out.stderr
    after = {p: p.stat().st_mtime_ns for p in basic_sweep.glob("*/results.json")}
    assert after == before


def test_interrupted_run_resumes_to_the_uninterrupted_numbers(tmp_path):
    # 4 epochs with dropout: a resume that lost the RNG state or the optimiser would differ.
    args = ["trainer.max_epochs=4", "task.model.hidden=32", "callbacks.early_stopping=null"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    assert train_cli(ref_dir, *args).returncode == 0
    kill = ["+callbacks.kill._target_=sweep_helpers.SigtermAt", "+callbacks.kill.epoch=2"]
    out = train_cli(run_dir, *args, *kill, env=cli_env(**HELPERS_ENV))
    assert out.returncode != 0
    interrupted = load_results(run_dir)
    assert interrupted["status"] == "interrupted", interrupted
    assert (run_dir / "checkpoints" / "last.ckpt").exists()

    # The same command again, as a re-launched sweep would (SigtermAt kills fresh runs only).
    out = train_cli(run_dir, *args, *kill, env=cli_env(**HELPERS_ENV))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from" in out.stderr
    ref, resumed = load_results(ref_dir), load_results(run_dir)
    assert resumed["status"] == "ok"
    assert resumed["best_val"] == ref["best_val"]
    assert resumed["test"] == pytest.approx(ref["test"], rel=1e-6)
    # The curve holds each epoch once in score-report's reading, equal to the reference's.
    from score_exp.report.runs import read_curve

    got = read_curve(run_dir / "metrics.csv", "val/rmse")
    want = read_curve(ref_dir / "metrics.csv", "val/rmse")
    assert [r["epoch"] for r in got] == [0, 1, 2, 3]
    assert [r["value"] for r in got] == pytest.approx([r["value"] for r in want], rel=1e-6)


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory):
    """A sweep with one diverging configuration and one that fails on bad input."""
    sweep_dir = tmp_path_factory.mktemp("sweep") / "mixed"
    out = sweep(sweep_dir, "depth=shared_residual", "depth.dt=0.5,1e30", *TINY)
    assert out.returncode == 0, out.stderr[-3000:]  # a diverged run is a result, not a crash
    return sweep_dir


def test_diverged_run_in_a_sweep_is_recorded_and_the_sweep_goes_on(mixed_sweep):
    res = results(mixed_sweep)
    assert res["depth.dt=0.5,depth=shared_residual"]["status"] == "ok"
    assert res["depth.dt=1e+30,depth=shared_residual"]["status"] == "diverged"


def test_bad_configuration_in_a_sweep_fails_alone(tmp_path):
    out = sweep(tmp_path / "bad", "depth.integrator=euler,nope", *TINY)
    assert out.returncode != 0  # the sweep reports the failure...
    res = results(tmp_path / "bad")
    assert res["depth.integrator=euler"]["status"] == "ok"  # ...after running the rest
    assert "depth.integrator=nope" not in res  # and wrote no result for the bad one
    assert "unknown integrator" in out.stderr


# ----------------------------------------------------------------------------- the report


def test_report_tables_hold_the_numbers_of_the_run_files(basic_sweep, mixed_sweep, tmp_path):
    import shutil

    # A copy of the sweep in which one run lost its results (crashed before writing).
    work = tmp_path / "sweep"
    shutil.copytree(basic_sweep, work)
    (work / f"depth=stacked,seed=1{SUFFIX}" / "results.json").unlink()
    out_dir = tmp_path / "report"
    out = run_cli(str(work), str(mixed_sweep), "--out", str(out_dir), module="score_exp.report")
    assert out.returncode == 0, out.stderr[-3000:]

    from score_exp.report.build import build_report

    rep = build_report([work, mixed_sweep], tmp_path / "again")
    table = next(t for t in rep.tables if t.title == "esol_mlp: depth variants")
    rows = {r["variant"]: r for r in table.records}
    # dt is in the labels: the mixed sweep varies it within the shared_residual preset.
    assert set(rows) == {"score depth.dt=0.5", "stacked depth.dt=1", "shared_residual depth.dt=0.5",
                         "shared_residual depth.dt=1e+30"}  # fmt: skip
    rows["score"], rows["stacked"] = rows["score depth.dt=0.5"], rows["stacked depth.dt=1"]
    score = [
        json.loads((work / f"depth=score,seed={s}{SUFFIX}" / "results.json").read_text())
        for s in (0, 1)
    ]
    stacked = json.loads((work / f"depth=stacked,seed=0{SUFFIX}" / "results.json").read_text())
    want = [r["test"]["rmse"] for r in score]
    assert rows["score"]["mean"] == pytest.approx(statistics.fmean(want))
    assert rows["score"]["std"] == pytest.approx(statistics.stdev(want))
    assert rows["score"]["params"] == score[0]["params"] and rows["score"]["nfe"] == score[0]["nfe"]
    assert (rows["stacked"]["n_ok"], rows["stacked"]["n"]) == (1, 1)
    assert (
        rows["stacked"]["mean"] == pytest.approx(stacked["test"]["rmse"])
        and rows["stacked"]["std"] is None
    )
    # The diverged run is counted, listed and kept out of its variant's mean.
    div = rows["shared_residual depth.dt=1e+30"]
    assert (div["n_ok"], div["n"], div["mean"]) == (0, 1, None)
    listed = {Path(p).name.removesuffix(SUFFIX): s for p, s, _ in rep.not_ok}
    assert listed == {
        "depth=stacked,seed=1": "missing",
        "depth.dt=1e+30,depth=shared_residual": "diverged",
    }

    # Convergence: the default target is the stacked variant's mean best val metric.
    target = stacked["best_val"]["value"]
    assert f"{target:.4f}" in table.note
    firsts = []
    for s in (0, 1):
        with open(work / f"depth=score,seed={s}{SUFFIX}" / "metrics.csv") as f:
            rows_s = [r for r in csv.DictReader(f) if r.get("val/rmse")]
        # Epochs completed when the val metric first reaches the target (first row per step).
        first = next(
            (int(float(r["epoch"])) + 1 for r in rows_s if float(r["val/rmse"]) <= target), None
        )
        if first is not None:
            firsts.append(first)
    assert rows["score"]["reached"] == len(firsts)
    assert rows["score"]["to_target"] == (
        pytest.approx(statistics.fmean(firsts)) if firsts else None
    )
    assert rows["stacked"]["reached"] == 1  # the baseline reaches its own best

    md = (out_dir / "report.md").read_text()
    assert "| score depth.dt=0.5 | 2/2 |" in md and "diverged" in md and "missing" in md
    assert "![esol_mlp_val_curves](esol_mlp_val_curves.png)" in md
    for name in ("esol_mlp_val_curves", "esol_mlp_vs_params", "esol_mlp_vs_wall_time"):
        assert (out_dir / f"{name}.png").stat().st_size > 0 and (out_dir / f"{name}.svg").exists()
    assert "\\begin{tabular}" in (out_dir / "tables.tex").read_text()
    with open(out_dir / "runs.csv") as f:
        rows_csv = list(csv.DictReader(f))
    assert len(rows_csv) == 3 + 2  # the missing run has no results.json to read
    assert {"depth.share", "depth.dt", "status", "test/rmse", "params"} <= set(rows_csv[0])
