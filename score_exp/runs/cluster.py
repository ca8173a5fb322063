"""Jobs that a scheduler owns: Slurm sweeps, data-parallel ranks started by ``srun``, requeues.

The local safety nets of :mod:`score_exp.runs` must hold on a cluster too:

- **Whose job is it** (:func:`submitter_here`): a sweep worker stops when its score-train parent
  dies (:func:`score_exp.runs.sweeps.watch_parent`) only where that parent's PID means something:
  the same host, PID namespace and Slurm allocation. A job that Slurm started (another allocation,
  maybe another node) belongs to the scheduler and outlives its submitter.
- **All ranks decide together** (:func:`decide_together`): rank 0 claims the run folder (skip,
  refuse, resume, lock) once, and every rank acts on that one decision. Ranks that rank 0 starts
  itself (Lightning's local DDP) receive it in their environment; ranks that ``srun`` (or
  ``torchrun``) starts beside it receive it over a short-lived ``TCPStore`` before the process
  group exists, so a re-run of a finished DDP job exits at once on every rank and a refused one
  fails on every rank with the same line.
- **Skip before submitting** (:func:`finished_run`): the sweeper asks, before launching, whether
  a job's folder already holds its finished run (read only: the folder stays byte-identical).
- **Requeues** (:func:`resume_point`, :func:`segments`): a run resumed after a Slurm requeue starts
  from the newest readable checkpoint, Lightning's own ``hpc_ckpt_<n>.ckpt`` included (adopted as
  ``checkpoints/last.ckpt``, so no orphan is left), and its record counts every segment's wall
  time and the requeues.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from score_exp.errors import ScoreExpError
from score_exp.runs import fingerprint as ident
from score_exp.runs.checkpoints import load_checkpoint, resume_checkpoint, set_aside
from score_exp.runs.record import RecordError, RunDirError, RunFolder, RunRecord

log = logging.getLogger("score_exp.runs")

# ----------------------------------------------------------------------------- whose job

#: Where the score-train process that started this job runs: ``host|pid namespace|Slurm job``.
PARENT_WHERE_ENV = "SCORE_EXP_PARENT_WHERE"


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def where() -> str:
    """This process's place: host, PID namespace and Slurm job (empty outside one)."""
    return "|".join((socket.gethostname(), _pid_namespace(), os.environ.get("SLURM_JOB_ID", "")))


def submitter_here() -> bool:
    """True when the process named in ``$SCORE_EXP_PARENT_PID`` can be watched from here.

    False for a job that a scheduler started: another host, another PID namespace, or another
    Slurm job than the submitter's (a sweep job submitted from a login node or from inside an
    allocation). Such a job belongs to Slurm and must outlive the shell that submitted it.
    Without a record of the parent's place (an older parent), a Slurm job is not watched.
    """
    parent = os.environ.get(PARENT_WHERE_ENV)
    if parent is None:
        return "SLURM_JOB_ID" not in os.environ
    return parent == where()


# ----------------------------------------------------------------------------- job names


def job_name(
    experiment: Any, overrides: Any = None, exclude: Any = None, max_len: int = 120
) -> str:
    """A Slurm job name from the experiment name and the sweep's overrides.

    ``esol_mlp:depth=score,stacked,seed=0,1``: two sweeps are told apart in ``squeue``/``sacct``.
    Overrides of ``exclude`` keys (those left out of run folder names) are left out; characters
    that Slurm or a shell mangle (spaces, quotes) become ``_``.
    """
    skip = {str(k) for k in (exclude or [])}
    parts = [
        str(o).replace(" ", "")
        for o in (overrides or [])
        if str(o).split("=", 1)[0].lstrip("+~") not in skip and not str(o).startswith("hydra")
    ]
    text = f"{experiment}:{','.join(parts)}" if parts else str(experiment)
    return re.sub(r"[^\w.,:=+\-/@]", "_", text)[:max_len]


if not OmegaConf.has_resolver("score_job_name"):
    OmegaConf.register_new_resolver("score_job_name", job_name)


def rank_log_suffix() -> str:
    """``_rank<N>`` for a rank that ``srun`` started beside rank 0 (its own log file), else ``""``.

    Ranks that Lightning starts locally already log to ``<job>_ddp_process_<N>.log``.
    """
    rank, world = external_rank_world()
    return f"_rank{rank}" if world > 1 and rank > 0 else ""


if not OmegaConf.has_resolver("score_rank_log"):
    OmegaConf.register_new_resolver("score_rank_log", rank_log_suffix)


# ----------------------------------------------------------------------------- skip before launch


