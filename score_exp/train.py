"""``score-train``: train one configuration (or a Hydra multirun sweep of them).

Flow: validate the config -> seed -> data module -> model (built on the core) ->
LightningModule -> Trainer.fit -> validate/test at the best checkpoint -> ``results.json``
(written once, atomically). Bad input is reported as one message before any work starts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from score_exp import cluster, rundir, sweep
from score_exp.cli import check_run_config
from score_exp.core import DepthSpec
from score_exp.errors import CheckpointWriteError, ConfigError, ScoreExpError, user_error
from score_exp.io import atomic_write_json, atomic_write_text, flatten
from score_exp.run import (
    CONFIG_DIR,
    RESULTS,
    RUN_CONFIG,
    build,
    check_depth_overrides,
    depth_spec,
    trainable_params,
)
from score_exp.runs.files import read_json
from score_exp.tasks.distributed import per_device_batch

log = logging.getLogger("score_exp.train")


# Fields beyond the paper's depth: recorded in results.json only where they are switched on.
BEYOND_FIELDS = (
    "connect",
    "learn_dt",
    "adaptive_eps",
    "growth",
    "inject",
    "init_state",
    "train_steps",
    "train_dt",
    "backprop_steps",
    "solver",
    "solver_grad",
    "halt",
)


def _depth_record(spec: DepthSpec) -> dict[str, Any]:
    """The depth fields of ``results.json``."""
    defaults = {f.name: f.default for f in dataclasses.fields(DepthSpec)}
    record = {k: getattr(spec, k) for k in ("share", "update", "steps", "dt", "integrator")}
    record.update({k: getattr(spec, k) for k in BEYOND_FIELDS if getattr(spec, k) != defaults[k]})
    return record


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run one configuration into ``run_dir`` and return its results record."""
    check_run_config(cfg)  # before anything else: bad top-level keys never start work
    spec = depth_spec(cfg)  # likewise a bad depth
    # The folder is bound to this config (fingerprint) and locked before any work; a folder of
    # another config is refused untouched (score_exp.rundir). Rank 0 decides (skip, refuse,
    # resume, lock) once for every data-parallel rank (score_exp.cluster.decide_together).
    lock = None

    def decide() -> dict:
        nonlocal lock
        finished, lock = rundir.claim_run_dir(
            run_dir,
            OmegaConf.to_container(cfg, resolve=True),
            overwrite=bool(cfg.get("overwrite", False)),
            skip_finished=bool(cfg.get("skip_finished", True)),
            hydra_files=_hydra_files(cfg),
        )
        if finished is not None:
            return {"action": "skip", "record": finished}
        try:
            resume = cluster.resume_point(run_dir)  # an unreadable last.ckpt is moved aside
        except BaseException:
            lock.release()
            raise
        return {"action": "run", "resume": str(resume) if resume else None}

    decision = cluster.decide_together(run_dir, decide)
    if decision["action"] == "skip":
        # Not logged: the log file is in the finished folder, which a skip leaves byte-identical.
        if is_rank_zero():
            print(f"score-train: skipping {run_dir}: already finished (status ok)", file=sys.stderr)
        return decision["record"]
    resume = Path(decision["resume"]) if decision.get("resume") else None
    try:
        return _train(cfg, run_dir, spec, resume)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DictConfig, run_dir: Path, spec: DepthSpec, resume: Path | None) -> dict:
    from score_exp.tasks.results import git_commit, package_versions

    t0 = time.perf_counter()
    results_path = run_dir / RESULTS
    # Earlier segments of a resumed run (a requeue, a re-run after an interruption): their wall
    # times and requeues continue in this record.
    before = cluster.segments(run_dir, resuming=resume is not None) if is_rank_zero() else {}
    record: dict[str, Any] = {
        "task": cfg.task.name,
        "status": "running",
        "seed": cfg.seed,
        "depth": _depth_record(spec),
        "depth_preset": cfg.get("depth_preset"),
        "experiment": cfg.get("experiment_name"),
        "run_dir": str(run_dir),
        "versions": package_versions(),
        "git": git_commit(),
        "overrides": _overrides(),
    }
    if before.get("slurm"):
        record["slurm"] = before["slurm"]

    def clock() -> None:  # total wall time over all segments, and the requeues
        walls = [*before.get("walls", []), time.perf_counter() - t0]
        record.update(
            wall_time_s=sum(walls), segments_wall_time_s=walls, requeues=before.get("requeues", 0)
        )

    try:
        return _fit_and_test(cfg, run_dir, spec, record, resume, clock)
    except BaseException as e:
        bad_input = user_error(e)
        if bad_input is not None and not isinstance(bad_input, CheckpointWriteError):
            # Reported by main as one line (a constructor's error unwrapped from Hydra's
            # instantiate); nothing that looks like a result is written.
            raise bad_input from None
        # Keep what was written and record how the run ended; re-raise. An interrupted run
        # (SIGTERM, Ctrl-C) resumes from checkpoints/last.ckpt when run again into this folder.
        stopped = isinstance(e, (KeyboardInterrupt, SystemExit))
        record.update(
            status="interrupted" if stopped else "failed", error=f"{type(e).__name__}: {e}"
        )
        if is_rank_zero():
            clock()
            try:
                atomic_write_json(results_path, record)
            except OSError as w:  # e.g. the disk is full: the original error is the news
                log.error("cannot write %s: %s", results_path, w)
        if type(e).__name__ == "SIGTERMException":
            # Lightning's SIGTERM exit carries code 0; a killed job must not look successful
            # to SLURM or a shell loop, so exit as a process killed by SIGTERM would (143).
            log.warning("interrupted by SIGTERM; re-run the same command to resume")
            raise SystemExit(128 + signal.SIGTERM) from e
        raise


