"""Callbacks injected into real CLI runs by the tests (``+callbacks.NAME._target_=sweep_helpers.X``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    """Sends SIGTERM to its own process at the first training batch of ``epoch`` (or at ``step``).

    This is what a cluster does to a pre-empted job; Lightning turns it into an exception that
    ends the run, which must then resume from ``checkpoints/last.ckpt``. Only a fresh run is
    killed: re-running the same command (same config, same fingerprint) resumes to the end.
    """

    def __init__(self, epoch: int | None = None, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.ckpt_path is not None:
            return  # a resumed run
        at_epoch = self.epoch is not None and trainer.current_epoch == self.epoch and batch_idx == 0
        at_step = self.step is not None and trainer.global_step == self.step
        if at_epoch or at_step:
            os.kill(os.getpid(), signal.SIGTERM)


class ZeroWeightsFrom(L.Callback):
    """Zeroes every parameter at the start of each epoch from ``epoch`` on (fresh or resumed):
    later epochs are then worse than the earlier best, whatever the machine's rounding."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import torch

        if trainer.current_epoch >= self.epoch:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.zero_()
