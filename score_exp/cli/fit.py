"""The run's sequence once ``score-train`` has claimed its folder: callbacks, loggers, trainer,
model, fit, evaluation at the best checkpoint, record (:func:`fit_and_test`, one named call per step).

Lightning is imported here, inside the functions, so that ``score-train --help`` and a refused
input never pay for it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from score_exp.core import DepthSpec
from score_exp.errors import ConfigError
from score_exp.run import build, trainable_params
from score_exp.runs import cluster
from score_exp.runs.checkpoints import load_checkpoint
from score_exp.runs.claim import keep_finished
from score_exp.runs.files import check_output_dir
from score_exp.runs.fingerprint import flatten
from score_exp.runs.record import CONFIG, SPLITS, RunFolder, RunRecord
from score_exp.tasks.distributed import per_device_batch, stop_ranks_together

log = logging.getLogger("score_exp.cli.train")


def fit_and_test(
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
    stop_ranks_together(trainer)  # SIGTERM: no collective inside a signal handler (a deadlock)
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