def finished_run(
    run_dir: Path, resolved: dict, *, overwrite: bool = False, skip_finished: bool = True
) -> RunRecord | None:
    """The finished record a re-run into ``run_dir`` would skip on, or None. Reads only.

    The same decision as :func:`score_exp.runs.claim.claim_run_dir` takes for a finished run
    (same fingerprint, ``results.json`` with status ``ok``), taken before a job is launched so
    that a finished job costs no allocation and its folder stays byte-identical.
    """
    folder = RunFolder(run_dir)
    if overwrite or not skip_finished or not folder.results.is_file():
        return None
    try:
        old = ident.stored_identity(folder.path)
    except RunDirError:
        return None  # the job itself reports it
    if old is None:
        return None
    try:
        identity = ident.comparable_identity(ident.full_identity(resolved, folder.path), old)
    except (OSError, ScoreExpError):
        return None  # an input file that cannot be read: the job itself reports it
    if ident.fingerprint(old) != ident.fingerprint(identity):
        return None
    return folder.finished_record()


# ----------------------------------------------------------------------------- ranks decide together


def is_rank_zero() -> bool:
    """True in the process that writes files: global rank 0 (or the only process).

    Lightning sets the rank when a Trainer is created; before that it is read from the
    launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID).
    """
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


#: rank 0's decision, handed to the ranks it starts itself (Lightning's local DDP launcher).
DECISION_ENV = "SCORE_EXP_RUN_DECISION"
#: Seconds a rank waits for rank 0's decision (or rank 0 for the others to read it).
DECISION_TIMEOUT_ENV = "SCORE_EXP_DECISION_TIMEOUT"
#: Port of the decision store (default: 25000 + the last 4 digits of the Slurm job id).
DECISION_PORT_ENV = "SCORE_EXP_DECISION_PORT"


def external_rank_world() -> tuple[int, int]:
    """``(rank, world)`` of ranks that a launcher started side by side (``srun``, ``torchrun``).

    ``(rank, 1)`` when this process is the only one started (alone, or rank 0 of Lightning's
    local DDP, which starts the other ranks itself).
    """
    env = os.environ
    # Tasks of an srun step (a process of the batch script itself is alone: no SLURM_STEP_ID);
    # job names bash/interactive opt out of Lightning's SLURM detection, so they do here.
    if "SLURM_STEP_ID" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1
        return int(env.get("SLURM_PROCID", 0)), int(tasks)
    if "TORCHELASTIC_RUN_ID" in env:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    return 0, 1


def _store(rank: int, world: int, timeout: float):
    from datetime import timedelta

    from torch.distributed import TCPStore

    env = os.environ
    if "SLURM_STEP_ID" in env:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        host = SLURMEnvironment.resolve_root_node_address(
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST", "127.0.0.1")
        )
        default = 25000 + int(env.get("SLURM_JOB_ID", "0")[-4:] or 0)
    else:
        host = env.get("MASTER_ADDR", "127.0.0.1")
        default = int(env.get("MASTER_PORT", 29500)) + 1
    port = int(env.get(DECISION_PORT_ENV, default))
    try:
        return TCPStore(
            host, port, world, rank == 0, timedelta(seconds=timeout), wait_for_workers=False
        )
    except Exception as e:
        raise RunDirError(
            f"rank {rank} cannot reach rank 0's decision store at {host}:{port} within "
            f"{timeout:.0f}s ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"set {DECISION_PORT_ENV} to a free port"
        ) from None


def _exchange(decision: dict | None, rank: int, world: int) -> dict:
    """Rank 0 publishes ``decision``; every other rank returns it (bounded waits)."""
    timeout = float(os.environ.get(DECISION_TIMEOUT_ENV, 300))
    store = _store(rank, world, timeout)
    key = "score_exp/decision"
    try:
        if rank == 0:
            store.set(key, json.dumps(decision))
            # The store dies with this process's object: wait until every rank has read it.
            store.wait([f"score_exp/read/{r}" for r in range(1, world)])
            return decision  # type: ignore[return-value]
        got = json.loads(store.get(key))
        store.set(f"score_exp/read/{rank}", "1")
        return got
    except RunDirError:
        raise
    except Exception as e:
        who = "the other ranks did not read rank 0's" if rank == 0 else "rank 0 published no"
        raise RunDirError(
            f"rank {rank}: {who} run-folder decision within {timeout:.0f}s "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    finally:
        del store


def decide_together(run_dir: Path, decide: Callable[[], dict]) -> dict:
    """Rank 0 runs ``decide()`` (claim the folder); every rank returns its one decision.

    ``decide`` returns ``{"action": "skip", "record": ...}`` or ``{"action": "run", "resume":
    path or None}``; a :class:`~score_exp.runs.record.RunDirError` it raises (another config, folder
    in use) is raised on every rank with the same message. Ranks beside rank 0 (``srun``) get the
    decision over a TCP store before any process group exists; ranks that rank 0 starts later
    (local DDP) find it in ``$SCORE_EXP_RUN_DECISION``.

    Raises:
        RunDirError: rank 0 refused the folder, or the decision did not arrive in time.
    """
    from lightning.pytorch.utilities import rank_zero_only

    rank = getattr(rank_zero_only, "rank", 0)
    _, world = external_rank_world()
    here = str(Path(run_dir).resolve())
    if rank == 0:
        error: BaseException | None = None
        try:
            decision = decide()
        except RunDirError as e:
            decision, error = {"action": "refuse", "error": str(e)}, e
        except BaseException as e:
            decision, error = {"action": "refuse", "error": f"rank 0 failed: {e}"}, e
        if world > 1:
            _exchange(decision, 0, world)
        if error is not None:
            raise error
        os.environ[DECISION_ENV] = json.dumps({**decision, "run_dir": here})
        return decision
    if world > 1:
        decision = _exchange(None, rank, world)
    else:  # started by rank 0 (Lightning's launcher copies its environment)
        try:
            decision = json.loads(os.environ[DECISION_ENV])
        except (KeyError, ValueError):
            decision = {"action": "run", "resume": None, "run_dir": here}
        if decision.get("run_dir", here) != here:
            raise RunDirError(f"rank {rank}: rank 0 decided on another run folder")
    if decision["action"] == "refuse":
        raise RunDirError(decision["error"])
    return decision


# ----------------------------------------------------------------------------- requeues

HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")


def _step(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path).get("global_step", -1))
    except Exception:
        return None


