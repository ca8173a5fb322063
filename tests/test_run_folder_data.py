"""A run folder is data, round two (issue 21, items 1-5): crafted folders and studies through the
real CLIs run no planted code and write no file outside the run; results are bound to their data
and do not depend on the folder's path.

Each test plants a real payload (a pickle that touches a marker, a ``_target_`` that writes a
file, an interpolation that would instantiate, a link to a file outside the run, an alias bomb)
and asserts one error line, exit 2, and that nothing ran and nothing outside the run was written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY, cli_env, load_results, run_cli, train_cli
from test_bad_input import one_error_line as one_line

from score_exp.errors import ConfigError
from score_exp.runs import safe_load
from score_exp.runs.checkpoints import load_checkpoint
from score_exp.runs.lock import RunLock
from score_exp.runs.record import LOCK, MOVED_ASIDE, RunDirError

HELPERS_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
READERS = [("score_exp.cli.eval", "score-eval"), ("score_exp.cli.sample", "score-sample")]


class Payload:
    """Unpickling this object touches ``marker``: what a crafted file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def finished(tiny_run):
    """A finished tiny esol_mlp run (2 epochs): the suite's (conftest.tiny_run), never changed
    here (every test that edits or trains into a folder copies it first)."""
    return tiny_run[0]


