"""Checkpoints: the latest training state (last.ckpt), the RNG states inside it, and the checkpoint
IO (atomic writes, data-only reads)."""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint

from score_exp.errors import CheckpointWriteError, ConfigError
from score_exp.runs.record import LAST_CHECKPOINT


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

    FILENAME = LAST_CHECKPOINT

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and (
            isinstance(every_n_train_steps, bool)
            or not isinstance(every_n_train_steps, int)
            or every_n_train_steps < 1
        ):  # a ConfigError: one line naming the key, not Hydra's instantiate traceback
            raise ConfigError(
                "callbacks.last_checkpoint.every_n_train_steps must be an integer >= 1 or null, "
                f"got {every_n_train_steps!r}"
            )
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
        # only the weights. Loading is always torch.load(weights_only=True): see score_exp.runs.checkpoints.
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
    (:func:`score_exp.runs.files.atomic_write_bytes`), so a kill or a full disk never leaves a truncated
    checkpoint; a failed write raises :class:`CheckpointWriteError` naming the file and the
    cause. Loading always uses ``weights_only=True`` (a checkpoint never runs code).
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        import io

        from score_exp.runs.files import atomic_write_bytes

        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        try:
            atomic_write_bytes(path, buf.getbuffer())
        except OSError as e:
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {e.strerror or e} (nothing partial was left)"
            ) from None

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        from score_exp.runs.checkpoints import load_checkpoint

        return load_checkpoint(path)


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
