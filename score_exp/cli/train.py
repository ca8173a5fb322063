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
from score_exp.config import CONFIG_DIR, check_overrides, depth_spec
from score_exp.core import DepthSpec
from score_exp.errors import (
    CheckpointWriteError,
    ConfigError,
    ScoreExpError,
    WriteError,
    user_error,
)
from score_exp.run import build, trainable_params
from score_exp.runs import cluster, launch, stop, sweeps
from score_exp.runs.checkpoints import load_checkpoint
from score_exp.runs.claim import claim_for_ranks, keep_finished
from score_exp.runs.fingerprint import flatten
from score_exp.runs.launch import objective
from score_exp.runs.record import (
    CONFIG,
    HYDRA_FILES,
    SPLITS,
    RunDirError,
    RunFolder,
    RunRecord,
)
from score_exp.tasks.distributed import per_device_batch

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
        return _fit_and_test(cfg, RunFolder(run_dir), spec, record, resume, clock)
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
        record.update(
            status="interrupted" if stopped else "failed", error=f"{type(e).__name__}: {e}"
        )
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


def _fit_and_test(
    cfg: DictConfig, folder: RunFolder, spec: DepthSpec, record: RunRecord, resume, clock
) -> RunRecord:
    """The run, in order: callbacks, loggers, trainer, model, fit, evaluation, record."""
    import lightning as L

    # Lightning adds its own stderr handler on import; Hydra's handlers (stderr + run log) suffice.
    logging.getLogger("lightning").handlers.clear()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    L.seed_everything(cfg.seed, workers=True)
    callbacks = _callbacks(cfg)
    loggers = _loggers(cfg, folder, resume)
    trainer = _trainer(cfg, callbacks, loggers)
    if trainer.is_global_zero:
        folder.write_text(CONFIG, OmegaConf.to_yaml(resolved))
    task = build(cfg, "fit", spec)
    if trainer.is_global_zero:
        folder.write_json(SPLITS, task.datamodule.split_record())
    _record_model(record, task.model, spec)
    for lg in loggers:
        lg.log_hyperparams(flatten(resolved))  # rank 0 only (Lightning's loggers check)
    if resume:
        log.info("resuming from %s", resume)
    ckpt_path = str(resume) if resume else None
    try:
        trainer.fit(task.module, datamodule=task.datamodule, ckpt_path=ckpt_path, weights_only=True)
    except RuntimeError as e:
        if not resume or "loading state_dict" not in str(e):
            raise
        # A checkpoint of another model (copied in, or of an older version): bad input, one
        # line; the run's previous record stays as it was (not turned "failed").
        raise ConfigError(
            f"cannot resume from {resume}: its weights do not fit this configuration's model "
            f"({str(e).strip().splitlines()[0]}); move it aside or pass overwrite=true"
        ) from None
    _record_training(record, trainer, task.model, callbacks, clock)
    _evaluate_best(record, trainer, task, folder)
    _record_depth(record, task.model, callbacks, spec)
    record.check_finite()
    # trainer.test has returned on every rank, with metrics synchronised over all of them, so
    # rank 0's record is the run's record.
    if trainer.is_global_zero:
        record.save(folder)
        _log_final(loggers, record, folder, flatten(resolved))
    return record


def _callbacks(cfg: DictConfig) -> list:
    """The run's Lightning callbacks: ``cfg.callbacks`` (configs/callbacks/), in their order."""
    from hydra.utils import instantiate

    from score_exp.tasks.callbacks import DivergenceDetector, RunTimer

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
    callbacks += [cls() for cls in required.values() if _find(callbacks, cls) is None]
    return callbacks


def _find(callbacks: list, cls: type):
    """The first callback of type ``cls``, or None."""
    return next((c for c in callbacks if isinstance(c, cls)), None)