def crafted(finished: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``finished`` whose config.yaml ``edit(cfg)`` changed."""
    run_dir = tmp_path / "crafted"
    shutil.copytree(finished, run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    edit(cfg)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return run_dir


# ----------------------------------------------------------------------------- 1. no code


@pytest.mark.parametrize("module, prog", READERS)
def test_a_torch_load_target_inside_the_package_runs_no_pickle(finished, tmp_path, module, prog):
    marker, pickle = tmp_path / "pwned", tmp_path / "payload.pt"
    torch.save({"x": Payload(marker)}, pickle)
    # Any module a score_exp module imports is reachable as an attribute under the prefix.
    target = {"_target_": "score_exp.tasks.callbacks.torch.load", "f": str(pickle),
              "weights_only": False}  # fmt: skip
    run_dir = crafted(finished, tmp_path, lambda c: c["task"].update(data=target))
    line = one_line(run_cli(f"run_dir={run_dir}", module=module), prog)
    assert "task.data._target_ = 'score_exp.tasks.callbacks.torch.load' is not allowed" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. no writes


@pytest.mark.parametrize("module, prog", READERS)
def test_a_write_target_in_a_folder_writes_nothing(finished, tmp_path, module, prog):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = {
        "_target_": "score_exp.runs.files.atomic_write_text",
        "path": str(victim),
        "text": "pwned",
    }
    run_dir = crafted(finished, tmp_path, lambda c: c["task"].update(data=target))
    line = one_line(run_cli(f"run_dir={run_dir}", module=module), prog)
    assert "'score_exp.runs.files.atomic_write_text' is not allowed" in line
    assert victim.read_text() == "precious\n"


def test_a_study_database_holds_values_for_known_keys_only(tmp_path):
    import optuna

    victim = tmp_path / "victim.txt"
    db = tmp_path / "tune" / "score" / "optuna.db"
    db.parent.mkdir(parents=True)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{db}")
    attrs = {"+callbacks.pwn._target_": "score_exp.runs.files.atomic_write_text",
             "+callbacks.pwn.path": str(victim), "+callbacks.pwn.text": "pwned",
             "trainer.max_epochs": 1, "task.model.hidden": 16}  # fmt: skip
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs=attrs))
    out = run_cli("retrain", str(db.parent.parent), "--seeds", "1", module="score_exp.cli.tune")
    line = one_line(out, "score-tune")
    assert "+callbacks.pwn._target_=score_exp.runs.files.atomic_write_text" in line
    assert not victim.exists() and not (tmp_path / "tune" / "retrain" / "score").exists()


def test_study_overrides_keep_values_refuse_code_and_paths_and_drop_hydra():
    ok = ["experiment=tune_esol_mlp_cpu", "depth=score", "task.module.lr=0.003",
          "task.model.dropout=0.1", "callbacks.early_stopping=null",
          "hydra.sweeper.n_trials=2", "hydra.sweep.dir=/tmp/x"]  # fmt: skip
    assert safe_load.study_overrides(ok, "db") == ok[:5]
    for bad in ("task.data._target_=builtins.print", "~callbacks.early_stopping",
                "task.module.lr=${oc.env:HOME}", "task.model.nope=1", "depth=../../etc",
                "callbacks.model_checkpoint.dirpath=/tmp/elsewhere", "task.module.lr=1,2",
                "trainer.default_root_dir=/tmp/elsewhere", "++task.x=1"):  # fmt: skip
        with pytest.raises(ConfigError, match="is not allowed"):
            safe_load.study_overrides([bad], "db")


@pytest.mark.parametrize("name", [".lock", "train.log", "metrics.csv", "checkpoints"])
def test_nothing_is_written_through_a_link_in_the_run_folder(tmp_path, name):
    victim = tmp_path / "victim"
    victim.mkdir() if name == "checkpoints" else victim.write_text("precious\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / name).symlink_to(victim)
    line = one_line(train_cli(run_dir, *TINY))
    assert f"{run_dir / name} is a symbolic link" in line
    assert (list(victim.iterdir()) == []) if victim.is_dir() else victim.read_text() == "precious\n"


def test_a_dangling_lock_link_creates_nothing(tmp_path):
    victim = tmp_path / "created-by-the-lock"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).symlink_to(victim)
    one_line(train_cli(run_dir, *TINY))
    assert not victim.exists()
    with pytest.raises(RunDirError, match="symbolic link"):  # the lock itself, too
        RunLock(run_dir).acquire()
    assert not victim.exists()


@pytest.mark.parametrize(
    "name, sweep", [("eval.csv", []), ("multirun.yaml", ["depth.steps=2,4"])], ids=["run", "sweep"]
)
def test_eval_writes_nothing_through_a_link(finished, tmp_path, name, sweep):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    victim = tmp_path / "victim"
    victim.write_text("a\n1\n")
    (run_dir / name).symlink_to(victim)
    out = run_cli(f"run_dir={run_dir}", *sweep, module="score_exp.cli.eval")
    assert f"{name} is a symbolic link" in one_line(out, "score-eval")
    assert (run_dir / name).is_symlink() and victim.read_text() == "a\n1\n"
    assert not (run_dir / "eval.csv").exists() or (run_dir / "eval.csv").is_symlink()


@pytest.mark.parametrize("link", ["aside", "run"])
def test_overwrite_moves_nothing_outside_the_runs_parent(finished, tmp_path, link):
    parent, elsewhere = tmp_path / "parent", tmp_path / "elsewhere"
    parent.mkdir()
    elsewhere.mkdir()
    if link == "aside":  # <parent>/.overwritten is a link to another folder
        run_dir = parent / "run"
        shutil.copytree(finished, run_dir)
        (parent / MOVED_ASIDE).symlink_to(elsewhere)
    else:  # the run folder itself is a link to a folder elsewhere
        shutil.copytree(finished, elsewhere / "run")
        run_dir = parent / "run"
        run_dir.symlink_to(elsewhere / "run")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = one_line(train_cli(run_dir, *TINY, "overwrite=true"))
    assert "is a symbolic link: overwrite=true moves a run folder only within its parent" in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------------------- 3. interpolations


@pytest.mark.parametrize(
    "key, value",
    [
        ("model", "${oc.create:{_target_: pathlib.Path.touch, _args_: ['MARKER']}}"),
        ("data", "${oc.env:SCORE_TEST_OTHER_CSV}"),
    ],
    ids=["oc.create", "oc.env"],
)
def test_an_interpolation_in_a_folder_is_refused_and_never_resolved(finished, tmp_path, key, value):
    marker = tmp_path / "pwned"
    value = value.replace("MARKER", str(marker))
    field = "extra" if key == "model" else "path"
    run_dir = crafted(finished, tmp_path, lambda c: c["task"][key].update({field: value}))
    env = cli_env(SCORE_TEST_OTHER_CSV=str(tmp_path / "other.csv"))
    line = one_line(
        run_cli(f"run_dir={run_dir}", module="score_exp.cli.eval", env=env), "score-eval"
    )
    assert f"task.{key}.{field} = " in line and "is an interpolation" in line
    assert not marker.exists()


# ----------------------------------------------------------------------------- bounded reads

BOMB = "".join(
    f"bomb{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 9) if i else ', '.join(['x'] * 9)}]\n"
    for i in range(10)
)


def test_a_yaml_alias_bomb_is_one_line_for_eval_and_report(finished, tmp_path):
    run_dir = tmp_path / "bomb"
    shutil.copytree(finished, run_dir)
    (run_dir / "config.yaml").write_text(BOMB + (finished / "config.yaml").read_text())
    out = run_cli(f"run_dir={run_dir}", module="score_exp.cli.eval", timeout=120)
    line = one_line(out, "score-eval")
    assert "is not plain YAML" in line and "aliases" in line
    out = run_cli(str(tmp_path), "--out", str(tmp_path / "report"), module="score_exp.report",
                  timeout=120)  # fmt: skip
    assert "Traceback" not in out.stderr and "MemoryError" not in out.stderr, out.stderr[-2000:]
    assert f"skipping unreadable run {run_dir}: config.yaml:" in out.stderr, out.stderr[-2000:]


def test_an_oversized_config_is_one_line(finished, tmp_path):
    run_dir = tmp_path / "big"
    shutil.copytree(finished, run_dir)
    with open(run_dir / "config.yaml", "a") as f:
        f.write("# " + "x" * (5 << 20) + "\n")
    line = one_line(run_cli(f"run_dir={run_dir}", module="score_exp.cli.eval"), "score-eval")
    assert "over the 4,194,304-byte limit for a run folder's config.yaml" in line


# ----------------------------------------------------------------------------- 4. data


@pytest.mark.slow
def test_edited_data_is_another_configuration(tmp_path):
    from score_exp.data import fetch

    csv = tmp_path / "esol.csv"
    lines = fetch("esol").read_text().splitlines(keepends=True)
    csv.write_text("".join(lines[:201]))
    args = [*TINY, f"task.data.path={csv}"]
    run_dir = tmp_path / "run"
    assert train_cli(run_dir, *args).returncode == 0
    csv.write_text("".join(lines[:1] + lines[201:401]))  # other rows, same file name
    line = one_line(train_cli(run_dir, *args))
    assert f"holds a run of other data: {csv} (task.data.path) changed since it ran" in line
    csv.write_text("".join(lines[:201]))  # the data back: the finished run is skipped
    out = train_cli(run_dir, *args)
    assert out.returncode == 0 and "already finished" in out.stderr


# ----------------------------------------------------------------------------- 5. moved runs


def test_a_copied_finished_run_rerun_keeps_its_result(finished, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(finished, run_dir)
    out = train_cli(run_dir, *TINY, "skip_finished=false")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dirpath has changed" not in out.stderr
    was, now = load_results(finished), load_results(run_dir)
    assert now["status"] == "ok" and now["best_checkpoint"] == was["best_checkpoint"]
    assert now["best_val"] == was["best_val"] and now["test"] == was["test"]


@pytest.mark.slow
def test_a_moved_run_resumes_to_the_numbers_of_an_in_place_resume(tmp_path):
    # Epoch 2 onwards is made worse (weights zeroed), so the best stays at an epoch before the
    # kill: a resume that forgot it would pick a later, worse epoch.
    args = ["trainer.max_epochs=4", "task.model.hidden=32", "callbacks.early_stopping=null",
            "+callbacks.kill._target_=sweep_helpers.SigtermAt", "+callbacks.kill.epoch=2",
            "+callbacks.worse._target_=sweep_helpers.ZeroWeightsFrom", "+callbacks.worse.epoch=2"]  # fmt: skip
    env = cli_env(**HELPERS_ENV)
    here = tmp_path / "run"
    out = train_cli(here, *args, env=env)
    assert out.returncode == 143, out.stderr[-3000:]
    shutil.copytree(here, tmp_path / "copy")
    os.rename(tmp_path / "copy", tmp_path / "run2")  # mv run run2 (of a copy, to compare)
    assert train_cli(here, *args, env=env).returncode == 0
    out = train_cli(tmp_path / "run2", *args, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    in_place, moved = load_results(here), load_results(tmp_path / "run2")
    assert in_place["best_val"]["epoch"] < 2
    assert (moved["best_val"], moved["test"]) == (in_place["best_val"], in_place["test"])
    assert moved["best_checkpoint"] == in_place["best_checkpoint"]
    assert "dirpath has changed" not in out.stderr


# ----------------------------------------------------------------------------- the allow-list


def test_trusted_targets_are_exact_names_not_prefixes(monkeypatch):
    monkeypatch.setenv(safe_load.TRUSTED_ENV, "toy_task.ToyModel, toy_task.ToyRegressionData")
    assert safe_load.trusted_targets() == {"toy_task.ToyModel", "toy_task.ToyRegressionData"}
    monkeypatch.setenv(safe_load.TRUSTED_ENV, "toy_task.")
    with pytest.raises(ConfigError, match="names exact targets"):
        safe_load.trusted_targets()


def test_run_folder_reads_take_regular_files_only_never_a_link_a_fifo_or_a_device(tmp_path):
    from score_exp.runs import files

    real = tmp_path / "results.json"
    real.write_text("{}")
    (tmp_path / "link.json").symlink_to(real)
    os.mkfifo(tmp_path / "fifo.json")  # a reader would block on it forever
    for path, why in ((tmp_path / "link.json", "symbolic link"), (tmp_path / "fifo.json",
                      "not a regular file"), (Path("/dev/zero"), "not a regular file")):  # fmt: skip
        with pytest.raises(files.UnsafeRunFile, match=why):
            files.read_bytes(path)
    with pytest.raises(files.UnsafeRunFile, match="over the 1-byte limit"):
        files.read_bytes(real, limit=1)
    with pytest.raises(ConfigError, match="symbolic link"):  # checkpoints too (weights_only)
        load_checkpoint(tmp_path / "link.json")
    assert files.read_json(real) == {}
