"""Tuning: the Optuna studies (stage 1, ``score-tune study``) and re-training their best (stage 2)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import pytest
from conftest import QUIET, REPO, cli_env, run_cli
from omegaconf import OmegaConf

from score_exp.cli.train import objective
from score_exp.errors import ConfigError, DataError
from score_exp.runs.study import Param, StudyPlan, plan_study, run_study, search_space
from score_exp.runs.study_db import STUDY_FILE

TUNE = ["tune_esol_mlp", "tune_esol_mlp_cpu", "tune_esol_gnn", "tune_esol_gnn_cpu",
        "tune_esol_mlp_dt", "tune_shakespeare"]  # fmt: skip
TASK = {"tune_esol_mlp": "esol_mlp", "tune_esol_mlp_cpu": "esol_mlp", "tune_esol_gnn": "esol_gnn",
        "tune_esol_gnn_cpu": "esol_gnn", "tune_esol_mlp_dt": "esol_mlp_dt",
        "tune_shakespeare": "shakespeare_char"}  # fmt: skip


@pytest.mark.parametrize("exp", TUNE)
def test_tune_configs_give_every_variant_the_same_seeded_study_on_val_in_its_own_folder(
    compose, exp
):
    per_variant = {}
    for depth in ("score", "stacked"):
        plan = plan_study([f"experiment={exp}", f"depth={depth}"])
        cfg = compose(f"experiment={exp}", f"depth={depth}")
        assert cfg.objective == "best_val" and plan.direction == "minimize" and plan.seed == 0
        space = {p.key: p for p in plan.space}
        assert space["task.module.lr"].log and space["task.module.lr"].low == 1e-4
        assert {"task.module.weight_decay", "task.model.dropout"} <= set(space)
        assert plan.folder == Path("multirun/tune") / TASK[exp] / depth
        assert plan.db == plan.folder / STUDY_FILE and plan.name == f"{cfg.experiment_name}_{depth}"
        per_variant[depth] = (plan.n_trials, plan.n_startup_trials, plan.space,
                              cfg.task.max_epochs, cfg.task.max_steps)  # fmt: skip
    # The same budget and search space for every variant: only the depth differs.
    assert per_variant["score"] == per_variant["stacked"]


def test_the_cpu_study_keeps_the_search_space_and_budget_of_the_hydra_sweeper_it_replaced():
    plan = plan_study(["experiment=tune_esol_mlp_cpu", "depth=score"])
    assert (plan.n_trials, plan.n_startup_trials) == (12, 5)  # was hydra.sweeper.n_trials, ...
    assert plan.space == [
        Param("task.module.lr", 1e-4, 3e-3, log=True),
        Param("task.module.weight_decay", 1e-6, 1e-2, log=True),
        Param("task.model.dropout", 0.0, 0.3),
    ]
    dt = {p.key: p for p in plan_study(["experiment=tune_esol_mlp_dt", "depth=score"]).space}
    assert dt["depth.dt"].choices == (0.1, 0.25, 0.5, 0.75, 1.0)
    assert dt["depth.steps"].choices == (2, 4, 8)
    # The study's own settings change the study, never the trials' runs.
    plan = plan_study(["experiment=tune_esol_mlp_cpu", "depth=score", "tune.n_trials=3"], seed=2)
    assert plan.n_trials == 3 and plan.seed == 2 and not any("tune." in o for o in plan.overrides)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"lr": {"low": 1e-3}}, "tune.params.lr needs numbers low < high"),
        ({"lr": {"low": 1e-2, "high": 1e-3}}, "tune.params.lr needs numbers low < high"),
        ({"lr": {"low": 0.0, "high": 1.0, "log": True}}, "a log range needs low > 0"),
        ({"lr": {"low": 0.1, "high": 1.0, "dist": "log"}}, "unknown field(s) dist"),
        ({"lr": {"choices": []}}, "tune.params.lr.choices must be a non-empty list"),
        ({"lr": {"choices": [{"_target_": "os.system"}]}}, "must be a non-empty list of plain"),
        ({"lr": "tag(log, interval(1e-4, 3e-3))"}, "tune.params.lr must be {low, high"),
        ({}, "tune.params must map config keys to ranges"),
    ],
)
def test_a_bad_search_space_is_one_line_naming_the_key(spec, message):
    with pytest.raises(ConfigError) as e:
        search_space(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [None, True, False, "adamw", "it's", 1e-05, 0.1, 4, 1e30])
def test_a_sampled_value_reaches_score_train_as_the_same_value(value):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from score_exp.runs.study_db import override_value

    (o,) = OverridesParser.create().parse_overrides([f"task.x={override_value(value)}"])
    assert o.value() == value and type(o.value()) is type(value)


def test_score_tune_study_refuses_bad_input_in_one_line_before_any_work(tmp_path):
    out = run_cli("study", "depth=score", "--dir", str(tmp_path / "s"), module="score_exp.cli.tune")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "needs an experiment with a search space (tune:)" in out.stderr
    assert "tune_esol_mlp_cpu" in out.stderr and not (tmp_path / "s").exists()
    out = run_cli("study", "experiment=tune_esol_mlp_cpu", "tune.params.task.nope.x.low=1",
                  "--dir", str(tmp_path / "s"), module="score_exp.cli.tune")  # fmt: skip
    assert out.returncode == 2 and "score-tune: error:" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "s").exists()
    (tmp_path / "file").write_text("")
    out = run_cli("study", "experiment=tune_esol_mlp_cpu", "--dir", str(tmp_path / "file" / "s"),
                  module="score_exp.cli.tune")  # fmt: skip
    assert out.returncode == 2 and "--dir=" in out.stderr and "is a file" in out.stderr


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
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryFailedTrialCallback
    from optuna.trial import TrialState

    sweep = tmp_path / "tune" / "score"
    cmd = [sys.executable, "-m", "score_exp.cli.tune", "study", "experiment=tune_esol_mlp", "depth=score",
           "--trials", "2", "task.max_epochs=8", "callbacks.early_stopping=null",
           "task.model.hidden=16", "--dir", str(sweep)]  # fmt: skip
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
    assert killed.name == "trial0" and not (killed / "results.json").exists()
    study = _study(sweep / "optuna.db")
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    killed_params = study.trials[0].params

    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "0 of 2 trials finished, 2 to run" in out.stderr
    assert "trial 0 was interrupted: asked again" in out.stderr
    study = _study(sweep / "optuna.db")
    states = [t.state for t in study.trials]
    # The killed trial is marked failed, asked again with the same parameters in its own folder
    # (resumed from last.ckpt), and the budget of 2 is met by finished trials.
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert study.trials[1].params == killed_params
    assert [t.user_attrs["run_dir"] for t in study.trials[1:]] == ["trial0", "trial2"]
    with warnings.catch_warnings():  # "experimental" since Optuna 2.8
        warnings.simplefilter("ignore", ExperimentalWarning)
        assert RetryFailedTrialCallback.retried_trial_number(study.trials[1]) == 0  # Optuna's keys
    assert "resuming from" in (killed / "train.log").read_text()
    res = json.loads((killed / "results.json").read_text())
    assert res["status"] == "ok" and study.trials[1].value == res["best_val"]["value"]
    assert len({json.dumps(t.params, sort_keys=True) for t in study.trials[1:]}) == 2

    # The same command again: the study is finished, nothing runs.
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 of 2 trials finished, 0 to run" in again.stderr
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


@pytest.mark.slow  # three one-epoch score-train runs
def test_a_diverged_trial_is_pruned_a_failed_one_failed_and_the_study_goes_on(tmp_path):
    import optuna
    from optuna.trial import TrialState

    plan = StudyPlan(
        name="mixed", folder=tmp_path / "mixed",
        space=[Param("depth.dt", choices=(0.5, 1e30)), Param("task.data.batch_size", choices=(32, 0))],
        overrides=["depth=shared_residual", "trainer.max_epochs=1", "task.model.hidden=16"],
        n_trials=2, n_startup_trials=10, seed=0, direction="minimize",
    )  # fmt: skip
    plan.folder.mkdir()
    study = optuna.create_study(study_name="mixed", storage=f"sqlite:///{plan.db}")
    for dt, bs in ((0.5, 0), (0.5, 32), (1e30, 32)):  # failed (bad input), ok, diverged
        study.enqueue_trial({"depth.dt": dt, "task.data.batch_size": bs})
    first = run_study(plan)
    # The failed trial does not count against the budget: this call ran 2 trials, 1 counts.
    assert (first["finished"], first["failed"]) == (1, 1)
    second = run_study(plan)  # the same command again: what is left of the budget
    assert (second["finished"], second["failed"], second["ran"]) == (2, 1, 1)
    trials = _study(plan.db).trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED]
    assert [t.user_attrs["status"] for t in trials] == ["failed", "ok", "diverged"]
    diverged = json.loads((plan.folder / "trial2" / "results.json").read_text())
    assert diverged["status"] == "diverged" and second["best"]["number"] == 1
    assert not (plan.folder / "trial0" / "results.json").exists()  # refused before any work
    # A trial asked again whose folder already holds its finished run (the study died between
    # the run's end and Optuna's record) is not trained again: score-train skips the folder.
    ok = plan.folder / "trial1" / "results.json"
    before = ok.read_bytes()
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING,
        system_attrs={"fixed_params": trials[1].params, "failed_trial": 1},
    ))  # fmt: skip
    plan.n_trials = 3
    third = run_study(plan)
    assert (third["finished"], third["ran"]) == (3, 1)
    again = _study(plan.db).trials[3]
    assert again.state == TrialState.COMPLETE and again.value == trials[1].value
    assert again.user_attrs["run_dir"] == "trial1" and ok.read_bytes() == before
    # Another sampler seed is another study: never mixed into this one.
    plan.seed = 1
    with pytest.raises(DataError, match="was started with seed 0, not 1: give each study seed"):
        run_study(plan)


# ----------------------------------------------------------------------------- optuna-dashboard


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def test_optuna_dashboard_serves_the_study(tmp_path):
    """A real optuna-dashboard (the project's dependency) on a free local port, stopped by PID."""
    import optuna

    db = tmp_path / "score" / STUDY_FILE
    db.parent.mkdir()
    study = optuna.create_study(study_name="tune_esol_mlp_score", storage=f"sqlite:///{db}")
    dist = optuna.distributions.FloatDistribution(1e-4, 3e-3, log=True)
    for lr, value in ((1e-3, 0.9), (2e-3, 0.8)):
        study.add_trial(optuna.trial.create_trial(
            params={"task.module.lr": lr}, distributions={"task.module.lr": dist}, value=value,
            user_attrs={"overrides": ["experiment=tune_esol_mlp_cpu", "depth=score"]},
        ))  # fmt: skip
    port = _free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"
    log = open(tmp_path / "dashboard.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([str(dashboard), f"sqlite:///{db}", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                status, _, body = _get(f"http://127.0.0.1:{port}/api/studies")
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()[-2000:]
                assert time.time() < deadline, "optuna-dashboard did not answer in 60 s"
                time.sleep(0.3)
        (summary,) = json.loads(body)["study_summaries"]
        assert status == 200 and summary["study_name"] == "tune_esol_mlp_score"
        sid = summary["study_id"]
        status, _, body = _get(f"http://127.0.0.1:{port}/api/studies/{sid}")
        detail = json.loads(body)
        assert status == 200 and detail["name"] == "tune_esol_mlp_score"
        assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete"]
        assert detail["best_trials"][0]["values"] == [0.8]
        status, ctype, page = _get(f"http://127.0.0.1:{port}/dashboard/studies/{sid}")
        assert status == 200 and ctype.startswith("text/html") and "<html" in page.lower()
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


# ----------------------------------------------------------------------------- an old study


def _old_study(folder: Path) -> Path:
    """The study of tests/data/optuna_2_10_study.sql (Optuna 2.10's schema) as a SQLite file."""
    import sqlite3

    folder.mkdir(parents=True)
    db = folder / STUDY_FILE
    con = sqlite3.connect(db)
    con.executescript((REPO / "tests" / "data" / "optuna_2_10_study.sql").read_text())
    con.close()
    return db


def test_a_study_of_optuna_2_is_refused_in_one_line_untouched_and_reads_once_upgraded(tmp_path):
    from score_exp.runs.study_db import best_trial

    db = _old_study(tmp_path / "tune" / "score")
    before = db.read_bytes()
    fix = f"optuna storage upgrade --storage sqlite:///{db.resolve()}"
    out = run_cli("retrain", str(tmp_path / "tune"), "--seeds", "1", module="score_exp.cli.tune")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.strip() == (
        f"score-tune: error: {db} is an Optuna study in an older storage schema (v2.6.0.a; "
        f"Optuna {__import__('optuna').__version__} reads v3.2.0.a): upgrade it once, after a "
        f"backup, with: {fix}"
    )
    out = run_cli("study", "experiment=tune_esol_mlp_cpu", "depth=score", "--dir", str(db.parent),
                  module="score_exp.cli.tune")  # fmt: skip
    assert out.returncode == 2 and fix in out.stderr and out.stderr.strip().count("\n") == 0
    assert db.read_bytes() == before  # neither command wrote to it
    assert not (tmp_path / "tune" / "retrain").exists() and not list(db.parent.glob("trial*"))

    # The named fix works: Optuna's own upgrade, then the study reads (its old format too).
    optuna_cli = Path(sys.executable).parent / "optuna"
    up = subprocess.run([str(optuna_cli), *fix.split()[1:]], capture_output=True, text=True,
                        timeout=120)  # fmt: skip
    assert up.returncode == 0, up.stderr[-2000:]
    best = best_trial(db)
    assert (best["study"], best["value"], best["number"]) == ("tune_esol_mlp_score", 0.71, 0)
    # Hydra's sweeper's user attributes are the fixed overrides; its hydra.* settings left out.
    assert best["overrides"] == [
        "depth=score", "experiment=tune_esol_mlp_cpu", "task.max_epochs=2", "task.model.hidden=16",
        "trainer.enable_progress_bar=False", "task.module.lr=0.0012",
        "task.module.weight_decay=0.0001", "task.model.dropout=0.1",
    ]  # fmt: skip


def test_a_study_file_that_is_a_link_or_from_a_newer_optuna_is_refused(tmp_path):
    import sqlite3

    from score_exp.runs.study_db import check_study_file

    db = _old_study(tmp_path / "old")
    link = tmp_path / "link.db"
    link.symlink_to(db)
    with pytest.raises(DataError, match="is not a readable Optuna study \\(a link\\)"):
        check_study_file(link)
    con = sqlite3.connect(db)
    con.execute("UPDATE alembic_version SET version_num = 'v9.0.0.a'")
    con.commit()
    con.close()
    with pytest.raises(DataError, match="from a newer Optuna \\(schema 'v9.0.0.a'"):
        check_study_file(db)


def test_a_study_already_running_in_another_process_is_one_line(tmp_path):
    from score_exp.runs.lock import RunLock

    folder = tmp_path / "score"
    with RunLock(folder):  # this process runs the study
        out = run_cli("study", "experiment=tune_esol_mlp_cpu", "depth=score", "--dir", str(folder),
                      module="score_exp.cli.tune")  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert out.stderr.startswith("score-tune: error:") and str(os.getpid()) in out.stderr
    assert not (folder / STUDY_FILE).exists()


def test_the_peer_is_tuned_with_the_budget_of_the_depth_variants(tmp_path):
    """tune_esol_attentivefp(_cpu): a study of its own, as many trials and epochs as score025's."""
    for peer, gnn in (("tune_esol_attentivefp", "tune_esol_gnn"),
                      ("tune_esol_attentivefp_cpu", "tune_esol_gnn_cpu")):  # fmt: skip
        plan = plan_study([f"experiment={peer}"], tmp_path / peer)
        ours = plan_study([f"experiment={gnn}", "depth=score025"])
        assert (plan.n_trials, plan.n_startup_trials) == (ours.n_trials, ours.n_startup_trials)
        assert {p.key for p in plan.space} == {p.key for p in ours.space}
        assert plan.folder == tmp_path / peer and plan.direction == "minimize"
