"""Every logger of configs/logger/ trains a run that score-eval then evaluates.

A logger is one YAML file: the run folder it leaves stays readable by every door, and the numbers
it records are the run's (the same as metrics.csv, which score-report reads).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import CONFIG_DIR, load_results, run_cli, train_cli

TINY = ["trainer.max_epochs=2", "task.model.hidden=16"]


def _csv_curve(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    return {int(r["step"]): float(r[key]) for r in rows}


def _tensorboard_curve(run_dir: Path, key: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curve = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if key in acc.Tags()["scalars"]:
            curve.update({e.step: e.value for e in acc.Scalars(key)})
    return curve


def _mlflow_curve(run_dir: Path, key: str) -> dict[int, float]:
    # MLflow's file store: mlruns/<experiment id>/<run id>/metrics/<key>, "time value step" lines.
    (path,) = (run_dir / "mlruns").glob(f"*/*/metrics/{key}")
    lines = [line.split() for line in path.read_text().splitlines()]
    return {int(step): float(value) for _, value, step in lines}


READERS = {"tensorboard": _tensorboard_curve, "mlflow": _mlflow_curve}


def test_every_logger_config_has_a_test():
    shipped = {p.stem for p in (CONFIG_DIR / "logger").glob("*.yaml")}
    assert shipped - {"csv", "wandb"} == set(READERS)  # csv/wandb: tests/test_train_cli.py


@pytest.mark.slow
@pytest.mark.parametrize("logger", sorted(READERS))
def test_a_run_logged_with_each_logger_is_evaluated_by_score_eval(tmp_path, logger):
    run_dir = tmp_path / logger
    out = train_cli(run_dir, f"logger={logger}", *TINY, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The logger recorded the run's own validation curve (float32 in TensorBoard's events).
    expected = _csv_curve(run_dir, "val/rmse")
    logged = READERS[logger](run_dir, "val/rmse")
    assert expected and set(logged) == set(expected)
    assert logged == pytest.approx(expected, rel=1e-6)

    out = run_cli(f"run_dir={run_dir}", module="score_exp.cli.eval")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(run_dir / "eval.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["test/rmse"]) == pytest.approx(load_results(run_dir)["test"]["rmse"], rel=1e-9)
