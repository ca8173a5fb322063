"""Every logger of configs/logger/ trains a run that score-eval then evaluates.

A logger is one YAML file: the run folder it leaves stays readable by every door, and the numbers
it records are the run's (the same as metrics.csv, which score-report reads). Every curve ends
where training ended: ``val/*`` holds the validation passes only, and the best checkpoint's
re-validation is logged once under ``best/val/*`` (with ``test/*``), on its pass's step.
TensorBoard's HParams tab gets the config and those headline metrics. (A real MLflow server:
tests/test_mlflow_server.py.)
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import CONFIG_DIR, cli_env, load_results, run_cli, train_cli

# hidden=16: the TensorBoard hparams test reads that value back.
NARROW = ["trainer.max_epochs=2", "task.model.hidden=16"]


def _csv_rows(run_dir: Path, key: str) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get(key)]


def _csv_curve(run_dir: Path, key: str) -> dict[int, float]:
    rows = _csv_rows(run_dir, key)
    assert len({r["step"] for r in rows}) == len(rows), f"{key}: a step logged twice"
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
    # The store the test gave the run (MLFLOW_TRACKING_URI), read through MLflow's client.
    from mlflow import MlflowClient

    client = MlflowClient(_mlflow_uri(run_dir))
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"run_name = '{run_dir.name}'"
    )
    history = client.get_metric_history(run.info.run_id, key)
    assert len({m.step for m in history}) == len(history), f"{key}: a step logged twice"
    return {m.step: m.value for m in history}


def _mlflow_uri(run_dir: Path) -> str:
    # logger=mlflow's default store: mlflow.db where score-train was started (the test's cwd).
    return f"sqlite:///{run_dir.parent / 'mlflow.db'}"


READERS = {"tensorboard": _tensorboard_curve, "mlflow": _mlflow_curve}


def test_every_logger_config_has_a_test():
    shipped = {p.stem for p in (CONFIG_DIR / "logger").glob("*.yaml")}
    assert shipped - {"csv", "wandb"} == set(READERS)  # csv/wandb: tests/test_train_cli.py


@pytest.mark.slow
@pytest.mark.parametrize("logger", sorted(READERS))
def test_a_run_logged_with_each_logger_is_evaluated_by_score_eval(tmp_path, logger):
    run_dir = tmp_path / logger
    # Started in tmp_path with no MLFLOW_TRACKING_URI: MLflow's default store is tmp_path's.
    env = cli_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    out = train_cli(run_dir, f"logger={logger}", *NARROW, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = load_results(run_dir)
    # metrics.csv: one val/ row per validation pass (one per epoch, 2 here), the last one in the
    # last epoch trained; the best checkpoint's numbers once, on its own pass's row.
    val_rows = _csv_rows(run_dir, "val/rmse")
    assert [int(r["epoch"]) for r in val_rows] == [0, 1]
    trained = _csv_curve(run_dir, "train/loss")
    expected = _csv_curve(run_dir, "val/rmse")
    assert max(expected) == max(trained)  # no val/ point past the last step trained
    best = _csv_curve(run_dir, "best/val/rmse")
    assert best == {results["best_val"]["step"] - 1: pytest.approx(results["val"]["rmse"])}
    (best_step,) = best
    assert expected[best_step] == pytest.approx(results["best_val"]["value"])  # that pass
    assert _csv_curve(run_dir, "test/rmse") == {best_step: pytest.approx(results["test"]["rmse"])}
    # The logger recorded the same curves (float32 in TensorBoard's events), nothing more.
    for key, curve in (("val/rmse", expected), ("best/val/rmse", best)):
        logged = READERS[logger](run_dir, key)
        assert logged == pytest.approx(curve, rel=1e-6), key
    logged = READERS[logger](run_dir, "test/rmse")
    assert logged == pytest.approx({best_step: results["test"]["rmse"]}, rel=1e-6)

    out = run_cli(f"run_dir={run_dir}", module="score_exp.cli.eval")
    assert out.returncode == 0, out.stderr[-3000:]
    with open(run_dir / "eval.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["test/rmse"]) == pytest.approx(load_results(run_dir)["test"]["rmse"], rel=1e-9)


@pytest.mark.slow
def test_tensorboard_hparams_tab_holds_the_config_and_the_headline_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir = tmp_path / "tb"
    out = train_cli(run_dir, "logger=tensorboard", *NARROW, "depth.dt=0.25", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = load_results(run_dir)
    # TensorBoard's own reader, over every event file of the run, as the HParams tab reads them.
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}
    experiment = data["_hparams_/experiment"].experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"best/val/rmse", "best/val/mae", "best/val/r2", "test/rmse", "test/mae"} <= metrics
    hparams = data["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["depth.dt"].number_value == 0.25
    assert hparams["seed"].number_value == 0
    assert hparams["task.model.hidden"].number_value == 16
    assert hparams["depth.integrator"].string_value == "euler"
    assert hparams["task.name"].string_value == "esol_mlp"
    # The tab shows each metric's logged value: the run's own numbers.
    assert acc.Scalars("test/rmse")[-1].value == pytest.approx(results["test"]["rmse"], rel=1e-6)
    assert acc.Scalars("best/val/rmse")[-1].value == pytest.approx(results["val"]["rmse"], rel=1e-6)


def test_the_default_mlflow_store_is_one_place_for_every_run(compose, tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI, every run (any run folder, any sweep) logs to the one
    SQLite store where score-train was started, the store `mlflow ui` opens there."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, read_write

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uris = set()
    for run_dir in ("outputs/a/run1", "multirun/b/depth_stacked"):
        cfg = compose("logger=mlflow", f"hydra.run.dir={run_dir}", return_hydra_config=True)
        with read_write(cfg.hydra.runtime):  # as Hydra sets it when the job starts
            cfg.hydra.runtime.output_dir = str(tmp_path / run_dir)
        HydraConfig.instance().set_config(cfg)
        uris.add(OmegaConf.select(cfg, "logger.mlflow.tracking_uri"))
        assert OmegaConf.select(cfg, "logger.mlflow.run_dir") == str(tmp_path / run_dir)
    assert uris == {f"sqlite:///{tmp_path}/mlflow.db"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = compose("logger=mlflow")
    assert cfg.logger.mlflow.tracking_uri == "http://mlflow.example:5000"
    HydraConfig.instance().cfg = None  # as it was for the next test
