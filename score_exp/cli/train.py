"""``score-train``: train one configuration (or a Hydra multirun sweep of them).

Flow: validate the config -> seed -> data module -> model (built on the core) ->
LightningModule -> Trainer.fit -> validate/test at the best checkpoint -> ``results.json``
(written once, atomically). Bad input is reported as one message before any work starts.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from score_exp import numerics
from score_exp.cli.common import check_argv, check_run_config, remove_refused_run_dir
from score_exp.cli.fit import fit_and_test
from score_exp.config import CONFIG_DIR, check_overrides, depth_spec
from score_exp.core import DepthSpec
from score_exp.errors import (
    CheckpointWriteError,
    ScoreExpError,
    WriteError,
    user_error,
)
from score_exp.run import check_constructors
from score_exp.runs import cluster, launch, stop, sweeps
from score_exp.runs.claim import claim_for_ranks
from score_exp.runs.launch import objective
from score_exp.runs.record import (
    HYDRA_FILES,
    RunDirError,
    RunFolder,
    RunRecord,
)

log = logging.getLogger("score_exp.cli.train")


def train(cfg: DictConfig, run_dir: Path) -> RunRecord:
    """Run one configuration into ``run_dir`` and return its results record."""
    check_run_config(cfg)  # before anything else: bad top-level keys never start work
    spec = depth_spec(cfg)  # likewise a bad depth
    # Before anything computes: the kernels of the run's numerics mode (configs/numerics/); a
    # process that cannot give them is refused before its folder is touched.
    kernels = numerics.apply(cfg.get("numerics"))
    # The folder is bound to this config (fingerprint) and locked before any work; a folder of
    # another config is refused untouched. Rank 0 decides (skip, refuse, resume, lock) once for
    # every data-parallel rank (score_exp.runs.claim.claim_for_ranks).
    decision, lock = claim_for_ranks(
        run_dir,
        OmegaConf.to_container(cfg, resolve=True),
        overwrite=bool(cfg.get("overwrite", False)),
        skip_finished=bool(cfg.get("skip_finished", True)),
        hydra_files=_hydra_files(cfg),
    )
    if decision["action"] == "skip":
        # Not logged: the log file is in the finished folder, which a skip leaves byte-identical.
        if cluster.is_rank_zero():
            print(f"score-train: skipping {run_dir}: already finished (status ok)", file=sys.stderr)
        return RunRecord.from_dict(decision["record"])
    resume = Path(decision["resume"]) if decision.get("resume") else None
    try:
        return _train(cfg, run_dir, spec, resume, kernels)
    finally:
        if lock is not None:
            lock.release()


def _train(
    cfg: DictConfig, run_dir: Path, spec: DepthSpec, resume: Path | None, kernels: dict
) -> RunRecord:
    from score_exp.tasks.results import depth_fields, git_commit, package_versions

    t0 = time.perf_counter()
    # Earlier segments of a resumed run (a requeue, a re-run after an interruption): their wall
    # times and requeues continue in this record.
    before = (
        cluster.segments(run_dir, resuming=resume is not None) if cluster.is_rank_zero() else {}
    )
    record = RunRecord(
        task=cfg.task.name,
        status="running",
        seed=cfg.seed,
        depth=depth_fields(spec),
        depth_preset=cfg.get("depth_preset"),
        experiment=cfg.get("experiment_name"),
        run_dir=str(run_dir),
        versions=package_versions(),
        git=git_commit(),
        overrides=_overrides(),
        slurm=before.get("slurm") or None,
        numerics=kernels,
    )

    def clock() -> None:  # total wall time over all segments, and the requeues
        walls = [*before.get("walls", []), time.perf_counter() - t0]
        record.update(
            wall_time_s=sum(walls), segments_wall_time_s=walls, requeues=before.get("requeues", 0)
        )

    try:
        return fit_and_test(cfg, RunFolder(run_dir), spec, record, resume, clock)
    except BaseException as e:
        bad_input = user_error(e)
        if bad_input is not None and not isinstance(bad_input, (CheckpointWriteError, WriteError)):
            # Reported by main as one line (a constructor's error unwrapped from Hydra's
            # instantiate); nothing that looks like a result is written.
            raise bad_input from None
        # Keep what was written and record how the run ended; re-raise. An interrupted run
        # (SIGTERM, Ctrl-C) resumes from checkpoints/last.ckpt when run again into this folder.
        stop.disarm()  # the grace has done its work: the record below is written whole
        stopped = isinstance(e, (KeyboardInterrupt, SystemExit)) or stop.received() is not None
        # A collective that failed because a peer rank died (its node went, it crashed, it was
        # stopped first) is that rank's news: said as such, never as this rank's own error.
        error = stop.peer_lost_message(e) if stop.peer_lost(e) else f"{type(e).__name__}: {e}"
        if stopped and stop.peer_lost(e):  # the ranks were stopped: the stop is the news
            error = f"stopped by {stop.name(stop.received() or signal.SIGTERM)}; then {error}"
        record.update(status="interrupted" if stopped else "failed", error=error)
        if cluster.is_rank_zero():
            clock()
            try:
                record.save(run_dir)
            except OSError as w:  # e.g. the disk is full: the original error is the news
                log.error("cannot write %s: %s", RunFolder(run_dir).results, w)
        signum = stop.received() or (
            signal.SIGTERM if type(e).__name__ == "SIGTERMException" else None
        )
        if signum is not None:
            # Lightning's SIGTERM exit carries code 0 and its Ctrl-C exit code 1; a killed job
            # must not look successful to SLURM or a shell loop, so exit as a process killed by
            # the signal would (143 for SIGTERM, 130 for SIGINT), saying how to resume.
            log.warning("interrupted by %s; re-run the same command to resume", stop.name(signum))
            raise SystemExit(128 + signum) from e
        raise


def _hydra_files(cfg: DictConfig) -> dict[str, str]:
    """Hydra's record of the job (``.hydra/``), written by score-train once the folder is claimed."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return {}
    texts = (
        OmegaConf.to_yaml(cfg),
        OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})),
        OmegaConf.to_yaml(hc.overrides.task),
    )
    return {RunFolder.hydra_file(name): text for name, text in zip(HYDRA_FILES, texts, strict=True)}


