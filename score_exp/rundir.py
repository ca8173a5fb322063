"""Run folders: bound to their config, locked while trained, read as data and never as code.

A run folder holds the result of exactly the configuration it names, whatever was killed,
edited, corrupted or shared in between:

- **Fingerprint** (:func:`claim_run_dir`): the folder is bound to a hash of its resolved config
  minus :data:`COSMETIC_KEYS` (``fingerprint.json``). Re-running with the same fingerprint skips
  a finished run or resumes an unfinished one; another fingerprint is refused with one line
  naming the keys that differ, before anything in the folder is touched. ``overwrite=true``
  moves the old folder aside (``<parent>/.overwritten/<name>-<time>``), never deletes it.
- **Lock** (:class:`RunLock`): one process trains in a folder at a time (``flock`` on
  ``<run>/.lock``, released by the kernel when the process dies, so a stale lock of a dead
  process is simply taken over).
- **Safe loading** (:func:`load_checkpoint`, :func:`load_run_config`): checkpoints load with
  ``weights_only=True``; a run is rebuilt from the project's configs with plain values from its
  ``config.yaml`` (:mod:`score_exp.runs.safe_load`); files are read bounded, without following
  links, and nothing is written through a link (:mod:`score_exp.runs.files`).
- **Data** (:mod:`score_exp.runs.fingerprint`): the fingerprint holds the sha256 of every input
  file, so edited data is another configuration.
- **Resume** (:func:`resume_checkpoint`): an unreadable ``last.ckpt`` is moved aside with a warning
  and the run resumes from the newest readable checkpoint, or starts afresh.
- **Sweeps**: job folder names never escape the sweep folder (:func:`safe_dirname`, the
  ``safe_dirname`` resolver), workers stop when the sweep process dies (:func:`watch_parent`),
  and every failed job is listed at the end (:class:`SweepFailures`).
"""

from __future__ import annotations

import datetime
import errno
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

from score_exp.errors import ConfigError, DataError, ScoreExpError
from score_exp.io import atomic_write_json, atomic_write_text, flatten
from score_exp.runs import fingerprint as inputs
from score_exp.runs.files import (
    CHECKPOINT_LIMIT,
    UnsafeRunFile,
    check_move_aside,
    load_yaml,
    open_regular,
    read_json,
    refuse_links,
)
from score_exp.runs.safe_load import TRUSTED_ENV, load_run_config, trusted_targets  # noqa: F401

log = logging.getLogger("score_exp.rundir")

FINGERPRINT = "fingerprint.json"
LOCK = ".lock"
MOVED_ASIDE = ".overwritten"  # overwrite=true moves old run folders here (score-report skips it)
RESULTS = "results.json"
LEGACY = "<from config.yaml>"  # marks an identity read from a folder made before fingerprints

# Keys that do not change a run's numbers, left out of its fingerprint: where it is logged or
# shown, what a re-run does with a finished folder, the output paths, loader workers (the data
# streams do not depend on them) and how often last.ckpt is written. Device, precision,
# deterministic, the budget, early stopping and the monitored metric DO change results.
COSMETIC_KEYS = (
    "logger",
    "experiment_name",
    "skip_finished",
    "fail_on_diverge",
    "overwrite",
    "objective",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.default_root_dir",
    "task.data.num_workers",
    "task.data.pin_memory",
    "callbacks.model_checkpoint.dirpath",
    "callbacks.model_checkpoint.save_last",
    "callbacks.last_checkpoint",
)


class RunDirError(ConfigError):
    """The run folder cannot be used as asked (another config, in use, unknown origin)."""


# ----------------------------------------------------------------------------- fingerprint


def run_identity(resolved: dict, run_dir: Path) -> dict[str, Any]:
    """The flat ``{dotted key: value}`` that a run folder is bound to.

    ``resolved`` is the resolved config; cosmetic keys are dropped and the run folder's own
    path is replaced by ``<run_dir>`` so that a moved or copied folder keeps its identity.
    """
    flat = flatten(resolved)
    here = str(Path(run_dir).resolve())
    out = {}
    for key, value in flat.items():
        if any(key == c or key.startswith(c + ".") for c in COSMETIC_KEYS):
            continue
        if isinstance(value, str) and here in value:
            value = value.replace(here, "<run_dir>")
        out[key] = value
    return out


