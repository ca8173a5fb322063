"""Callbacks every run gets: divergence detection and timing."""

from __future__ import annotations

import math
import time

import lightning as L
import torch


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
