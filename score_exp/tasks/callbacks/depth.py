"""The depth during training: where it is (:func:`find_depth`), its growth and its drawn step
count."""

from __future__ import annotations

import logging

import lightning as L
from torch import nn

from score_exp.core import RecurrentDepth

log = logging.getLogger("score_exp.cli.train")


def find_depth(module: nn.Module) -> RecurrentDepth | None:
    """The model's depth: ``module.model.depth``, else the first :class:`RecurrentDepth` inside."""
    depth = getattr(getattr(module, "model", None), "depth", None)
    if isinstance(depth, RecurrentDepth):
        return depth
    return next((m for m in module.modules() if isinstance(m, RecurrentDepth)), None)


class DepthGrowth(L.Callback):
    """Applies ``spec.growth`` (``[[at, steps], ...]``) during training.

    A shared depth changes its step count (:meth:`RecurrentDepth.set_steps`); a stacked depth
    doubles its blocks (:meth:`RecurrentDepth.refine`) and the optimisers are re-created so
    that they see the new parameters (their moments restart; their schedulers are replayed to
    the current step; single-device strategies only). On resume the depth's stage comes back
    with the checkpoint, so nothing is applied twice. Registered for every run: a no-op for a
    model whose depth does not grow (or that has no depth).

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
        self.active = False  # set in setup: registered for every run, a no-op unless it grows

    def setup(self, trainer, pl_module, stage: str) -> None:
        depth = find_depth(pl_module)
        self.active = depth is not None and depth.spec.growth is not None

    def _unit(self, trainer) -> str:
        if self.unit != "auto":
            return self.unit
        return "step" if trainer.max_epochs in (None, -1) else "epoch"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.active and self._unit(trainer) == "epoch":
            self._apply(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.active and self._unit(trainer) == "step":
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
    draws what the uninterrupted one drew. Logged as ``depth/train_steps``. Registered for
    every run: a no-op for a depth with ``train_steps="fixed"`` (or no depth).

    Args:
        seed: the run's seed.
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.active = False  # set in setup: registered for every run, a no-op unless drawn

    def setup(self, trainer, pl_module, stage: str) -> None:
        depth = find_depth(pl_module)
        self.active = depth is not None and depth.spec.train_steps != "fixed"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.active:
            return
        depth = find_depth(pl_module)
        if depth is None or depth.spec.train_steps == "fixed":
            return
        n = depth.draw_steps(trainer.global_step, self.seed)
        pl_module.log("depth/train_steps", float(n), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        depth = find_depth(pl_module)
        if self.active and depth is not None:
            depth.end_drawn_steps()  # results.json's nfe is the evaluation's, not the last draw's


def _replay_schedulers(trainer) -> None:
    """Bring freshly created LR schedulers to the trainer's current step or epoch."""
    for config in trainer.lr_scheduler_configs:
        if config.reduce_on_plateau:
            continue  # driven by a metric, not by a count
        n = trainer.global_step if config.interval == "step" else trainer.current_epoch
        for _ in range(n // max(1, config.frequency)):
            config.scheduler.step()