def fingerprint(identity: dict[str, Any]) -> str:
    """sha256 of the identity (sorted JSON)."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> str:
    """``key: old -> new`` for every key that differs (at most ``limit``, then a count)."""
    missing = "<absent>"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
    keys.sort(
        key=lambda k: k not in old or k not in new
    )  # changed values first, then added/removed
    parts = [f"{k}: {_show(old.get(k, missing))} -> {_show(new.get(k, missing))}" for k in keys]
    if len(parts) > limit:
        parts = parts[:limit] + [f"... {len(parts) - limit} more"]
    return "; ".join(parts)


def _show(value: Any) -> str:
    return value if value == "<absent>" else json.dumps(value, default=str)


def stored_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity a folder is bound to: ``fingerprint.json``, else its ``config.yaml``.

    A folder written before fingerprints existed has only ``config.yaml`` (the resolved config);
    its identity is computed from it (marked :data:`LEGACY`), so an unchanged config adopts the
    folder. Keys added to the configs since then are not in it and are not compared.

    Raises:
        RunDirError: the folder holds a run (checkpoints or results) but neither file.
    """
    path = run_dir / FINGERPRINT
    if path.is_file():
        try:
            return dict(read_json(path)["identity"])
        except (OSError, ValueError, KeyError, TypeError, ScoreExpError) as e:
            raise RunDirError(
                f"{path} is unreadable ({e}); pass overwrite=true to start afresh"
            ) from None
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            resolved = load_yaml(config)  # bounded, alias-limited, nothing resolved
        except ScoreExpError as e:  # one line, not a traceback
            raise RunDirError(f"{e}; pass overwrite=true to start afresh") from None
        if not isinstance(resolved, dict):
            raise RunDirError(f"{config} is not a mapping; pass overwrite=true to start afresh")
        return {**run_identity(resolved, run_dir), LEGACY: True}
    if (run_dir / RESULTS).exists() or (run_dir / "checkpoints").exists():
        raise RunDirError(
            f"{run_dir} holds a run with no config.yaml or {FINGERPRINT}: its configuration is "
            "unknown; pass overwrite=true to move it aside and start afresh"
        )
    return None


def holds_run(run_dir: Path) -> bool:
    """True when ``run_dir`` holds anything of a run (not just Hydra's log of a failed start)."""
    return any(
        (run_dir / name).exists() for name in (FINGERPRINT, "config.yaml", RESULTS, "checkpoints")
    )


