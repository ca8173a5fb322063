"""Growth: incremental-in-depth training (ContinuousNet). A shared depth changes its step count
(:func:`set_steps`); a stacked depth duplicates every block (:func:`refine`).

The active step count is persisted as the buffer ``active_steps`` so that a checkpoint taken at
any stage reloads at that stage (:func:`resize_to_state_dict`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from score_exp.core.depth import RecurrentDepth


def _check_fixed_parts(depth: RecurrentDepth) -> None:
    if depth.spec.connect != "chain" or depth.spec.learn_dt != "none":
        raise ValueError("connect='ancre' and learn_dt fix the number of steps")


def set_steps(depth: RecurrentDepth, n: int, keep_horizon: bool | None = None) -> None:
    """Change the active number of steps of a shared depth; see :meth:`RecurrentDepth.set_steps`."""
    if not depth.spec.share:
        raise ValueError("set_steps is for shared depths; a stacked depth grows by refine()")
    if n < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    _check_fixed_parts(depth)
    if keep_horizon is not None:
        depth.keep_horizon = keep_horizon
    set_active(depth, n)


def refine(depth: RecurrentDepth) -> None:
    """Double a stacked depth: block ``l`` becomes blocks ``2l`` and ``2l + 1``.

    This is ContinuousNet's piecewise-constant interpolation in depth: with dt halved
    (residual and contractive updates, ``keep_horizon``) the refined depth integrates the same
    piecewise-constant-in-time vector field over the same horizon.
    """
    if depth.spec.share:
        raise ValueError("refine is for stacked depths; a shared depth grows by set_steps()")
    _check_fixed_parts(depth)
    blocks = []
    for block in depth.blocks:
        blocks += [block, copy.deepcopy(block)]
    depth.blocks = nn.ModuleList(blocks)
    set_active(depth, len(blocks))


def set_active(depth: RecurrentDepth, n: int) -> None:
    depth._steps = n
    if hasattr(depth, "active_steps"):
        depth.active_steps.fill_(n)


def resize_to_state_dict(depth: RecurrentDepth, state_dict: dict, prefix: str) -> None:
    """Before loading: give a stacked depth as many blocks as the checkpoint holds."""
    if depth.spec.share:
        return
    ids = {
        int(k[len(prefix) + 7 :].split(".", 1)[0])
        for k in state_dict
        if k.startswith(prefix + "blocks.")
    }
    if ids and len(ids) != len(depth.blocks):
        blocks = list(depth.blocks)[: len(ids)]
        while len(blocks) < len(ids):
            blocks.append(copy.deepcopy(blocks[-1]))
        depth.blocks = nn.ModuleList(blocks)
        depth._steps = len(blocks)
