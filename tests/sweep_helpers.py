"""Callbacks injected into real CLI runs by the tests (``+callbacks.NAME._target_=sweep_helpers.X``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    """Sends SIGTERM to its own process at the first training batch of ``epoch``.

    This is what a cluster does to a pre-empted job; Lightning turns it into an exception that
    ends the run, which must then resume from ``checkpoints/last.ckpt``.
    """

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