def _overrides() -> list[str]:
    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def _multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    """Hydra entry point of ``score-train``; returns the run's objective (for sweepers).

    The objective is the best validation metric (``objective: best_val``), never a test metric,
    so a tuning sweeper (Optuna) never sees test data.
    """
    sweeps.adopt_jobs()  # a sweep worker stops when the sweep process dies
    # SIGTERM / SIGINT: recorded as interrupted within stop.TRAIN_GRACE_S, wherever it is.
    stop.install(grace=stop.TRAIN_GRACE_S)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        objective(cfg, {})  # an unknown objective is an error before any work
        record = train(cfg, run_dir)
    except stop.Stopped:  # before the run started (its claim): nothing to record
        stop.exit_stopped("score-train", "nothing was trained")
    except ScoreExpError as e:
        if isinstance(e, RunDirError):
            # Not logged: the log file lives in the folder that must stay untouched.
            print(f"score-train: error: {e}", file=sys.stderr)
        else:
            log.error("%s", e)
        if _multirun():
            raise  # Hydra records this job as failed and the sweep goes on
        if not isinstance(e, RunDirError):
            print(f"score-train: error: {e}", file=sys.stderr)
            remove_refused_run_dir(run_dir)  # a refused run leaves no folder behind
        sys.exit(e.exit_code)
    if not cluster.is_rank_zero():
        return None  # the other data-parallel processes: rank 0 reports the run
    headline = cfg.task.get("headline", "rmse")
    value = (record.test or {}).get(headline)
    print(
        f"\nscore-train: {record.status} | {cfg.task.name} | test/{headline} = "
        f"{value if value is None else f'{value:.4f}'} | params {record.params or 0:,} | "
        f"nfe {record.nfe}\n  results: {RunFolder(run_dir).results}"
    )
    if record.status == "diverged" and cfg.get("fail_on_diverge", False):
        sys.exit(3)
    return objective(cfg, record)


def check_command_line(argv: list[str]) -> None:
    """Bad input refused in one line before Hydra makes a folder (or a sweep a failure record):
    config groups, keys and, for one run, the values no constructor owns (seed, budget, depth,
    objective)."""
    cfg = check_overrides(argv, CONFIG_DIR)
    if cfg is None or {"-m", "--multirun"} & set(argv):
        return  # a sweep's values may differ job by job: each job checks its own
    check_run_config(cfg)
    depth_spec(cfg)
    objective(cfg, {})
    check_constructors(cfg)


def main() -> None:
    """Console entry point of ``score-train``: a mistake in the command (a config group's
    option, a key, a value) is one error line before any folder exists; every failed job of a
    sweep is listed at the end."""
    numerics.enter()  # numerics=portable: its kernels before torch computes (may re-execute)
    sweeps.adopt_jobs()
    check_argv("score-train", sys.argv[1:])
    try:
        check_command_line(sys.argv[1:])
    except ScoreExpError as e:
        print(f"score-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    launch.install()  # a sweep launches only the jobs whose folders are not finished
    try:
        _main()
    finally:
        launch.report("score-train")
        sweeps.report_sweep_failures("score-train")


if __name__ == "__main__":
    main()
