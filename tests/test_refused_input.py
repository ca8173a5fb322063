"""Bad values, crafted checkpoints and crafted folders through the real CLIs (issue 21, item 7):
one line naming the value and what is valid, exit 2, checked before any work (or, for a report,
the crafted run listed as unreadable and never averaged in)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import QUIET, REPO, TINY, cli_env, run_cli, train_cli
from test_bad_input import _without_dac_override, assert_no_work, one_error_line


@pytest.fixture(scope="module")
def finished(tiny_run, tmp_path_factory):
    """A finished tiny esol_mlp run (2 epochs): a copy of the suite's (conftest.tiny_run), since
    these tests put crafted checkpoints into it and beside it."""
    run_dir = tmp_path_factory.mktemp("refused") / "run"
    shutil.copytree(tiny_run[0], run_dir)
    return run_dir


def _eval(run_dir, *args):
    return run_cli(f"run_dir={run_dir}", *args, module="score_exp.cli.eval")


# ----------------------------------------------------------------------------- checkpoints


def _crafted(ckpt: dict, kind: str):
    sd = dict(ckpt["state_dict"])
    first = next(iter(sd))
    if kind == "missing key":
        return {**ckpt, "state_dict": {k: v for k, v in sd.items() if k != first}}
    if kind == "wrong shape":
        return {**ckpt, "state_dict": {**sd, first: torch.zeros(3, 3, 3)}}
    if kind == "a list":
        return {**ckpt, "state_dict": [1, 2]}
    if kind == "no state_dict":
        return {k: v for k, v in ckpt.items() if k != "state_dict"}
    return [1, 2, 3]  # not even a mapping


@pytest.mark.parametrize(
    "kind, says",
    [
        ("missing key", "does not match the model rebuilt from"),
        ("wrong shape", "does not match the model rebuilt from"),
        ("a list", "holds no state_dict"),
        ("no state_dict", "holds no state_dict"),
        ("not a mapping", "holds no state_dict"),
    ],
)
@pytest.mark.parametrize("prog, module", [("score-eval", "eval"), ("score-sample", "sample")])
def test_a_checkpoint_that_does_not_fit_the_model(finished, kind, says, prog, module):
    ckpt = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    name = f"crafted-{kind.replace(' ', '_')}.ckpt"
    torch.save(_crafted(ckpt, kind), finished / "checkpoints" / name)
    try:
        out = run_cli(
            f"run_dir={finished}",
            f"checkpoint=checkpoints/{name}",
            module=f"score_exp.cli.{module}",
        )
    finally:
        (finished / "checkpoints" / name).unlink()
    line = one_error_line(out, prog)
    assert f"checkpoint {finished / 'checkpoints' / name} " in line and says in line
    assert not (finished / "eval.csv").exists()


# ----------------------------------------------------------------------------- score-eval


@pytest.mark.parametrize(
    "args, message",
    [
        (["checkpoint=../outside.ckpt"], "checkpoint=../outside.ckpt leaves the run folder"),
        (["checkpoint=ABS"], "checkpoint=ABS leaves the run folder"),
        (["depth.steps=2.5"], "depth.steps must be an integer >= 1, got 2.5"),
        (
            ["depth.halt=kl", "depth.adaptive_eps=0.01"],
            "depth.halt=kl compares next-token distributions, which only a language model "
            "passes to its depth; this model supports depth.halt=state or ponder",
        ),
        (["device=cuda"], "device=cuda but no CUDA device is available; use device=cpu"),
        (["device=tpu"], "device must be cpu or cuda, got 'tpu'"),
    ],
)
def test_score_eval_refuses_a_bad_request_before_evaluating(finished, args, message):
    if "device=cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here: device=cuda is valid")
    outside = finished.parent / "outside.ckpt"
    outside.write_bytes((finished / "checkpoints" / "last.ckpt").read_bytes())
    args = [a.replace("ABS", str(outside)) for a in args]
    line = one_error_line(_eval(finished, *args), "score-eval")
    assert line.startswith(f"score-eval: error: {message.replace('ABS', str(outside))}"), line
    assert not (finished / "eval.csv").exists()  # nothing evaluated, nothing written


# ----------------------------------------------------------------------------- score-train


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["depth.steps=2.5"], "depth.steps must be an integer, got 2.5"),
        (["depth.dt=abc"], "depth.dt must be a number or null, got 'abc'"),
        (
            ["depth.halt=kl"],
            "depth.halt=kl compares next-token distributions, which only a language model "
            "passes to its depth; this model supports depth.halt=state or ponder",
        ),
        (
            ["depth.train_steps='lognormal_poisson:inf,1'"],
            "invalid depth config: train_steps lognormal_poisson takes two numbers, finite, "
            "got 'lognormal_poisson:inf,1'",
        ),
        (
            ["depth.train_steps='lognormal_poisson:4,inf'"],
            "invalid depth config: train_steps lognormal_poisson takes two numbers, finite, "
            "got 'lognormal_poisson:4,inf'",
        ),
        (
            ["depth.train_steps='uniform:1,1e20'"],
            "invalid depth config: train_steps uniform:a,b needs integers 1 <= a <= b <= "
            "1000000, got 1, 1e+20",
        ),
        (
            ["callbacks.divergence.patience=0"],
            "callbacks.divergence.patience must be an integer >= 1, got 0",
        ),
        (
            ["callbacks.divergence.factor=-1"],
            "callbacks.divergence.factor must be a number > 0, got -1",
        ),
    ],
)
def test_score_train_refuses_a_bad_depth_or_callback_value(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    line = one_error_line(train_cli(run_dir, *TINY, *overrides))
    assert line == f"score-train: error: {message}"
    assert_no_work(run_dir)


def test_overwrite_with_a_file_where_the_moved_aside_folder_goes(finished, tmp_path):
    run_dir = tmp_path / "runs" / "run"
    run_dir.parent.mkdir()
    subprocess.run(["cp", "-r", str(finished), str(run_dir)], check=True)
    (run_dir.parent / ".overwritten").write_text("a file")
    before = sorted(p.name for p in run_dir.iterdir())
    line = one_error_line(train_cli(run_dir, *TINY, "overwrite=true"))
    assert line.startswith(f"score-train: error: overwrite=true cannot move {run_dir} aside into ")
    assert "rename or remove it" in line
    assert sorted(p.name for p in run_dir.iterdir()) == before  # the old run stays where it is


@pytest.mark.slow  # a new interpreter (it drops a capability before starting)
def test_a_read_only_data_cache_folder(tmp_path):
    ro = tmp_path / "cache"
    ro.mkdir()
    ro.chmod(0o555)
    cmd = [sys.executable, "-m", "score_exp.cli.train", f"hydra.run.dir={tmp_path / 'run'}", *QUIET,
           "trainer.fast_dev_run=true"]  # fmt: skip
    pre = _without_dac_override if os.geteuid() == 0 else None
    try:
        out = subprocess.run(
            cmd, cwd=REPO, env=cli_env(SCORE_DATA_DIR=str(ro)), capture_output=True, text=True,
            timeout=300, preexec_fn=pre,
        )  # fmt: skip
    finally:
        ro.chmod(0o755)
    line = one_error_line(out)
    assert f"into the data cache folder {ro} " in line
    assert "make it writable or set SCORE_DATA_DIR to a writable folder" in line
    assert_no_work(tmp_path / "run")


# ----------------------------------------------------------------------------- score-sample


@pytest.mark.parametrize(
    "arg, message",
    [
        ("num_samples=abc", "num_samples must be an integer >= 1, got 'abc'"),
        ("temperature=abc", "temperature must be a number > 0, got 'abc'"),
        ("seed=abc", "seed must be an integer in [0, 4294967295], got 'abc'"),
        ("max_new_tokens=-1", "max_new_tokens must be an integer >= 0, got -1"),
    ],
)
def test_score_sample_refuses_a_bad_value_before_loading(finished, arg, message):
    out = run_cli(f"run_dir={finished}", arg, module="score_exp.cli.sample")
    assert one_error_line(out, "score-sample") == f"score-sample: error: {message}"


# ----------------------------------------------------------------------------- score-bench


@pytest.mark.parametrize(
    "args, message",
    [
        (["--variant", "x", "task.data.batch_size=0"], "task.data.batch_size must be an integer >= 1, got 0"),
        (["--threads", "0"], "--threads must be >= 1, got 0"),
        (["--json", "FILE/bench.json"], "--json=FILE cannot be a folder: it is a file; choose another --json"),
    ],
)  # fmt: skip
def test_score_bench_refuses_before_measuring(tmp_path, args, message):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    args = [a.replace("FILE", str(blocker)) for a in args]
    out = run_cli("--task", "esol_mlp", "--depth", "score", *args, module="score_exp.bench.cli")
    line = one_error_line(out, "score-bench")
    assert line == f"score-bench: error: {message.replace('FILE', str(blocker))}"
    assert "measuring" not in out.stderr


# ----------------------------------------------------------------------------- score-tune


def _study(folder, overrides: dict) -> None:
    """An Optuna study with one finished trial whose fixed overrides are ``overrides``."""
    import optuna

    folder.mkdir(parents=True)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{folder / 'optuna.db'}")
    study.add_trial(
        optuna.trial.create_trial(
            params={"task.module.lr": 0.001},
            distributions={"task.module.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2)},
            value=1.0,
            user_attrs=overrides,
        )
    )


def test_score_tune_refuses_a_corrupt_study_database(tmp_path):
    (tmp_path / "score").mkdir()
    (tmp_path / "score" / "optuna.db").write_text("not a database")
    out = run_cli("retrain", str(tmp_path), "--seeds", "1", module="score_exp.cli.tune")
    line = one_error_line(out, "score-tune")
    assert line == (
        f"score-tune: error: {tmp_path / 'score' / 'optuna.db'} is not a readable Optuna study "
        "(file is not a database)"
    )
    assert not (tmp_path / "retrain").exists()


@pytest.mark.slow  # runs score-train (refused at once) in a new interpreter
def test_score_tune_passes_the_overrides_after_dashes_to_score_train(tmp_path):
    _study(tmp_path / "tune" / "score", {"trainer.max_epochs": 1, "task.model.hidden": 8})
    out = run_cli(
        "retrain", str(tmp_path / "tune"), "--seeds", "1", "--", "task.data.batch_size=0",
        module="score_exp.cli.tune",
    )  # fmt: skip
    # The override reached score-train (which refused it), instead of being taken as a PATH.
    assert out.returncode == 1, out.stderr[-2000:]
    assert "score-train: error: task.data.batch_size must be an integer >= 1, got 0" in out.stderr
    out = run_cli(
        "retrain", str(tmp_path / "tune"), "trainer.max_epochs=1", module="score_exp.cli.tune"
    )
    assert one_error_line(out, "score-tune") == (
        "score-tune: error: trainer.max_epochs=1 does not exist (score-train overrides go "
        "after `--`)"
    )


# ----------------------------------------------------------------------------- score-report


def _edit_results(run_dir, **changes) -> None:
    path = run_dir / "results.json"
    record = json.loads(path.read_text())
    for key, value in changes.items():
        node = record
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "craft, reason",
    [
        ({"seed": [1]}, "results.json: seed is [1], not an integer"),
        ({"depth__dt": "abc"}, "results.json: depth.dt is 'abc', not a number"),
        ({"status": None}, "results.json: status is None, not a string"),
        ("metrics.csv", None),
        ("eval.csv", None),
    ],
)
def test_score_report_lists_a_crafted_run_and_reports_the_rest(finished, tmp_path, craft, reason):
    for name in ("good", "crafted"):
        subprocess.run(["cp", "-r", str(finished), str(tmp_path / name)], check=True)
    _edit_results(tmp_path / "good", seed=1)
    crafted = tmp_path / "crafted"
    if isinstance(craft, dict):
        _edit_results(crafted, **craft)
    elif craft == "metrics.csv":
        with open(crafted / "metrics.csv", "a") as f:
            f.write('x,y,"zz\nabc,def,ghi,jkl,mno,pqr\n')
    else:
        (crafted / "eval.csv").write_text(
            "steps,integrator,dt,keep_horizon,nfe,seconds,test/rmse\n4,euler,0.5,True,4,0.1,1.0\n"
            "abc,%,zz,True,x,y,nan?\n"
        )
    out = run_cli(str(tmp_path), "--out", str(tmp_path / "report"), module="score_exp.report")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    if reason is not None:
        assert f"unreadable   {crafted}  {reason}" in out.stdout
    assert (tmp_path / "report" / "report.md").is_file()


def test_score_report_out_on_a_file(finished, tmp_path):
    (tmp_path / "out").write_text("a file")
    out = run_cli(str(finished), "--out", str(tmp_path / "out"), module="score_exp.report")
    assert one_error_line(out, "score-report") == (
        f"score-report: error: --out={tmp_path / 'out'} cannot be a folder: it is a file; "
        "choose another --out"
    )
    assert (tmp_path / "out").read_text() == "a file"