def _trained(run_dir: Path) -> bool:
    """True once a run wrote anything of a result: results.json, metrics or a checkpoint."""
    ckpts = run_dir / "checkpoints"
    return (
        (run_dir / RESULTS).exists()
        or (run_dir / "metrics.csv").exists()
        or (ckpts.is_dir() and any(ckpts.iterdir()))
    )


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<parent>/.overwritten/<name>-<time>``; returns the new path."""
    try:
        check_move_aside(run_dir, MOVED_ASIDE)  # never moves anything outside the run's parent
    except UnsafeRunFile as e:
        raise RunDirError(str(e)) from None
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    target = run_dir.parent / MOVED_ASIDE / f"{run_dir.name}-{stamp}"
    n = 1
    while target.exists():
        target = run_dir.parent / MOVED_ASIDE / f"{run_dir.name}-{stamp}-{n}"
        n += 1
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(run_dir, target)
    except OSError as e:  # a file named .overwritten, a read-only parent: one line
        raise RunDirError(
            f"overwrite=true cannot move {run_dir} aside into {target.parent} "
            f"({e.strerror or e}: {e.filename or target.parent}); rename or remove it"
        ) from None
    return target


def claim_run_dir(
    run_dir: Path,
    resolved: dict,
    *,
    overwrite: bool = False,
    skip_finished: bool = True,
    hydra_files: dict[str, str] | None = None,
) -> tuple[dict | None, RunLock | None]:
    """Bind ``run_dir`` to the resolved config before any work; returns ``(finished, lock)``.

    ``finished`` is the previous ``results.json`` when the run is already done (status ``ok``,
    same fingerprint, ``skip_finished``): nothing is written and no lock is taken. Otherwise the
    folder is locked (the caller keeps ``lock`` until the run ends), ``fingerprint.json`` and
    ``hydra_files`` (``{relative path: text}``, Hydra's ``.hydra/`` record) are written.

    Raises:
        RunDirError: another config made the folder, or another process trains in it; the
            folder is left exactly as it was.
    """
    run_dir = Path(run_dir)
    try:
        refuse_links(run_dir)  # nothing of a run is written through a link (the log included)
    except UnsafeRunFile as e:
        raise RunDirError(str(e)) from None  # RunDirError: reported, never logged into the folder
    identity = {**run_identity(resolved, run_dir), **inputs.input_hashes(resolved)}
    if overwrite and holds_run(run_dir):
        # Never move a folder another process trains in; the lock is held across the move, so
        # no run can start in the folder between the check and the rename.
        with RunLock(run_dir, record=False):
            moved = move_aside(run_dir)
            run_dir.mkdir(parents=True)  # the fresh run's folder (its log file opens in it)
        log.warning("overwrite=true: moved the previous run %s to %s", run_dir, moved)
    old = stored_identity(run_dir) if run_dir.is_dir() else None
    if old is not None and old.pop(LEGACY, False):
        identity_then = {k: v for k, v in identity.items() if k in old}  # keys added since
    else:
        identity_then = identity
    if old is not None and not inputs.has_inputs(old):  # made before data was fingerprinted
        identity_then = inputs.without_inputs(identity_then)
    if old is not None and fingerprint(old) != fingerprint(identity_then) and not _trained(run_dir):
        # A start that failed before training (bad input) left a config but nothing of a
        # result: the corrected command may take the folder over.
        log.warning(
            "%s holds no result of its earlier configuration: re-bound to this one", run_dir
        )
        old = None
    if old is not None and fingerprint(old) != fingerprint(identity_then):
        raise RunDirError(
            inputs.changed_data(run_dir, old, identity_then)
            or f"{run_dir} holds a run of another configuration "
            f"({differences(inputs.without_inputs(old), inputs.without_inputs(identity_then))}); "
            "use another folder, or overwrite=true to move the old run aside"
        )
    if skip_finished and old is not None and (run_dir / RESULTS).is_file():
        try:
            previous = read_json(run_dir / RESULTS)
        except (OSError, ValueError, ScoreExpError):
            previous = None
        if isinstance(previous, dict) and previous.get("status") == "ok":
            return previous, None
    lock = RunLock(run_dir).acquire()
    try:
        atomic_write_json(
            run_dir / FINGERPRINT, {"fingerprint": fingerprint(identity), "identity": identity}
        )
        for rel, text in (hydra_files or {}).items():
            atomic_write_text(run_dir / rel, text)
    except BaseException:
        lock.release()
        raise
    return None, lock


# ----------------------------------------------------------------------------- lock


class RunLock:
    """An exclusive lock on a run folder: ``flock`` on ``<run_dir>/.lock`` (pid and host inside).

    The kernel releases the lock when its process dies (SIGKILL included), so a lock file left
    by a dead process is taken over by the next run. Use as a context manager or call
    :meth:`acquire` / :meth:`release`.
    """

    held = 0  # run folders this process holds (watch_parent waits for them to be released)

    def __init__(self, run_dir: Path, record: bool = True) -> None:
        self.path = Path(run_dir) / LOCK
        self.record = record  # write this process's pid and host into the lock file
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunDirError` naming the process that holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_NOFOLLOW: a crafted .lock link never gets its target overwritten
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            raise RunDirError(
                f"{self.path} is a symbolic link: a run folder's lock is never written through "
                "a link; remove it"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use: {holder} trains in it; wait for it to end "
                "(a run killed with its lock is taken over automatically)"
            ) from None
        if self.record:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        RunLock.held += 1
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
            RunLock.held -= 1

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def in_training(run_dir: Path) -> str | None:
    """Who trains in ``run_dir`` now (the lock's ``pid ... on host``), or None.

    Only looks: the lock is tested with a shared ``flock`` on a read-only descriptor and let go
    at once, and a folder without a ``.lock`` (never trained, or read-only) is not in training.
    """
    import fcntl

    try:
        fd = os.open(Path(run_dir) / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # drops the shared lock too
    return None


# ----------------------------------------------------------------------------- safe loading


def load_checkpoint(path: Path) -> dict:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain values, never code.

    Raises:
        DataError: the file is unreadable, truncated or holds anything but plain data
            (a pickled object would run code): one line naming the file.
    """
    import torch

    try:  # a regular file, not a link or a device, of a sane size (runs.files)
        with open_regular(path, CHECKPOINT_LIMIT) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except ScoreExpError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), OSError, EOFError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"checkpoint {path} is unreadable (truncated?) or not plain data: {reason}"
        ) from None


