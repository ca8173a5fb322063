"""What a run records about itself: divergence (the run's status) and the wall time of its steps."""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch

from score_exp.errors import check_choice, check_int, check_number

log = logging.getLogger("score_exp.cli.train")


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