def adopt_requeue_checkpoints(run_dir: Path) -> None:
    """Fold Lightning's requeue checkpoints (``hpc_ckpt_<n>.ckpt``) into ``checkpoints/last.ckpt``.

    Lightning's SLURM auto-requeue handler saves ``<run>/hpc_ckpt_<n>.ckpt`` before requeueing.
    The newest readable one that is ahead of ``last.ckpt`` (by global step) becomes
    ``last.ckpt``; the others are removed (older states), an unreadable one is moved aside
    (:func:`score_exp.runs.checkpoints.set_aside`, as ``resume_checkpoint`` does). No orphan checkpoint is left.
    """
    run_dir = Path(run_dir)
    found = sorted(
        (p for p in run_dir.glob("hpc_ckpt_*.ckpt") if HPC_CHECKPOINT.search(p.name)),
        key=lambda p: int(HPC_CHECKPOINT.search(p.name).group(1)),
    )
    if not found:
        return
    last = RunFolder(run_dir).last_checkpoint
    best_step = _step(last) if last.is_file() else None
    best = None
    for path in reversed(found):
        step = _step(path)
        if step is None:
            set_aside(path, f"{path} is unreadable")
            continue
        if best is None and (best_step is None or step > best_step):
            best = path
        elif path.exists():
            path.unlink()  # an older state than the one resumed from
    if best is not None:
        last.parent.mkdir(parents=True, exist_ok=True)
        os.replace(best, last)
        log.warning("resuming from the requeue checkpoint %s (now %s)", best.name, last)


def resume_point(run_dir: Path) -> Path | None:
    """The checkpoint a (re-)started run resumes from: requeue checkpoints adopted, then
    :func:`score_exp.runs.checkpoints.resume_checkpoint` (``last.ckpt`` or the newest readable one)."""
    adopt_requeue_checkpoints(run_dir)
    return resume_checkpoint(run_dir)


def slurm_job() -> dict | None:
    """This segment's Slurm job: ``{"job_id", "restart_count"}`` (None outside Slurm)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    job = env["SLURM_JOB_ID"]
    if "SLURM_ARRAY_JOB_ID" in env:
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return {"job_id": job, "restart_count": int(env.get("SLURM_RESTART_COUNT", 0) or 0)}


def segments(run_dir: Path, resuming: bool) -> dict:
    """What earlier segments of this run recorded: wall times and requeues (rank 0).

    A run resumed from a checkpoint continues the record of the segment before it (its
    ``results.json``, status ``interrupted`` or ``failed``); a fresh start begins a new one. A
    segment counts as a requeue when Slurm restarted the same job (its restart count went up).
    """
    previous = RunRecord()
    if resuming:
        with contextlib.suppress(RecordError):  # unreadable: a fresh record
            previous = RunFolder(run_dir).read_record() or previous
    walls = [float(w) for w in previous.segments_wall_time_s or [] if isinstance(w, int | float)]
    requeues = int(previous.requeues or 0)
    job, before = slurm_job(), previous.slurm or {}
    if (
        job is not None
        and isinstance(before, dict)
        and before.get("job_id") == job["job_id"]
        and job["restart_count"] > int(before.get("restart_count", 0) or 0)
    ):
        requeues += 1
    return {"walls": walls, "requeues": requeues, "slurm": job}


def wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run logged into ``run_dir`` (``wandb/[offline-]run-<time>-<id>``)."""
    runs = [p for p in (Path(run_dir) / "wandb").glob("*run-*-*") if p.is_dir()]
    if not runs:
        return None
    newest = max(runs, key=lambda p: p.name.split("run-", 1)[1])
    return newest.name.rsplit("-", 1)[1] or None


def note(message: str) -> None:
    """One line on stderr, not in the run's log file (which a skip must leave untouched)."""
    print(message, file=sys.stderr)
