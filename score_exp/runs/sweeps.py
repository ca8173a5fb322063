"""Sweep plumbing: job folder names, workers that stop with their sweep, failed jobs listed.

- Job folder names never escape the sweep folder (:func:`safe_dirname`, the ``safe_dirname``
  resolver of ``configs/train.yaml``, registered on import).
- Workers stop when the sweep process dies (:func:`watch_parent`, :func:`adopt_jobs`).
- Every failed job is listed at the end (:class:`SweepFailures`, :func:`report_sweep_failures`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from score_exp.runs import cluster, stop
from score_exp.runs.lock import RunLock
from score_exp.runs.record import FAILURES

log = logging.getLogger("score_exp.runs")


def safe_dirname(name: str, max_len: int = 200) -> str:
    """A sweep job's folder name from its overrides that stays inside the sweep folder.

    ``/`` and ``\\`` are percent-encoded (``%`` too, so distinct overrides keep distinct names),
    a name made only of dots gets a ``_`` prefix, and a name longer than ``max_len`` is cut with a
    hash of the whole name appended.
    """
    out = str(name).replace("%", "%25").replace("/", "%2F").replace("\\", "%5C")
    out = out.replace("\0", "%00")
    if re.fullmatch(r"\.*", out) and out:
        out = "_" + out
    if len(out.encode()) > max_len:
        digest = hashlib.sha256(out.encode()).hexdigest()[:12]
        out = out.encode()[: max_len - 13].decode(errors="ignore") + "-" + digest
    return out


if not OmegaConf.has_resolver("safe_dirname"):
    OmegaConf.register_new_resolver("safe_dirname", safe_dirname)

PARENT_ENV = "SCORE_EXP_PARENT_PID"
_watching = False


def adopt_jobs() -> None:
    """Watch this process's own score-train parent (:func:`watch_parent`), then name this process
    as the parent of the jobs it starts (sweep workers, data-parallel ranks)."""
    watch_parent()
    os.environ[PARENT_ENV] = str(os.getpid())
    os.environ[cluster.PARENT_WHERE_ENV] = cluster.where()  # a Slurm job will not watch it


def watch_parent(interval: float = 1.0, grace: float = 120.0) -> None:
    """In a job started by another score-train process, stop when that process dies.

    The parent (the sweep's main process) names itself in ``$SCORE_EXP_PARENT_PID``. A daemon
    thread checks every ``interval`` seconds that it lives; when it is gone (SIGTERM, SIGKILL),
    this process sends itself SIGTERM, so a training run ends as ``interrupted`` with its
    ``last.ckpt`` (Lightning's SIGTERM handling) and resumes when the sweep is re-run; the
    process exits once its run folder is released, or after ``grace`` seconds. Jobs in the parent's own process watch nothing.
    Nor does a job that a scheduler owns (another host, PID namespace or Slurm job than the
    parent's, :func:`score_exp.runs.cluster.submitter_here`): it outlives the shell that submitted it.
    """
    global _watching
    parent = os.environ.get(PARENT_ENV, "")
    if _watching or not parent.isdigit() or int(parent) == os.getpid():
        return
    if not cluster.submitter_here():
        return
    pid = int(parent)

    direct = os.getppid() == pid  # a killed direct parent may linger as a zombie: ask getppid

    def alive() -> bool:
        if direct:
            return os.getppid() == pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie answers kill(0) too
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def watch() -> None:
        import signal

        while alive():
            time.sleep(interval)
        log.warning(
            "the sweep process %d died: stopping this job (re-run the sweep to resume)", pid
        )
        os.kill(os.getpid(), signal.SIGTERM)
        t0 = time.monotonic()
        while RunLock.held and time.monotonic() - t0 < grace:
            time.sleep(0.1)  # the run records itself as interrupted and releases its folder
        os._exit(128 + signal.SIGTERM)  # a pool worker would otherwise wait for its next job

    _watching = True
    threading.Thread(target=watch, name="score-exp-parent-watch", daemon=True).start()


SWEEP_ENV = "SCORE_EXP_SWEEP_ID"  # names one invocation of a sweep in failed_jobs.jsonl


def stop_workers_with_sweep() -> None:
    """Joblib's loky workers stop within about a second once the sweep process dies.

    A worker runs :func:`watch_parent` from its start (loky's ``initializer``), not only once
    a job reaches it: a sweep killed before or while its jobs are handed out would otherwise
    leave idle workers (and the ``/dev/shm`` files their resource tracker keeps for them) for
    loky's idle timeout, 300 s. Hydra's joblib launcher names the ``loky`` backend, so the
    backend registered under that name is loky's own with this initializer.
    """
    try:
        import joblib
        from joblib._parallel_backends import LokyBackend
    except ImportError:  # no joblib: no loky workers to stop
        return

    class _LokyWatchingParent(LokyBackend):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("initializer", watch_parent)
            super().__init__(*args, **kwargs)

    joblib.register_parallel_backend("loky", _LokyWatchingParent)


_sweep_dir: Path | None = None

try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra-core always provides it
    _HydraCallback = object


class SweepFailures(_HydraCallback):
    """Hydra callback: record every failed job of a sweep in ``<sweep dir>/failed_jobs.jsonl``.

    Jobs may run in other processes (joblib, submitit), so each failure is appended to the file
    (one short line, ``O_APPEND`` under ``flock``), tagged with the invocation's
    ``$SCORE_EXP_SWEEP_ID``; the sweep's main process lists its own at the end
    (:func:`report_sweep_failures`), where Hydra itself names only the first. Another invocation
    into the same sweep folder never removes them.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir
        _sweep_dir = Path(str(config.hydra.sweep.dir))
        # Another invocation may run into the same sweep folder: its lines are never removed;
        # each line names its invocation (inherited by the jobs), and each lists its own.
        os.environ[SWEEP_ENV] = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        stop_workers_with_sweep()

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if job_return.status != JobStatus.FAILED or config.hydra.mode != RunMode.MULTIRUN:
            return  # a single run's failure is its own (results.json, stderr), not a sweep's
        if cluster.external_rank_world()[0] != 0:
            return  # a data-parallel job's outcome is its rank 0's (the others' are in their logs)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        error = job_return._return_value
        text = (
            stop.peer_lost_message(error)
            if isinstance(error, BaseException) and stop.peer_lost(error)
            else f"{type(error).__name__}: {error}"
        )
        line = json.dumps(
            {
                "sweep": os.environ.get(SWEEP_ENV),
                "overrides": list(job_return.overrides or []),
                "error": text.splitlines()[0][:500],
                "run_dir": str(config.hydra.runtime.output_dir),
                "slurm": cluster.slurm_job(),
            }
        )
        sweep_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(sweep_dir / FAILURES, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)  # one whole line per writer, whatever the file system
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def _ended_ok(row: dict) -> bool:
    """True when the failed job's run folder now holds an ``ok`` record of the same Slurm job (a
    later segment, after a requeue). A folder refused to this job (another config's finished
    run) or a job outside Slurm never counts."""
    from score_exp.runs.record import RunFolder

    job = (row.get("slurm") or {}).get("job_id")
    if not job or not row.get("run_dir"):
        return False
    record = RunFolder(Path(row["run_dir"])).finished_record()
    return record is not None and (record.slurm or {}).get("job_id") == job


def report_sweep_failures(prog: str) -> int:
    """Print every failed job of the sweep this process ran (if any); returns their count."""
    import sys

    if _sweep_dir is None or not (_sweep_dir / FAILURES).is_file():
        return 0
    rows = []
    for line in (_sweep_dir / FAILURES).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("sweep") == os.environ.get(SWEEP_ENV):
            rows.append(row)
    # A job that failed in one segment and ended ok after Slurm requeued it did not fail: its
    # outcome is its run folder's record now (launch.report counts it as requeued, ended ok).
    rows = [r for r in rows if not _ended_ok(r)]
    if rows:
        print(f"{prog}: {len(rows)} job(s) of the sweep failed:", file=sys.stderr)
        for r in rows:
            print(f"  {','.join(r['overrides'])}: {r['error']}", file=sys.stderr)
    return len(rows)