def _loggers(cfg: DictConfig, folder: RunFolder, resume: Path | None) -> list:
    """``cfg.logger``'s loggers; a resumed run (a requeue) continues its W&B run (same id)."""
    from hydra.utils import instantiate

    from score_exp.cli.common import check_output_dir

    wandb_id = cluster.wandb_run_id(folder.path) if resume else None
    loggers = []
    for name, lg in (cfg.get("logger") or {}).items():
        if lg is None:
            continue
        # Its folder (TensorBoard's <save_dir>/<name>, MLflow's file store) can be written,
        # before the logger is built: a file in its way or a read-only folder is one line
        # naming the logger, not the logger's traceback.
        uri, save_dir = lg.get("tracking_uri"), lg.get("save_dir")
        if isinstance(uri, str) and uri.startswith("file:"):
            check_output_dir(uri.removeprefix("file:"), f"logger.{name}.tracking_uri")
        elif isinstance(save_dir, str) and save_dir:
            sub = lg.get("name") if isinstance(lg.get("name"), str) else ""
            check_output_dir(Path(save_dir) / sub, f"logger.{name}.save_dir")
        loggers.append(
            instantiate(lg, **({"resume_id": wandb_id} if _is_wandb(lg) and wandb_id else {}))
        )
    return loggers


def _trainer(cfg: DictConfig, callbacks: list, loggers: list):
    """The Trainer, first: it knows this process's rank and the world size before any process
    is launched (files are written by rank 0 only; a batch that does not divide is refused)."""
    from hydra.utils import instantiate

    from score_exp.tasks.callbacks import AtomicCheckpointIO

    # task.val_check_interval counts optimiser steps; Lightning's counts training batches, which
    # gradient accumulation makes several per step.
    every, accumulate = (
        cfg.trainer.get("val_check_interval"),
        cfg.trainer.get("accumulate_grad_batches"),
    )
    steps = {}
    if isinstance(every, int) and isinstance(accumulate, int) and accumulate > 1:
        steps["val_check_interval"] = every * accumulate
    trainer = instantiate(
        cfg.trainer,
        **steps,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],  # atomic checkpoint writes, weights_only reads
    )
    per_device_batch(cfg.task.data.batch_size, trainer.world_size)
    return trainer


def _record_model(record: RunRecord, model, spec: DepthSpec) -> None:
    """The model's size and depth, before training."""
    record.params = trainable_params(model)
    record.nfe = model.depth.nfe if hasattr(model, "depth") else spec.nfe
    if reference := getattr(model, "reference", None):
        # A field-standard peer (task/model=attentivefp): no depth, so no NFE; the report shows
        # it as a reference row beside the depth variants, never as one of them.
        record.update(reference=reference, nfe=None)
    what = f"reference {reference} (no depth)" if reference else f"nfe {record.nfe}, depth {spec}"
    log.info("model: %s params, %s", f"{record.params:,}", what)


def _record_training(record: RunRecord, trainer, model, callbacks: list, clock) -> None:
    """How training ended: size (growth changes it), times, ``ok`` or ``diverged``."""
    from score_exp.tasks.callbacks import DivergenceDetector, RunTimer

    record.params = trainable_params(model)
    record.update(**_find(callbacks, RunTimer).summary())
    clock()
    divergence = _find(callbacks, DivergenceDetector)
    if divergence.diverged:
        record.update(status="diverged", diverged_at=divergence.diverged_at)
        log.warning("run diverged at %s", divergence.diverged_at)
    else:
        record.status = "ok"


