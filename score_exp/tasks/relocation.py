"""A run folder's results do not depend on its path: the best checkpoint survives a move or copy.

Lightning's ``ModelCheckpoint`` records its folder (``dirpath``) in every checkpoint and, when a
run resumes from a folder with another path ("The dirpath has changed"), forgets the best score
and the best checkpoint so far: a run moved (``mv run run2``) after its best epoch ends with
another best epoch and other numbers, and a finished run copied and re-run ends with no best
checkpoint at all. :class:`RelativeBestCheckpoint` re-reads those paths relative to the folder.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("score_exp.cli.train")

_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


class RelativeBestCheckpoint(L.Callback):
    """On resume, maps the ``ModelCheckpoint`` state of a moved run folder to its new path.

    Runs before the callbacks' states are restored (Lightning calls every ``on_load_checkpoint``
    first): each path under the recorded ``dirpath`` whose file exists at the same place under
    the current one is rewritten in the loaded checkpoint (in memory; the file is not touched),
    and ``dirpath`` with it, so ``ModelCheckpoint`` restores its best score and best checkpoint
    as it does in place. Nothing is saved: the checkpoint's format is unchanged.
    """

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.checkpoint_callbacks:
            state = states.get(cb.state_key) if isinstance(cb, ModelCheckpoint) else None
            if not isinstance(state, dict) or not cb.dirpath:
                continue
            old = state.get("dirpath")
            if not isinstance(old, str) or old == cb.dirpath:
                continue
            moved = {k: _moved(state.get(k), old, cb.dirpath) for k in _PATHS}
            if not moved["best_model_path"] or not os.path.isfile(moved["best_model_path"]):
                continue  # nothing of the old folder here: Lightning's own rule applies
            state.update({k: v for k, v in moved.items() if v is not None})
            state["best_k_models"] = {
                _moved(p, old, cb.dirpath): v for p, v in (state.get("best_k_models") or {}).items()
            }
            state["dirpath"] = cb.dirpath
            log.info("the run folder moved from %s: best checkpoint found relative to it", old)


def _moved(path: Any, old: str, new: str) -> Any:
    """``path`` under ``old`` as the same relative path under ``new`` (else unchanged)."""
    if not isinstance(path, str) or not path:
        return path
    rel = os.path.relpath(path, old)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return path
    return os.path.join(new, rel)
