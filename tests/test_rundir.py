"""Run folders that never lie, never execute code and survive faults (issue 10), through the CLIs.

Each test names the fault it reproduces: a re-run with another config, crafted checkpoints and
configs, kills at chosen moments (real signals), a truncated checkpoint, a full disk, a diverging
learning rate, paths in sweep overrides, a sweep with several failing jobs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUIET, REPO, TINY, cli_env, load_results, run_cli, train_cli

from score_exp.runs.fingerprint import fingerprint, run_identity
from score_exp.runs.lock import RunLock
from score_exp.runs.record import FINGERPRINT, LOCK, MOVED_ASIDE
from score_exp.runs.sweeps import safe_dirname

HELPERS_ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
KILL_AT_2 = ["+callbacks.kill._target_=sweep_helpers.SigtermAt", "+callbacks.kill.epoch=2"]


def snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``folder`` with its mtime, mode and bytes (to prove nothing was touched)."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_mode, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def errors(stderr: str, prog: str = "score-train") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: error:")]


class Payload:
    """Unpickling this object touches ``marker``: what a crafted run folder would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def finished(tiny_run):
    """A finished tiny esol_mlp run (the suite's TINY run, conftest.tiny_run): commands that
    must leave it untouched run on it; every test that changes a folder copies it first."""
    return tiny_run[0]


# ----------------------------------------------------------------------------- 1. fingerprint


def test_cosmetic_keys_keep_the_fingerprint_and_results_keys_change_it(compose, tmp_path):
    from omegaconf import OmegaConf

    def fp(*overrides):
        cfg = OmegaConf.to_container(compose(*overrides), resolve=False)
        return fingerprint(run_identity(cfg, tmp_path))

    base = fp()
    for cosmetic in (
        "trainer.enable_progress_bar=false", "logger=wandb", "skip_finished=false",
        "fail_on_diverge=true", "overwrite=true", "experiment_name=other",
        "task.data.num_workers=2", "callbacks.last_checkpoint.every_n_train_steps=5",
    ):  # fmt: skip
        assert fp(cosmetic) == base, cosmetic
    for real in ("seed=1", "depth.steps=8", "trainer.precision=64-true", "trainer=gpu",
                 "task.module.lr=0.01", "callbacks.early_stopping=null"):  # fmt: skip
        assert fp(real) != base, real


def test_another_config_is_refused_in_one_line_and_nothing_is_touched(finished):
    before = snapshot(finished)
    out = train_cli(finished, *TINY, "depth=stacked", "depth.steps=2")
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = errors(out.stderr)
    assert "holds a run of another configuration" in line
    assert "depth.steps: 4 -> 2" in line and "depth.share: true -> false" in line
    assert "Traceback" not in out.stderr
    assert snapshot(finished) == before  # .hydra/, train.log and results.json included

    out = train_cli(finished, *TINY, "trainer.enable_progress_bar=true")  # cosmetic: a skip
    assert out.returncode == 0 and "already finished" in out.stderr
    assert snapshot(finished) == before