def _evaluate_best(record: RunRecord, trainer, task, folder: RunFolder) -> None:
    """The best checkpoint's val metric, then (an ``ok`` run) validation and test at it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = _find(trainer.checkpoint_callbacks, ModelCheckpoint)
    best_path = ckpt.best_model_path if ckpt is not None else ""
    if not best_path or ckpt.best_model_score is None:
        if record.ok:
            keep_finished(folder)  # a re-run never downgrades an ok results.json
            record.update(
                status="failed", error="no best checkpoint: the monitored metric was never logged"
            )
        return
    meta = load_checkpoint(Path(best_path))
    record.best_val = {
        "metric": ckpt.monitor,
        "value": float(ckpt.best_model_score),
        "epoch": int(meta["epoch"]),
        "step": int(meta["global_step"]),
    }
    record.best_checkpoint = str(Path(best_path).relative_to(folder.path))
    if record.ok:
        kw = dict(datamodule=task.datamodule, ckpt_path=best_path, verbose=False, weights_only=True)
        # The loggers are detached: this re-validation is no validation pass of training (a
        # val/ point one step past the last epoch); its numbers and the test's are logged once,
        # under best/val/ and test/, by _log_final.
        loggers, trainer.loggers = trainer.loggers, []
        try:
            record.val = _strip(trainer.validate(task.module, **kw), "val/")
            record.test = _strip(trainer.test(task.module, **kw), "test/")
        finally:
            trainer.loggers = loggers


def _is_wandb(logger_cfg) -> bool:
    return str(logger_cfg.get("_target_", "")).endswith("wandb_logger")


def _record_depth(record: RunRecord, model, callbacks: list, spec: DepthSpec) -> None:
    """The depth as it ended (:func:`~score_exp.tasks.results.depth_outcome`) and the
    fixed-point solves."""
    from score_exp.tasks.callbacks import FixedPointSolves, find_depth
    from score_exp.tasks.results import depth_outcome

    solves = _find(callbacks, FixedPointSolves)
    if spec.solver == "fixed_point" and solves is not None:  # registered always, active then
        record.solver = solves.summary(spec)
    record.update(**depth_outcome(find_depth(model)))
    if (spent := (record.solver or {}).get("test", {}).get("nfe")) is not None:
        record.nfe = spent  # a solved depth's cost is what its solves spent, not its steps


def _strip(metrics: list[dict], prefix: str) -> dict:
    merged = {k: v for d in metrics for k, v in d.items()}
    return {k[len(prefix) :]: float(v) for k, v in merged.items() if k.startswith(prefix)}


def _log_final(loggers: list, record: RunRecord, folder: RunFolder, hparams: dict) -> None:
    """The best checkpoint's and the test's numbers, tags and files, once, in every logger.

    A logger that fails here (an MLflow server gone) costs its copy, never the run: the
    results are already saved.
    """
    from score_exp.tasks.loggers import log_final, wandb_sync_hint

    metrics = {
        **{f"best/val/{k}": v for k, v in (record.val or {}).items()},
        **{f"test/{k}": v for k, v in (record.test or {}).items()},
    }
    best = record.best_val or {}
    if not record.val and best.get("value") is not None:  # a diverged run: its best so far
        metrics[f"best/{best['metric']}"] = best["value"]
    tags = {
        "status": record.status,
        "seed": record.seed,
        "run_dir": str(folder.path),
        **({"mlflow.source.git.commit": record.git} if record.git else {}),
    }
    for lg in loggers:
        try:
            log_final(
                lg,
                metrics,
                # On the best validation pass's point: Lightning logs a pass at the steps
                # trained so far minus one, and the checkpoint saved there counts them all.
                step=max(int(best.get("step") or 0) - 1, 0),
                hparams=hparams,
                tags=tags,
                artifacts=[folder.results, folder.config],
                summary=record.summary(),
            )
        except Exception as e:  # noqa: BLE001 (any logger, any backend)
            log.warning("%s: the final numbers were not logged (%s: %s); results.json has them",
                        type(lg).__name__, type(e).__name__, e)  # fmt: skip
        if hint := wandb_sync_hint(lg):
            log.info("W&B run logged offline: upload it with `%s`", hint)


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
    _check_constructors(cfg)


def _check_constructors(cfg: DictConfig) -> None:
    """The values the data module and the LightningModule check in their constructors (cheap:
    nothing is read or built), before Hydra makes the run folder."""
    import torch
    from hydra.utils import instantiate

    for node, kwargs in (("data", {}), ("module", {"model": torch.nn.Identity()})):
        try:
            instantiate(cfg.task[node], **kwargs)
        except Exception as e:
            if (error := user_error(e)) is not None:
                raise error from None
            # Anything else (an argument only the data provides): the run reports it itself.


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
