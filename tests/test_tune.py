"""Tuning: the Optuna studies (stage 1) and re-training their best configuration (stage 2)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import QUIET, REPO, cli_env, run_cli
from omegaconf import OmegaConf

from score_exp.cli.train import objective
from score_exp.errors import ConfigError

TUNE = ["tune_esol_mlp", "tune_esol_mlp_cpu", "tune_esol_gnn", "tune_esol_gnn_cpu",
        "tune_esol_mlp_dt", "tune_shakespeare"]  # fmt: skip


@pytest.mark.parametrize("exp", TUNE)
def test_tune_configs_search_on_val_with_a_seeded_sampler_and_a_study_in_the_sweep_folder(
    compose, exp
):
    per_variant = {}
    for depth in ("score", "stacked"):
        cfg = compose(f"experiment={exp}", f"depth={depth}", "hydra/launcher=basic", return_hydra_config=True)  # fmt: skip
        sw = cfg.hydra.sweeper
        assert cfg.objective == "best_val" and sw.direction == "minimize"
        assert sw._target_.endswith("StudySweeper") and sw.sampler.seed == 0
        assert "TPESampler" in sw.sampler._target_
        assert sw.params["task.module.lr"].startswith("tag(log, interval(")
        assert {"task.module.weight_decay", "task.model.dropout"} <= set(sw.params)
        per_variant[depth] = (sw.n_trials, sw.params, cfg.task.max_epochs, cfg.task.max_steps)
        storage, sweep_dir = sw.storage, cfg.hydra.sweep.dir
        assert storage == f"sqlite:///{sweep_dir}/optuna.db" and sweep_dir.endswith(f"/{depth}")
    # The same budget and search space for every variant: only the depth differs.
    assert per_variant["score"] == per_variant["stacked"]


def test_objective_is_the_best_val_metric_never_test(compose):
    cfg = compose()
    record = {
        "status": "ok",
        "best_val": {"metric": "val/rmse", "value": 0.7},
        "test": {"rmse": 0.5},
    }
    assert objective(cfg, record) == 0.7
    assert objective(cfg, {**record, "status": "diverged"}) == math.inf
    assert objective(cfg, {"status": "failed"}) == math.inf
    with pytest.raises(ConfigError, match="objective='test'"):
        objective(compose("objective=test"), record)


def test_unknown_objective_is_one_line_before_any_work(tmp_path):
    out = run_cli(f"hydra.run.dir={tmp_path / 'run'}", "objective=test", *QUIET)
    assert out.returncode == 2 and "objective='test'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "config.yaml").exists()


def _study(db):
    import optuna

    storage = f"sqlite:///{db}"
    name = optuna.get_all_study_summaries(storage)[0].study_name
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.slow
def test_two_trial_study_resumes_after_a_kill_and_stage_2_retrains_its_best(tmp_path):
    from optuna.trial import TrialState

    sweep = tmp_path / "tune" / "score"
    cmd = [sys.executable, "-m", "score_exp.cli.train", "-m", "experiment=tune_esol_mlp", "depth=score",
           "hydra.sweeper.n_trials=2", "task.max_epochs=40", "callbacks.early_stopping=null",
           "task.model.hidden=32", f"hydra.sweep.dir={sweep}", *QUIET]  # fmt: skip
    env = cli_env(OMP_NUM_THREADS="1")
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not list(sweep.glob("*/checkpoints/last.ckpt")):
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the first trial never wrote last.ckpt"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole study dies mid-trial
        proc.wait()
    (killed,) = [p.parent.parent for p in sweep.glob("*/checkpoints/last.ckpt")]
    assert not (killed / "results.json").exists()
    study = _study(sweep / "optuna.db")
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    killed_params = study.trials[0].params

    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0 of 2 trials finished, 2 to run" in out.stderr + out.stdout
    study = _study(sweep / "optuna.db")
    states = [t.state for t in study.trials]
    # The killed trial is marked failed, asked again with the same parameters (its folder resumed
    # from last.ckpt), and the budget of 2 is met by finished trials.
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[1].params == killed_params
    assert "resuming from" in (killed / "train.log").read_text()
    res = json.loads((killed / "results.json").read_text())
    assert res["status"] == "ok" and study.trials[1].value == res["best_val"]["value"]
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials[1:]}) == 2

    # The same command again: the study is finished, nothing runs.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert (
        again.returncode == 0 and "2 of 2 trials finished, 0 to run" in again.stderr + again.stdout
    )
    assert len(_study(sweep / "optuna.db").trials) == 3

    # Stage 2: the best trial's configuration over 2 seeds; test metrics for the report.
    best = min(study.trials[1:], key=lambda t: t.value)
    out = run_cli(
        "retrain", str(tmp_path / "tune"), "--seeds", "2", module="score_exp.cli.tune", env=env
    )
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    for seed in (0, 1):
        run = tmp_path / "tune" / "retrain" / "score" / f"seed={seed}"
        res = json.loads((run / "results.json").read_text())
        cfg = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))))
        assert res["status"] == "ok" and res["seed"] == seed and "rmse" in res["test"]
        assert cfg["task"]["module"]["lr"] == pytest.approx(best.params["task.module.lr"])
        assert cfg["task"]["model"]["dropout"] == pytest.approx(best.params["task.model.dropout"])
        assert cfg["experiment_name"] == "tuned_esol_mlp"
    # Seed 0 at the best parameters is the best trial's own configuration: the same numbers.
    seed0 = tmp_path / "tune" / "retrain" / "score" / "seed=0" / "results.json"
    assert json.loads(seed0.read_text())["best_val"]["value"] == pytest.approx(best.value)


@pytest.mark.parametrize(
    "exp",
    ["paper_esol_mlp_cpu", "paper_esol_gnn_cpu", "paper_shakespeare_cpu", "paper_integrators_cpu",
     "paper_dt_cpu", "claims_esol_gnn_deep_cpu", "claims_esol_gnn_deep_skip_cpu"],
)  # fmt: skip
def test_every_cpu_grid_of_reproduce_cpu_runs_five_seeds(compose, exp):
    cfg = compose(f"experiment={exp}", return_hydra_config=True)
    assert str(cfg.hydra.sweeper.params.seed) == "0,1,2,3,4"
    makefile = (REPO / "Makefile").read_text()
    assert exp in makefile.split("REPRO_CPU :=", 1)[1].split("REPRO_GPU", 1)[0]
    if exp.startswith("claims_"):
        params = cfg.hydra.sweeper.params
        assert (
            str(params["depth.steps"]) == "4,8,16"
            and cfg.experiment_name == "claims_esol_gnn_deep_cpu"
        )
        assert str(params["task.model.block_skip"]) == ("true" if "skip" in exp else "false")
