"""Step size: fixed (the spec's ``dt``) or learned (``dt = sigmoid(logit)``, one or one per step).

The depth runs a list ``dts`` of one step size per step (:meth:`RecurrentDepth.dts`); these
functions make it. ``dt`` is the configured value (``None`` = ``1 / steps``), ``dts`` what runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from score_exp.core.spec import DepthSpec, configured_dt

if TYPE_CHECKING:
    from score_exp.core.depth import RecurrentDepth
    from score_exp.core.discretisation import Discretisation


def fixed_dt(spec: DepthSpec, steps: int, keep_horizon: bool) -> float:
    """The configured step size when the depth runs ``steps`` steps (growth changes them).

    With ``keep_horizon`` (and an ODE update) the horizon ``T = spec.steps * dt`` is kept, so
    ``dt = T / steps``; otherwise the spec's ``dt`` (``1 / spec.steps`` when None).
    """
    if steps != spec.steps and keep_horizon and spec.update != "none":
        return spec.horizon / steps
    return configured_dt(spec)


def init_dt_logit(spec: DepthSpec) -> Tensor:
    """``sigmoid^-1(dt)``: one logit (``learn_dt=global``) or one per step (``per_step``)."""
    size = 1 if spec.learn_dt == "global" else spec.steps
    dt = configured_dt(spec)
    return torch.full((size,), math.log(dt / (1.0 - dt)))


def learned_dts(logit: Tensor, steps: int) -> list[Tensor]:
    """The learned step size of each of ``steps`` steps: 0-dim tensors that carry gradients."""
    return list(torch.sigmoid(logit).expand(steps).unbind())


def learned_horizon(spec: DepthSpec, logit: Tensor) -> Tensor:
    """The learned depth-time ``T``: the sum of the per-step dts, or ``steps * dt`` for one."""
    learned = torch.sigmoid(logit)  # (1,) or (steps,)
    return learned.sum() if spec.learn_dt == "per_step" else learned[0] * spec.steps


def dts(depth: RecurrentDepth, d: Discretisation) -> list[Any]:
    """The step size of each step of ``depth`` run as ``d`` (see :meth:`RecurrentDepth.dts`)."""
    if d.dt is not None:
        return [d.dt] * d.steps
    if d.steps == depth.steps:
        return learned_dts(depth.dt_logit, d.steps)
    return [learned_horizon(depth.spec, depth.dt_logit) / d.steps] * d.steps
