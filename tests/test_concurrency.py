"""Concurrent commands on one run or sweep folder (issue 21, item 6), through the real CLIs:
a run in training is never moved away or evaluated half-trained, a second sweep into the same
folder keeps the first one's record, a sweep killed at any moment leaves no worker behind, and a
sweep folder that does not exist yet has nothing to report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUIET, REPO, cli_env, run_cli, train_cli
from test_bad_input import one_error_line
from test_rundir import LONG, _alive, _popen, _wait_for

from score_exp.runs.lock import RunLock, in_training
from score_exp.runs.record import FAILURES, FINGERPRINT, MOVED_ASIDE
from score_exp.runs.sweeps import PARENT_ENV


@pytest.fixture
def training(tmp_path):
    """A run training (500 epochs) in ``tmp_path/run`` once its first last.ckpt exists."""
    run_dir = tmp_path / "run"
    proc = _popen([f"hydra.run.dir={run_dir}", *LONG], tmp_path / "first.log")
    try:
        _wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), what="last.ckpt")
        yield run_dir, proc
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_overwrite_and_score_eval_leave_a_run_in_training_alone(training):
    run_dir, proc = training
    # overwrite=true: refused while the other process trains; nothing is moved aside.
    line = one_error_line(train_cli(run_dir, *LONG, "overwrite=true"))
    assert "is in use" in line and f"pid {proc.pid}" in line
    assert not (run_dir.parent / MOVED_ASIDE).exists()
    assert proc.poll() is None and (run_dir / FINGERPRINT).exists()
    # score-eval: says the run is in training instead of evaluating a half-trained checkpoint.
    out = run_cli(f"run_dir={run_dir}", module="score_exp.cli.eval")
    line = one_error_line(out, "score-eval")
    assert line.startswith(f"score-eval: error: {run_dir} is in training (pid {proc.pid} on ")
    assert not (run_dir / "eval.csv").exists()
    assert proc.poll() is None  # the run goes on


def test_score_eval_of_a_finished_run_is_not_taken_for_a_run_in_training(tmp_path):
    """A lock file left by a finished (or killed) run holds no lock: the run is evaluated."""
    assert in_training(tmp_path) is None  # no .lock at all
    with RunLock(tmp_path):
        assert in_training(tmp_path) == f"pid {os.getpid()} on {socket.gethostname()}"
    assert in_training(tmp_path) is None


def _failures(sweep_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (sweep_dir / FAILURES).read_text().splitlines()]


def test_a_second_sweep_into_the_same_folder_keeps_the_first_ones_failures(tmp_path):
    sweep_dir = tmp_path / "sweep"
    first = run_cli("-m", f"hydra.sweep.dir={sweep_dir}", *QUIET, "task.data.path=/nonexistent/a.csv,/nonexistent/b.csv")  # fmt: skip
    assert "2 job(s) of the sweep failed" in first.stderr
    second = run_cli("-m", f"hydra.sweep.dir={sweep_dir}", *QUIET, "task.data.path=/nonexistent/c.csv,/nonexistent/d.csv")  # fmt: skip
    # Each invocation lists its own failed jobs; the file keeps every invocation's lines.
    assert "2 job(s) of the sweep failed" in second.stderr
    assert "a.csv" not in second.stderr and "c.csv" in second.stderr
    rows = _failures(sweep_dir)
    paths = [next(o for o in r["overrides"] if o.startswith("task.data.path=")) for r in rows]
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.csv", "b.csv", "c.csv", "d.csv"]
    assert rows[0]["sweep"] == rows[1]["sweep"] != rows[2]["sweep"] == rows[3]["sweep"]


def _descendants(pid: int) -> list[int]:
    """Processes started for the sweep ``pid`` (they carry it in $SCORE_EXP_PARENT_PID)."""
    mark = f"{PARENT_ENV}={pid}".encode()
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if mark in env and _alive(int(entry)):
                out.append(int(entry))
    return out


def _shm(pid: int) -> list[str]:
    """Loky's semaphores and joblib's memmapping folders of the sweep process ``pid``."""
    return [n for n in os.listdir("/dev/shm") if f"-{pid}-" in n or f"_{pid}_" in n]


@pytest.mark.slow
def test_killing_a_joblib_sweep_as_its_workers_start_leaves_nothing_behind(tmp_path):
    """Killed as soon as its loky workers exist (before any job reached them), the sweep's
    workers and /dev/shm files are gone within seconds, not after loky's 300 s idle timeout."""
    sweep_dir = tmp_path / "sweep"
    main = _popen(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep_dir}",
         "seed=0,1", *LONG],
        tmp_path / "sweep.log",
        start_new_session=True,
    )  # fmt: skip
    workers: list[int] = []
    try:
        _wait_for(lambda: bool(_descendants(main.pid)), timeout=120, what="loky workers")
        workers = _descendants(main.pid)
        main.send_signal(signal.SIGKILL)
        main.wait(timeout=60)
        t0 = time.monotonic()
        _wait_for(lambda: not _descendants(main.pid), timeout=20, what="the workers to end")
        _wait_for(lambda: not _shm(main.pid), timeout=10, what="/dev/shm to be cleaned")
        assert time.monotonic() - t0 < 20
    finally:
        if main.poll() is None:
            main.kill()
        # Workers left (a failure): killed; loky's resource tracker is left to clean /dev/shm.
        for p in set(workers) | set(_descendants(main.pid)):
            try:
                if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes():
                    os.kill(p, signal.SIGKILL)
            except OSError:  # ended meanwhile
                pass


def test_score_report_on_a_sweep_folder_that_does_not_exist_yet(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "score_exp.report", str(tmp_path / "sweep")],
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (
        f"score-report: nothing to report: no run folder under {tmp_path / 'sweep'} "
        "(does not exist yet)\n"
    )
    assert not (tmp_path / "sweep").exists()  # no report folder made in its place