def _hydra_files(cfg: DictConfig) -> dict[str, str]:
    """Hydra's record of the job (``.hydra/``), written by score-train once the folder is claimed."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return {}
    return {
        ".hydra/config.yaml": OmegaConf.to_yaml(cfg),
        ".hydra/hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})),
        ".hydra/overrides.yaml": OmegaConf.to_yaml(hc.overrides.task),
    }


def _fit_and_test(
    cfg: DictConfig, run_dir: Path, spec: DepthSpec, record: dict, resume: Path | None, clock
) -> dict:
    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    from score_exp.tasks.callbacks import (
        AtomicCheckpointIO,
        DivergenceDetector,
        FixedPointSolves,
        RunTimer,
        find_depth,
    )

    # Lightning adds its own stderr handler on import; Hydra's handlers (stderr + run log) suffice.
    logging.getLogger("lightning").handlers.clear()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    # Every callback comes from configs/callbacks/, in its order; each is a no-op for a run
    # without its feature. Two carry what results.json records (the status, the timings), so a
    # run always has them: nulled (callbacks.divergence=null), each is replaced in its place by
    # its default (the divergence detector's: non-finite training losses only); removed, it
    # is added at the end.
    required = {"divergence": DivergenceDetector, "timer": RunTimer}
    callbacks = [
        instantiate(c) if c is not None else required[name]()
        for name, c in (cfg.get("callbacks") or {}).items()
        if c is not None or name in required
    ]

    def found(cls):
        return next((c for c in callbacks if isinstance(c, cls)), None)

    callbacks += [cls() for cls in required.values() if found(cls) is None]
    divergence, timer = found(DivergenceDetector), found(RunTimer)
    # depth/solver_* in training, results.json's "solver"
    solves = found(FixedPointSolves) if spec.solver == "fixed_point" else None
    # A resumed run (a requeue) continues its W&B run (same id), not a new one.
    wandb_id = cluster.wandb_run_id(run_dir) if resume else None
    loggers = [
        instantiate(lg, **({"resume_id": wandb_id} if _is_wandb(lg) and wandb_id else {}))
        for lg in (cfg.get("logger") or {}).values()
        if lg is not None
    ]
    # The Trainer first: it knows this process's rank and the world size (devices x nodes)
    # before any process is launched, so files are written by rank 0 only and a global batch
    # that does not divide over the processes is reported before any work starts.
    trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],  # atomic checkpoint writes, weights_only reads
    )
    per_device_batch(cfg.task.data.batch_size, trainer.world_size)
    rank_zero = trainer.is_global_zero
    if rank_zero:
        atomic_write_text(run_dir / RUN_CONFIG, OmegaConf.to_yaml(resolved))
    datamodule, model, module, _ = build(cfg, "fit", spec)
    if rank_zero:
        atomic_write_json(run_dir / "splits.json", datamodule.split_record())
    record["params"] = trainable_params(model)
    record["nfe"] = model.depth.nfe if hasattr(model, "depth") else spec.nfe
    if reference := getattr(model, "reference", None):
        # A field-standard peer (task/model=attentivefp): no depth, so no NFE; the report shows
        # it as a reference row beside the depth variants, never as one of them.
        record.update(reference=reference, nfe=None)
    what = (
        f"reference {reference} (no depth)" if reference else f"nfe {record['nfe']}, depth {spec}"
    )
    log.info("model: %s params, %s", f"{record['params']:,}", what)

    for lg in loggers:
        lg.log_hyperparams(flatten(resolved))  # rank 0 only (Lightning's loggers check)

    if resume:
        log.info("resuming from %s", resume)
    trainer.fit(
        module, datamodule=datamodule, ckpt_path=str(resume) if resume else None, weights_only=True
    )

    record["params"] = trainable_params(model)  # growth changes it
    ckpt = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best_path = ckpt.best_model_path if ckpt is not None else ""
    record.update(timer.summary())
    clock()
    if divergence.diverged:
        record["status"] = "diverged"
        record["diverged_at"] = divergence.diverged_at
        log.warning("run diverged at %s", divergence.diverged_at)
    else:
        record["status"] = "ok"
    if best_path and ckpt.best_model_score is not None:
        meta = rundir.load_checkpoint(Path(best_path))
        record["best_val"] = {
            "metric": ckpt.monitor,
            "value": float(ckpt.best_model_score),
            "epoch": int(meta["epoch"]),
            "step": int(meta["global_step"]),
        }
        record["best_checkpoint"] = str(Path(best_path).relative_to(run_dir))
        if record["status"] == "ok":
            record["val"] = _strip(
                trainer.validate(
                    module,
                    datamodule=datamodule,
                    ckpt_path=best_path,
                    verbose=False,
                    weights_only=True,
                ),
                "val/",
            )
            record["test"] = _strip(
                trainer.test(
                    module,
                    datamodule=datamodule,
                    ckpt_path=best_path,
                    verbose=False,
                    weights_only=True,
                ),
                "test/",
            )
    elif record["status"] == "ok":
        _keep_a_finished_result(run_dir)
        record["status"] = "failed"
        record["error"] = "no best checkpoint: the monitored metric was never logged"
    _record_learned_depth(record, find_depth(model))
    if solves is not None:
        record["solver"] = solves.summary(spec)
    _finite_or_diverged(record)
    # trainer.test has returned on every rank, with metrics synchronised over all of them, so
    # rank 0's record is the run's record.
    if rank_zero:
        for lg in loggers:
            _log_summary(lg, record)
        atomic_write_json(run_dir / RESULTS, record)
    return record


def _keep_a_finished_result(run_dir: Path) -> None:
    """A re-run never downgrades an ``ok`` results.json: one line instead of ``failed``.

    Raises:
        RunDirError: the folder's results.json says ``ok`` (a re-run with skip_finished=false
            that found no best checkpoint, e.g. one deleted by hand).
    """
    try:
        previous = read_json(run_dir / RESULTS)
    except (OSError, ValueError, ScoreExpError):
        return
    if isinstance(previous, dict) and previous.get("status") == "ok":
        raise rundir.RunDirError(
            f"{run_dir}: the re-run found no best checkpoint; its results.json (status ok) "
            "is kept. Use overwrite=true to train it afresh"
        )


def _is_wandb(logger_cfg) -> bool:
    return str(logger_cfg.get("_target_", "")).endswith("wandb_logger")


def is_rank_zero() -> bool:
    """True in the process that writes files: global rank 0 (or the only process).

    Lightning sets the rank when a Trainer is created; before that it is read from the
    launcher's environment (RANK, LOCAL_RANK, SLURM_PROCID).
    """
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _record_learned_depth(record: dict, depth) -> None:
    """The depth as it ended: its step count and nfe (growth), learned dt and connections."""
    if depth is None:
        return
    record["nfe"] = depth.nfe
    spec = depth.spec
    if spec.growth is not None:
        record["final_steps"] = depth.steps
    if spec.learn_dt != "none":
        record["learned_dt"] = [round(float(dt), 6) for dt in depth.dts()]
    if spec.connect == "ancre":
        record["connection_weights"] = [
            [round(v, 6) for v in row] for row in depth.connection_weights().tolist()
        ]


def _strip(metrics: list[dict], prefix: str) -> dict:
    merged = {k: v for d in metrics for k, v in d.items()}
    return {k[len(prefix) :]: float(v) for k, v in merged.items() if k.startswith(prefix)}


def _finite_or_diverged(record: dict) -> None:
    """A NaN metric at the end is a diverged run too, whatever the loss said."""
    vals = [record.get("best_val", {}).get("value")] + list(record.get("test", {}).values())
    if record["status"] == "ok" and any(v is not None and not math.isfinite(v) for v in vals):
        record["status"] = "diverged"


def _log_summary(logger, record: dict) -> None:
    """Put the headline numbers into a W&B run's summary (other loggers: nothing to do)."""
    experiment = getattr(logger, "experiment", None)
    summary = getattr(experiment, "summary", None)
    if summary is None:
        return
    summary.update(
        {
            "params": record.get("params"),
            "nfe": record.get("nfe"),
            "status": record["status"],
            "time_per_step": record.get("time_per_step_s"),
            "time_per_epoch": record.get("time_per_epoch_s"),
            **{f"test/{k}": v for k, v in record.get("test", {}).items()},
            **{f"best_val/{k}": v for k, v in record.get("best_val", {}).items()},
        }
    )


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
    rundir.adopt_jobs()  # a sweep worker stops when the sweep process dies
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        objective(cfg, {})  # an unknown objective is an error before any work
        record = train(cfg, run_dir)
    except ScoreExpError as e:
        if isinstance(e, rundir.RunDirError):
            # Not logged: the log file lives in the folder that must stay untouched.
            print(f"score-train: error: {e}", file=sys.stderr)
        else:
            log.error("%s", e)
        if _multirun():
            raise  # Hydra records this job as failed and the sweep goes on
        if not isinstance(e, rundir.RunDirError):
            print(f"score-train: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    if not is_rank_zero():
        return None  # the other data-parallel processes: rank 0 reports the run
    headline = cfg.task.get("headline", "rmse")
    value = record.get("test", {}).get(headline)
    print(
        f"\nscore-train: {record['status']} | {cfg.task.name} | test/{headline} = "
        f"{value if value is None else f'{value:.4f}'} | params {record.get('params', 0):,} | "
        f"nfe {record.get('nfe')}\n  results: {run_dir / RESULTS}"
    )
    if record["status"] == "diverged" and cfg.get("fail_on_diverge", False):
        sys.exit(3)
    return objective(cfg, record)


OBJECTIVES = ("best_val",)


def objective(cfg: DictConfig, record: dict) -> float:
    """What a sweeper optimises: the best val metric; the worst value for a run without one.

    A diverged or failed run returns ``inf`` (``-inf`` when the monitor is maximised), so a
    study records it as its worst trial and goes on.
    """
    name = cfg.get("objective", "best_val")
    if name not in OBJECTIVES:
        raise ConfigError(f"objective={name!r}: valid objectives: {', '.join(OBJECTIVES)}")
    worst = -math.inf if cfg.task.get("monitor_mode", "min") == "max" else math.inf
    value = record.get("best_val", {}).get("value")
    if record.get("status") != "ok" or value is None or not math.isfinite(value):
        return worst
    return float(value)


def main() -> None:
    """Console entry point of ``score-train``: a misspelt depth field is one error line; every
    failed job of a sweep is listed at the end."""
    rundir.adopt_jobs()
    try:
        check_depth_overrides(sys.argv[1:])
    except ScoreExpError as e:
        print(f"score-train: error: {e}", file=sys.stderr)
        sys.exit(2)
    sweep.install()  # a sweep launches only the jobs whose folders are not finished
    try:
        _main()
    finally:
        sweep.report("score-train")
        rundir.report_sweep_failures("score-train")


if __name__ == "__main__":
    main()
