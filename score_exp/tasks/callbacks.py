"""Callbacks every run gets (divergence, last checkpoint, timing, depth diagnostics), depth growth,
and the checkpoint IO (atomic writes, data-only reads)."""

from __future__ import annotations

import logging
import math
import os
import time

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from torch import nn

from score_exp.core import RecurrentDepth
from score_exp.errors import CheckpointWriteError, check_choice, check_int, check_number

log = logging.getLogger("score_exp.train")


def find_depth(module: nn.Module) -> RecurrentDepth | None:
    """The model's depth: ``module.model.depth``, else the first :class:`RecurrentDepth` inside."""
    depth = getattr(getattr(module, "model", None), "depth", None)
    if isinstance(depth, RecurrentDepth):
        return depth
    return next((m for m in module.modules() if isinstance(m, RecurrentDepth)), None)


class DivergenceDetector(L.Callback):
    """Stops a diverged run cleanly and remembers where; the run is then recorded as ``diverged``.

    A run diverges when (a) a training loss is not finite, (b) the monitored validation metric
    is not finite, or (c) (``mode="min"`` monitors) the monitored metric exceeds ``factor`` times
    the task's scale of that metric for ``patience`` validations in a row. The scale comes from
    the LightningModule's ``metric_scale(name)``: the training target's standard deviation for
    a regression RMSE or MAE (about the error of predicting the training mean), ``ln(vocab)``
    for a language model's loss (a uniform guess). A module without a scale, or
    ``factor=None``, leaves only the non-finite checks.

    Args:
        monitor: the validation metric (``task.monitor``); None checks training losses only.
        mode: ``min`` or ``max`` (``task.monitor_mode``); (c) applies to ``min`` only.
        factor: how many times worse than the trivial predictor counts as diverged.
        patience: consecutive validations beyond the threshold before the run is stopped.
    """

    def __init__(
        self,
        monitor: str | None = None,
        mode: str = "min",
        factor: float | None = 10.0,
        patience: int = 3,
    ) -> None:
        # callbacks.divergence.* are the config keys of these arguments (the message names them).
        check_choice("callbacks.divergence.mode", mode, ("min", "max"))
        if factor is not None:
            factor = check_number("callbacks.divergence.factor", factor)
        check_int("callbacks.divergence.patience", patience, 1)
        self.monitor, self.mode, self.factor, self.patience = monitor, mode, factor, patience
        self.diverged_at: dict | None = None
        self.bad = 0  # consecutive validations beyond the threshold

    def _stop(self, trainer, why: dict) -> None:
        self.diverged_at = {"epoch": trainer.current_epoch, "step": trainer.global_step, **why}
        trainer.should_stop = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        bad = not math.isfinite(value)
        if trainer.world_size > 1:
            # Every rank must stop at the same step, or the others wait forever in the next
            # gradient all-reduce: stop when any rank saw a non-finite loss.
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            self._stop(trainer, {"loss": str(value)})

    def on_validation_end(self, trainer, pl_module) -> None:
        # Validation metrics are synchronised over ranks, so every rank decides alike.
        if trainer.sanity_checking or self.monitor is None or self.diverged:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):
            self._stop(trainer, {self.monitor: str(value)})
            return
        scale_of = getattr(pl_module, "metric_scale", None)
        scale = scale_of(self.monitor) if callable(scale_of) else None
        if self.factor is None or self.mode != "min" or not scale:
            return
        threshold = self.factor * scale
        self.bad = self.bad + 1 if value > threshold else 0
        if self.bad >= self.patience:
            self._stop(
                trainer,
                {
                    self.monitor: value,
                    "threshold": threshold,
                    "rule": f"{self.monitor} > {self.factor:g} x {scale:.4g} "
                    f"for {self.patience} validations",
                },
            )

    def state_dict(self) -> dict:
        return {"bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.bad = int(state.get("bad", 0))

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None


class LastCheckpoint(Checkpoint):
    """Writes ``<dirpath>/last.ckpt``: the latest training state, whatever its metric.

    Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when a top-k
    checkpoint is saved, so ``last.ckpt`` is in effect the best one and a killed run resumes
    from the best epoch, re-training everything after it. This callback saves after every
    validation (at the end of each epoch, as ModelCheckpoint does; every ``val_check_interval``
    steps for iteration-based tasks), after the other callbacks (Lightning runs checkpoint callbacks last) so that early
    stopping and the best checkpoint are included, and at the end of training. A kill loses at
    most one validation interval, or ``every_n_train_steps`` optimiser steps when set.

    Args:
        dirpath: the run's checkpoint folder.
        every_n_train_steps: also save every N optimiser steps (iteration-based tasks; on an
            epoch-based task a mid-epoch resume does not reproduce the uninterrupted run).
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        self.dirpath = dirpath
        self.every_n_train_steps = every_n_train_steps
        self._saved_step: int | None = None

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.FILENAME)

    def _save(self, trainer) -> None:
        if (
            trainer.sanity_checking
            or trainer.fast_dev_run
            or self._saved_step == trainer.global_step
        ):
            return
        if trainer.global_step == 0:
            return  # nothing trained yet
        # Second argument False: save the full training state (optimiser, loops, callbacks), not
        # only the weights. Loading is always torch.load(weights_only=True): see rundir.
        trainer.save_checkpoint(self.path, False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_train_steps
        if n and trainer.global_step % n == 0:
            self._save(trainer)

    @staticmethod
    def _at_epoch_end(trainer) -> bool:
        # ModelCheckpoint's rule: with one validation per epoch, save at the epoch's end (after
        # its hooks, so a resume starts the next epoch cleanly, with the numbers of an
        # uninterrupted run); otherwise after each validation.
        return trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not self._at_epoch_end(trainer):
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._at_epoch_end(trainer):
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically and read as data only.

    Saving serialises to memory, then writes a temporary file next to the target and renames it
    (:func:`score_exp.io.atomic_write_bytes`), so a kill or a full disk never leaves a truncated
    checkpoint; a failed write raises :class:`CheckpointWriteError` naming the file and the
    cause. Loading always uses ``weights_only=True`` (a checkpoint never runs code).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import io

        from score_exp.io import atomic_write_bytes

        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        try:
            atomic_write_bytes(path, buf.getbuffer())
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {e.strerror or e} (nothing partial was left)"
            ) from None

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        from score_exp.rundir import load_checkpoint

        return load_checkpoint(path)


class RunTimer(L.Callback):
    """Wall time of each training epoch and optimiser step (validation excluded)."""

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self.step_times: list[float] = []
        self._t_epoch = self._t_step = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t_epoch = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epoch_times.append(time.perf_counter() - self._t_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t_step = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_times.append(time.perf_counter() - self._t_step)

    @staticmethod
    def _mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    def summary(self) -> dict:
        return {
            "time_per_epoch_s": self._mean(self.epoch_times),
            "time_per_step_s": self._mean(self.step_times),
            "epochs_timed": len(self.epoch_times),
        }


class FixedPointSolves(L.Callback):
    """The convergence of a ``solver=fixed_point`` depth: each sample's solve, counted.

    Every training step logs ``depth/solver_converged`` (the fraction of the batch's samples
    whose solve reached ``solver_tol``) and ``depth/solver_max_residual`` (the batch's largest
    relative residual). :meth:`summary` gives the totals of the whole training (kept in
    checkpoints, so a resumed run counts on) and of the last test pass, for ``results.json``.
    A run whose training solves mostly did not converge warns once, in one line, when training
    ends. Nothing is counted for a depth that is not solved.
    """

    def __init__(self) -> None:
        self.train = [0, 0, 0.0]  # samples, converged, largest residual
        self.test = [0, 0, 0.0]
        self._warned = False

    @staticmethod
    def _add(totals: list, depth) -> tuple[float, float] | None:
        if depth is None or depth.last_converged is None:
            return None
        n, converged = depth.last_converged.numel(), int(depth.last_converged.sum())
        largest = float(depth.last_residual.max()) if n else 0.0
        totals[0] += n
        totals[1] += converged
        if not largest <= totals[2]:  # NaN (a diverged solve) stays NaN
            totals[2] = largest if not math.isnan(totals[2]) else totals[2]
        return converged / max(n, 1), largest

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        batch_stats = self._add(self.train, find_depth(pl_module))
        if batch_stats is not None:
            frac, largest = batch_stats
            pl_module.log("depth/solver_converged", frac, on_step=True, on_epoch=False,
                          batch_size=1)  # fmt: skip
            pl_module.log("depth/solver_max_residual", largest, on_step=True, on_epoch=False,
                          batch_size=1)  # fmt: skip

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.test = [0, 0, 0.0]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0) -> None:
        self._add(self.test, find_depth(pl_module))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self.test = self._gathered(pl_module, self.test)

    def on_train_end(self, trainer, pl_module) -> None:
        totals = self._gathered(pl_module, self.train)
        n, converged, largest = totals
        depth = find_depth(pl_module)
        if n and converged / n < 0.5 and not self._warned and trainer.is_global_zero:
            spec = depth.spec
            log.warning(
                "fixed point: only %.0f%% of the training solves converged (largest residual "
                "%.2g > depth.solver_tol=%g within depth.solver_max_iter=%d); raise "
                "solver_max_iter or solver_tol",
                100 * converged / n, largest, spec.solver_tol, spec.solver_max_iter,
            )  # fmt: skip
            self._warned = True

    @staticmethod
    def _gathered(pl_module, totals: list) -> list:
        """The totals over every data-parallel rank (the rank's own on one process)."""
        if pl_module.trainer.world_size == 1:
            return totals
        t = pl_module.all_gather(torch.tensor(totals, dtype=torch.float64, device=pl_module.device))
        return [int(t[:, 0].sum()), int(t[:, 1].sum()), float(t[:, 2].max())]

    @staticmethod
    def _record(totals: list) -> dict | None:
        n, converged, largest = totals
        if not n:
            return None
        return {"converged": round(converged / n, 6), "max_residual": largest, "samples": n}

    def summary(self, spec) -> dict:
        """``results.json``'s ``solver``: the budget, and the training's and test's solves."""
        record = {"tol": spec.solver_tol, "max_iter": spec.solver_max_iter}
        for stage, totals in (("train", self.train), ("test", self.test)):
            if (r := self._record(totals)) is not None:
                record[stage] = r
        return record

    def state_dict(self) -> dict:
        return {"train": list(self.train)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train = list(state_dict.get("train", self.train))


class RNGStateCheckpoint(L.Callback):
    """Saves the Python, NumPy and torch RNG states in every checkpoint and restores them.

    Lightning restores model, optimiser, loop and callback states on resume but not the global
    RNGs, so a resumed run would shuffle its next epoch and draw its dropout masks differently
    from an uninterrupted one. Checkpoints are written after validation, when nothing else
    draws random numbers before the next training batch, so restoring these states makes a
    resumed CPU run reproduce the uninterrupted run's numbers.
    """

    # Only tensors and plain Python values: checkpoints are loaded with ``weights_only=True``.
    def state_dict(self) -> dict:
        import random

        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        import random

        import numpy as np

        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class DepthGrowth(L.Callback):
    """Applies ``spec.growth`` (``[[at, steps], ...]``) during training.

    A shared depth changes its step count (:meth:`RecurrentDepth.set_steps`); a stacked depth
    doubles its blocks (:meth:`RecurrentDepth.refine`) and the optimisers are re-created so
    that they see the new parameters (their moments restart; their schedulers are replayed to
    the current step; single-device strategies only). On resume the depth's stage comes back
    with the checkpoint, so nothing is applied twice.

    Args:
        unit: what ``at`` counts: ``epoch`` (checked at each epoch start), ``step``
            (optimiser steps, checked at each batch start) or ``auto`` (``step`` when the
            trainer has no epoch budget, ``max_epochs=-1``, as iteration-based tasks).
    """

    UNITS = ("auto", "epoch", "step")

    def __init__(self, unit: str = "auto") -> None:
        if unit not in self.UNITS:
            raise ValueError(f"unknown unit {unit!r}; valid units: {', '.join(self.UNITS)}")
        self.unit = unit

    def _unit(self, trainer) -> str:
        if self.unit != "auto":
            return self.unit
        return "step" if trainer.max_epochs in (None, -1) else "epoch"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._unit(trainer) == "epoch":
            self._apply(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._unit(trainer) == "step":
            self._apply(trainer, pl_module, trainer.global_step)

    def _apply(self, trainer, pl_module, at: int) -> None:
        depth = find_depth(pl_module)
        if depth is None or depth.spec.growth is None:
            return
        target = depth.spec.steps_at(at)
        if target == depth.steps:
            return
        before = depth.steps
        if depth.spec.share:
            depth.set_steps(target)
        else:
            while depth.steps < target:
                depth.refine()
            trainer.strategy.setup_optimizers(trainer)
            _replay_schedulers(trainer)
        log.info(
            "depth growth at %s %d: %d -> %d steps (dt %.4g)",
            self._unit(trainer),
            at,
            before,
            depth.steps,
            float(depth.dts()[0]),
        )


class RandomDepth(L.Callback):
    """``depth.train_steps``: draws the step count of each optimiser step before its batch.

    The draw is a function of ``(seed, trainer.global_step)`` only, so every data-parallel rank
    draws the same count, gradient-accumulation micro-batches share one, and a resumed run
    draws what the uninterrupted one drew. Logged as ``depth/train_steps``.

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        depth = find_depth(pl_module)
        if depth is None or depth.spec.train_steps == "fixed":
            return
        n = depth.draw_steps(trainer.global_step, self.seed)
        pl_module.log("depth/train_steps", float(n), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        depth = find_depth(pl_module)
        if depth is not None:
            depth.end_drawn_steps()  # results.json's nfe is the evaluation's, not the last draw's


def _replay_schedulers(trainer) -> None:
    """Bring freshly created LR schedulers to the trainer's current step or epoch."""
    for config in trainer.lr_scheduler_configs:
        if config.reduce_on_plateau:
            continue  # driven by a metric, not by a count
        n = trainer.global_step if config.interval == "step" else trainer.current_epoch
        for _ in range(n // max(1, config.frequency)):
            config.scheduler.step()


class DepthDiagnostics(L.Callback):
    """Logs per-step diagnostics of the depth on the first validation batch of each epoch.

    ``diag/rel_change_step{t}`` (``||h_{t+1} - h_t|| / ||h_t||``), ``diag/contraction_step{t}``
    (``||h_{t+1} - h_t|| / ||h_t - h_{t-1}||``, from ``t = 1``), ``depth/steps`` (the active
    step count), ``depth/dt_step{t}`` with a learned dt, ``depth/steps_used`` (mean over
    samples) with adaptive depth and ``depth/nfe_spent`` (evaluations of ``F`` per sample) with
    adaptive depth or the fixed-point solver. The depth's input is captured by a forward hook, so the cost
    is one extra no-grad pass of the depth alone on one batch per validation.
    """

    def __init__(self) -> None:
        self._handle = None
        self._captured: tuple | None = None
        self._metrics: dict[str, float] = {}

    # The hook stays registered for a whole validation (and test, whose forward must match it)
    # and stores every call's input without a branch: under torch.compile, a hook added or
    # removed between batches, or a condition inside it, would change the compiled forward's
    # guards and recompile it (see README).
    def _capture(self, module, args, kwargs) -> None:
        self._captured = (args[0], dict(kwargs))

    def _arm(self, trainer, pl_module) -> None:
        depth = find_depth(pl_module)
        if depth is None or trainer.sanity_checking:
            return
        self._captured = None
        self._handle = depth.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._captured = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._arm(trainer, pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._arm(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._disarm()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._handle is None or batch_idx != 0 or dataloader_idx != 0:
            return
        depth = find_depth(pl_module)
        metrics: dict[str, float] = {"depth/steps": float(depth.steps)}
        if depth.last_steps_used is not None:
            metrics["depth/steps_used"] = float(depth.last_steps_used.float().mean())
        if depth.last_nfe is not None and (
            depth.last_steps_used is not None or depth.spec.solver != "unroll"
        ):
            metrics["depth/nfe_spent"] = float(depth.last_nfe)  # halting, fixed-point solver
        if self._captured is not None:
            h, ctx = self._captured
            self._captured = None
            # The captured state is in the run's precision (bf16 under autocast): trace it
            # under the same autocast, which Lightning has left by the time this hook runs.
            with trainer.precision_plugin.forward_context():
                trace = depth.trace(h, **ctx)
            for t, v in enumerate(trace["rel_change"].tolist()):
                metrics[f"diag/rel_change_step{t}"] = v
            for t, v in enumerate(trace["contraction"].tolist()[1:], start=1):
                metrics[f"diag/contraction_step{t}"] = v
        if depth.spec.learn_dt != "none":
            for t, v in enumerate(float(dt) for dt in depth.dts()):
                metrics[f"depth/dt_step{t}"] = v
        self._metrics = metrics

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._disarm()
        if self._metrics and not trainer.sanity_checking:
            # Each rank traced its own first batch: average them (a no-op on one process).
            pl_module.log_dict(
                self._metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=True
            )
        self._metrics = {}