def test_folder_made_before_fingerprints_is_adopted_or_refused_by_its_config(finished, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(finished, legacy)
    (legacy / FINGERPRINT).unlink()
    # Old configs wrote absolute paths of their folder and lacked keys added since.
    text = (legacy / "config.yaml").read_text().replace(str(finished.resolve()), "/old/place")
    (legacy / "config.yaml").write_text(text)
    out = train_cli(legacy, *TINY, "seed=1")
    assert out.returncode == 2 and "seed: 0 -> 1" in errors(out.stderr)[0]
    out = train_cli(legacy, *TINY)
    assert out.returncode == 0 and "already finished" in out.stderr


def test_a_start_refused_for_bad_input_leaves_the_folder_to_the_corrected_command(tmp_path):
    run_dir = tmp_path / "run"
    out = train_cli(run_dir, *TINY, "task.module.lr=-1")
    assert out.returncode == 2 and "task.module.lr" in errors(out.stderr)[0]
    # Refused before any work: nothing is left behind (no fingerprint to bind the folder, no
    # record), so the corrected command starts afresh in it.
    assert not (run_dir / FINGERPRINT).exists() and not (run_dir / "results.json").exists()
    out = train_cli(run_dir, "trainer.max_epochs=1", "task.model.hidden=32")
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_results(run_dir)["status"] == "ok"


def test_overwrite_moves_the_old_run_aside_and_starts_afresh(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    out = train_cli(run_dir, "trainer.max_epochs=1", "task.model.hidden=32", "overwrite=true")
    assert out.returncode == 0, out.stderr[-2000:]
    (moved,) = (tmp_path / MOVED_ASIDE).iterdir()
    assert moved.name.startswith("run-") and snapshot(moved) == before  # never deleted
    r = load_results(run_dir)
    assert r["status"] == "ok" and r["best_val"]["epoch"] == 0  # the new config's run


@pytest.mark.slow
def test_a_refused_job_fails_alone_in_a_sweep(tmp_path):
    sweep_dir = tmp_path / "sweep"
    job = sweep_dir / "seed=1,task.model.hidden=32,trainer.max_epochs=1"
    job.mkdir(parents=True)
    (job / FINGERPRINT).write_text(json.dumps({"fingerprint": "x", "identity": {"seed": 7}}))
    (job / "metrics.csv").write_text("epoch,val/rmse\n0,1.0\n")  # it trained: a result to keep
    before = snapshot(job)
    out = run_cli(
        "-m", f"hydra.sweep.dir={sweep_dir}", *QUIET, "seed=0,1", "trainer.max_epochs=1",
        "task.model.hidden=32",
    )  # fmt: skip
    assert out.returncode != 0
    ok = load_results(sweep_dir / "seed=0,task.model.hidden=32,trainer.max_epochs=1")
    assert ok["status"] == "ok"
    assert snapshot(job) == before
    assert "1 job(s) of the sweep failed" in out.stderr and "seed: 7 -> 1" in out.stderr


# ----------------------------------------------------------------------------- 2. no code


def test_crafted_checkpoint_runs_nothing_in_score_eval(finished, tmp_path):
    run_dir = tmp_path / "crafted"
    shutil.copytree(finished, run_dir)
    marker = tmp_path / "pwned"
    best = run_dir / load_results(run_dir)["best_checkpoint"]
    torch.save({"state_dict": {}, "x": Payload(marker)}, best)
    out = run_cli(f"run_dir={run_dir}", module="score_exp.cli.eval")
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = errors(out.stderr, "score-eval")
    assert str(best) in line and "not plain data" in line
    assert not marker.exists()


def test_crafted_config_targets_are_refused_by_sample_and_eval(finished, tmp_path):
    run_dir = tmp_path / "crafted"
    shutil.copytree(finished, run_dir)
    marker = tmp_path / "pwned"
    text = (run_dir / "config.yaml").read_text()
    # Nested deep inside the model config, as the issue's {_target_: torch.load, ...} was.
    text = text.replace(
        "  model:\n",
        "  model:\n    extra:\n      nested:\n        _target_: pathlib.Path.touch\n"
        f"        _args_: ['{marker}']\n",
        1,
    )
    (run_dir / "config.yaml").write_text(text)
    for module, prog in (
        ("score_exp.cli.sample", "score-sample"),
        ("score_exp.cli.eval", "score-eval"),
    ):
        out = run_cli(f"run_dir={run_dir}", module=module)
        assert out.returncode == 2, out.stderr[-2000:]
        (line,) = errors(out.stderr, prog)
        assert "task.model.extra.nested._target_ = 'pathlib.Path.touch' is not allowed" in line
        assert not marker.exists()


def test_every_checkpoint_we_write_loads_as_plain_data(finished):
    for path in (finished / "checkpoints").glob("*.ckpt"):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert {"state_dict", "optimizer_states", "callbacks", "loops"} <= set(ckpt)


# ----------------------------------------------------------------------------- 3. last.ckpt


@pytest.mark.slow
def test_last_checkpoint_is_the_latest_epoch_not_the_best(tmp_path):
    # mode=max on val/rmse makes the WORST epoch "best": the first one, as the RMSE falls.
    args = ["trainer.max_epochs=5", "task.model.hidden=32", "callbacks.early_stopping=null",
            "callbacks.model_checkpoint.mode=max"]  # fmt: skip
    kill = ["+callbacks.kill._target_=sweep_helpers.SigtermAt", "+callbacks.kill.epoch=4"]
    run_dir = tmp_path / "run"
    out = train_cli(run_dir, *args, *kill, env=cli_env(**HELPERS_ENV))
    assert out.returncode == 143 and load_results(run_dir)["status"] == "interrupted"
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    assert best.name.startswith("best-0-")  # the best is the first epoch...
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 3  # ...and last.ckpt the end of the last completed epoch
    out = train_cli(run_dir, *args, *kill, env=cli_env(**HELPERS_ENV))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming from" in out.stderr and "last.ckpt" in out.stderr
    # The resumed run trained epoch 4 only; resuming from the best (epoch 0) would have
    # re-trained epochs 1..4.
    assert load_results(run_dir)["epochs_timed"] == 1


@pytest.mark.slow
def test_last_checkpoint_every_n_steps_for_iteration_based_tasks(tmp_path):
    args = ["task=shakespeare_char_cpu", "trainer.max_steps=40", "trainer.val_check_interval=20",
            "task.data.eval_iters=2", "callbacks.last_checkpoint.every_n_train_steps=5"]  # fmt: skip
    kill = ["+callbacks.kill._target_=sweep_helpers.SigtermAt", "+callbacks.kill.step=27"]
    run_dir = tmp_path / "lm"
    out = train_cli(run_dir, *args, *kill, env=cli_env(**HELPERS_ENV))
    assert out.returncode == 143, out.stderr[-2000:]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 25  # the last multiple of 5, past the validation at 20
    out = train_cli(run_dir, *args, *kill, env=cli_env(**HELPERS_ENV))
    assert out.returncode == 0, out.stderr[-2000:]
    r = load_results(run_dir)
    assert r["status"] == "ok" and r["best_val"]["step"] in (20, 40)


# ----------------------------------------------------------------------------- 4. kills, locks


def _popen(args: list[str], log: Path, **kw) -> subprocess.Popen:
    """score-train in the background, its output in ``log`` (a pipe nobody reads would block it)."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "score_exp.cli.train", *args, *QUIET],
            cwd=REPO,
            env=cli_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            **kw,
        )


def _wait_for(predicate, timeout: float = 300, what: str = "") -> None:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


LONG = ["trainer.max_epochs=500", "task.model.hidden=32", "callbacks.early_stopping=null"]


@pytest.mark.slow
def test_a_folder_in_use_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first = _popen([f"hydra.run.dir={run_dir}", *LONG], tmp_path / "first.log")
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), what="last.ckpt")
        out = train_cli(run_dir, *LONG)
        assert out.returncode == 2
        (line,) = errors(out.stderr)
        assert "is in use" in line and f"pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert f"pid {first.pid}" in (run_dir / LOCK).read_text()  # its lock file is left...
    with RunLock(run_dir):  # ...and taken over: the kernel released the dead one's lock
        pass


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killing_a_joblib_sweep_ends_its_workers(tmp_path, sig):
    sweep_dir = tmp_path / "sweep"
    main = _popen(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}",
         "seed=0,1", *LONG],
        tmp_path / "sweep.log",
        start_new_session=True,
    )  # fmt: skip
    jobs = [sweep_dir / f"callbacks.early_stopping=null,seed={s},task.model.hidden=32,"
            "trainer.max_epochs=500" for s in (0, 1)]  # fmt: skip
    try:
        _wait_for(
            lambda: all((j / "checkpoints" / "last.ckpt").exists() for j in jobs),
            what="both jobs training",
        )
        pids = [int((j / LOCK).read_text().split()[1]) for j in jobs]
        assert main.pid not in pids and all(_alive(p) for p in pids)
        main.send_signal(sig)
        main.wait(timeout=60)
        _wait_for(lambda: not any(_alive(p) for p in pids), timeout=60, what="workers to end")
    finally:
        if main.poll() is None:
            main.kill()
        for p in locals().get("pids", []):
            if _alive(p):
                os.kill(p, signal.SIGKILL)
    for j in jobs:  # each ended as a pre-empted job, resumable from its last.ckpt
        assert load_results(j)["status"] == "interrupted"
        with RunLock(j):
            pass


# ----------------------------------------------------------------------------- 5. corrupt ckpt


@pytest.mark.slow
def test_truncated_or_crafted_last_checkpoint_is_moved_aside_and_the_run_goes_on(tmp_path):
    args = ["trainer.max_epochs=4", "task.model.hidden=32", "callbacks.early_stopping=null"]
    env = cli_env(**HELPERS_ENV)
    for fault in ("truncated", "crafted"):
        run_dir = tmp_path / fault
        out = train_cli(run_dir, *args, *KILL_AT_2, env=env)
        assert out.returncode == 143, out.stderr[-2000:]
        last = run_dir / "checkpoints" / "last.ckpt"
        marker = tmp_path / f"pwned-{fault}"
        if fault == "truncated":
            last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
        else:
            torch.save({"global_step": 1, "x": Payload(marker)}, last)
        out = train_cli(run_dir, *args, *KILL_AT_2, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"checkpoint {last} is unreadable" in out.stderr  # the warning names the file
        (aside,) = (run_dir / "checkpoints").glob("last.ckpt.unreadable-*")
        assert "resuming from" in out.stderr and "best-" in out.stderr  # the newest readable
        assert load_results(run_dir)["status"] == "ok"
        assert not marker.exists()


# ----------------------------------------------------------------------------- 9. disk full


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail (EFBIG), like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # a real interpreter (file-size limit) training 2 epochs
def test_full_disk_is_one_line_and_leaves_no_partial_checkpoint(finished, tmp_path):
    # A 128 kB limit on every file this process writes: the 1.4 MB checkpoints cannot be
    # written (the kernel fails the write half-way), the small files can. `finished` built the
    # data caches.
    run_dir = tmp_path / "full"
    out = subprocess.run(
        [sys.executable, "-m", "score_exp.cli.train", f"hydra.run.dir={run_dir}", *QUIET,
         "trainer.max_epochs=2"],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900,
        preexec_fn=_file_size_limit(128 * 1024),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    (line,) = errors(out.stderr)
    assert f"cannot write checkpoint {run_dir / 'checkpoints'}" in line and "File too large" in line
    assert "Traceback" not in out.stderr
    assert list((run_dir / "checkpoints").iterdir()) == []  # no temp file, no truncated ckpt
    r = load_results(run_dir)
    assert r["status"] == "failed" and "cannot write checkpoint" in r["error"]


# ----------------------------------------------------------------------------- 10. divergence


@pytest.mark.slow  # two runs of up to 20 epochs
def test_a_finite_but_exploding_run_is_recorded_as_diverged(tmp_path):
    bad = ["task.module.lr=1e3", "trainer.max_epochs=20", "task.model.hidden=32"]
    out = train_cli(tmp_path / "div", *bad)
    assert out.returncode == 0, out.stderr[-2000:]
    r = load_results(tmp_path / "div")
    assert r["status"] == "diverged", r.get("test")
    at = r["diverged_at"]
    assert "val/rmse > 10 x" in at["rule"] and at["val/rmse"] > at["threshold"]
    assert at["epoch"] < 19  # stopped early, not trained to the end
    out = train_cli(tmp_path / "div2", *bad, "fail_on_diverge=true")
    assert out.returncode == 3 and load_results(tmp_path / "div2")["status"] == "diverged"


# ----------------------------------------------------------------------------- 12, 13. sweeps


def test_safe_dirname_keeps_paths_inside_and_names_distinct():
    assert safe_dirname("task.data.path=../../x.csv") == "task.data.path=..%2F..%2Fx.csv"
    assert "/" not in safe_dirname("a=/etc/passwd")
    assert safe_dirname("a=b%2Fc") != safe_dirname("a=b/c")
    assert safe_dirname("..") == "_.."
    long = safe_dirname("x=" + "y" * 1000)
    assert len(long) <= 200 and long != safe_dirname("x=" + "y" * 999)


def test_sweep_job_folders_stay_inside_and_every_failed_job_is_listed(tmp_path):
    sweep_dir = tmp_path / "a" / "b" / "sweep"
    out = run_cli(
        "-m", f"hydra.sweep.dir={sweep_dir}", *QUIET,
        "task.data.path=../../../../escaped.csv,/nonexistent/x.csv",
    )  # fmt: skip
    assert out.returncode != 0
    outside = [p for p in tmp_path.rglob("*") if not p.is_relative_to(sweep_dir)]
    assert all(p in (tmp_path / "a", tmp_path / "a" / "b") for p in outside), outside
    assert {p.name for p in sweep_dir.iterdir() if p.is_dir()} == {
        "task.data.path=..%2F..%2F..%2F..%2Fescaped.csv",
        "task.data.path=%2Fnonexistent%2Fx.csv",
    }
    assert "2 job(s) of the sweep failed" in out.stderr
    assert "task.data.path=../../../../escaped.csv: " in out.stderr
    assert "task.data.path=/nonexistent/x.csv: " in out.stderr