def find_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """``checkpoint`` (relative to ``run_dir``), else results.json's best, else ``last.ckpt``.

    Raises:
        ConfigError: the folder or the checkpoint does not exist, or a path leaves the folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} does not exist")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a score-train run folder (no config.yaml)")
    if checkpoint:
        path = run_dir / checkpoint
        if not path.resolve().is_relative_to(run_dir.resolve()):
            raise ConfigError(
                f"checkpoint={checkpoint} leaves the run folder {run_dir}: give a checkpoint "
                "of the run, relative to it (e.g. checkpoints/last.ckpt)"
            )
        if not path.is_file():
            raise ConfigError(f"checkpoint {path} does not exist")
        return path
    candidates = []
    if (run_dir / RESULTS).is_file():
        try:
            best = read_json(run_dir / RESULTS).get("best_checkpoint")
        except (OSError, ValueError, AttributeError, ScoreExpError):
            best = None
        if isinstance(best, str) and best:
            path = (run_dir / best).resolve()
            if not path.is_relative_to(run_dir.resolve()):
                raise ConfigError(f"{run_dir / RESULTS}: best_checkpoint {best!r} leaves the run")
            candidates.append(path)
    candidates.append(run_dir / "checkpoints" / "last.ckpt")
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{run_dir} holds no checkpoint (looked for {looked}); train it first")


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a re-run resumes from: ``last.ckpt`` if readable, else the newest other.

    Every candidate is loaded with ``weights_only=True`` first. An unreadable or non-data file
    (truncated by a full disk, corrupted, crafted) is renamed ``<name>.unreadable-<time>`` with a
    warning naming it; the newest readable checkpoint (by global step) is used instead, or
    ``None`` (start afresh).
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    last = folder / "last.ckpt"
    ordered = ([last] if last.is_file() else []) + sorted(
        (p for p in folder.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime
    )[::-1]
    best: tuple[int, Path] | None = None
    for path in ordered:
        try:
            step = int(load_checkpoint(path).get("global_step", -1))
        except (ScoreExpError, AttributeError, TypeError, ValueError) as e:
            stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            aside = path.with_name(f"{path.name}.unreadable-{stamp}")
            os.rename(path, aside)
            log.warning("%s; moved it to %s", e, aside.name)
            continue
        if path == last:
            return last
        if best is None or step > best[0]:
            best = (step, path)
    if best is not None:
        log.warning("resuming from %s instead (the newest readable checkpoint)", best[1])
        return best[1]
    return None


# ----------------------------------------------------------------------------- sweeps


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


def watch_parent(interval: float = 1.0, grace: float = 120.0) -> None:
    """In a job started by another score-train process, stop when that process dies.

    The parent (the sweep's main process) names itself in ``$SCORE_EXP_PARENT_PID``. A daemon
    thread checks every ``interval`` seconds that it lives; when it is gone (SIGTERM, SIGKILL),
    this process sends itself SIGTERM, so a training run ends as ``interrupted`` with its
    ``last.ckpt`` (Lightning's SIGTERM handling) and resumes when the sweep is re-run; the
    process exits once its run folder is released, or after ``grace`` seconds. Jobs in the parent's own process watch nothing.
    """
    global _watching
    parent = os.environ.get(PARENT_ENV, "")
    if _watching or not parent.isdigit() or int(parent) == os.getpid():
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


FAILURES = "failed_jobs.jsonl"
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

        if job_return.status != JobStatus.FAILED:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        error = job_return._return_value
        line = json.dumps(
            {
                "sweep": os.environ.get(SWEEP_ENV),
                "overrides": list(job_return.overrides or []),
                "error": f"{type(error).__name__}: {error}".splitlines()[0][:500],
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
    if rows:
        print(f"{prog}: {len(rows)} job(s) of the sweep failed:", file=sys.stderr)
        for r in rows:
            print(f"  {','.join(r['overrides'])}: {r['error']}", file=sys.stderr)
    return len(rows)
