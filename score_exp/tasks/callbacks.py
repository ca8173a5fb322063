"""Callbacks every run gets (divergence detection, timing, depth diagnostics) and depth growth."""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch
from torch import nn

from score_exp.core import RecurrentDepth

log = logging.getLogger("score_exp.train")


def find_depth(module: nn.Module) -> RecurrentDepth | None:
    """The model's depth: ``module.model.depth``, else the first :class:`RecurrentDepth` inside."""
    depth = getattr(getattr(module, "model", None), "depth", None)
    if isinstance(depth, RecurrentDepth):
        return depth
    return next((m for m in module.modules() if isinstance(m, RecurrentDepth)), None)


class DivergenceDetector(L.Callback):
    """Stops training cleanly at the first non-finite training loss and remembers where."""

    def __init__(self) -> None:
        self.diverged_at: dict | None = None

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
            self.diverged_at = {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "loss": str(value),
            }
            trainer.should_stop = True

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
