"""The depth's side of a training loss: what the depth's parts add, for every LightningModule.

A part of the depth with an objective of its own (PonderNet's learned halting) hands it over
through :meth:`RecurrentDepth.loss_terms` after a training forward (``score_exp/core/ponder.py``).
A task module calls :func:`with_depth_loss` once in ``training_step`` with its loss and two
ways to get that loss per sample (a regression target, a sequence): for the forward it has just
run, and for a fresh forward, which the depth replays at each earlier step. With no such part
(every depth but ``halt=ponder``) the loss comes back untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch import Tensor

from score_exp.tasks.callbacks import find_depth


def with_depth_loss(
    module: L.LightningModule,
    loss: Tensor,
    final: Callable[[], Tensor],
    again: Callable[[], Tensor],
    per_step: bool = False,
) -> Tensor:
    """``loss`` with the depth's terms: per-step weights of the task loss, then ``aux``.

    Args:
        module: the LightningModule (its model holds the depth; it logs ``depth/*``).
        loss: the task loss of the forward just run (the final state's).
        final: that loss per sample, ``(S,)`` (samples as the depth counts them: rows, or
            PyG graphs).
        again: runs the model's forward again and returns its loss per sample, ``(S,)``; called
            inside :meth:`RecurrentDepth.replaying` for each earlier step.
        per_step: log every optimiser step (iteration-based training, as the language model's
            ``train/loss``) instead of once per epoch, averaged over data-parallel ranks.

    Returns:
        ``mean_s sum_n w[n, s] L_s(step n)`` + ``aux`` when the depth has loss terms, else
        ``loss`` itself. Logs ``depth/aux_loss`` (and the part's own ``depth/*`` values).
    """
    depth = find_depth(module)
    terms = depth.loss_terms() if depth is not None else None
    if terms is None:
        return loss
    if terms.step_weights is not None:
        w = terms.step_weights  # (N, S)
        losses = []  # per step, each (S,)
        for n in range(len(w) - 1):
            with depth.replaying(n):
                losses.append(again())
        losses.append(final())
        loss = (w * torch.stack(losses).to(w.dtype)).sum(0).mean()
    loss = loss + terms.aux
    logged = {"depth/aux_loss": terms.aux.detach()}
    logged.update({f"depth/{k}": v for k, v in terms.logs.items()})
    module.log_dict(
        logged, on_step=per_step, on_epoch=not per_step, batch_size=1, sync_dist=not per_step
    )
    return loss
