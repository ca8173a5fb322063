"""Step size: fixed (the spec's ``dt``) or learned (``dt = sigmoid(logit)``, one or one per step).

The :class:`StepSize` part owns the learned logit (``learn_dt``); with a fixed step size it holds
nothing. The depth runs a list ``dts`` of one step size per step; ``dt`` is the configured value
(``None`` = ``1 / steps``), ``dts`` what runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from score_exp.core.spec import DepthSpec, configured_dt


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


class StepSize(nn.Module):
    """The depth's step sizes: ``logit`` ``(1,)`` or ``(steps,)`` when ``learn_dt``, else none.

    Args:
        spec: the depth's spec (``learn_dt``, ``dt``, ``steps``).
    """

    def __init__(self, spec: DepthSpec):
        super().__init__()
        self.mode, self.steps = spec.learn_dt, spec.steps
        self.logit = nn.Parameter(init_dt_logit(spec)) if self.learned else None

    @property
    def learned(self) -> bool:
        return self.mode != "none"

    def horizon(self) -> Tensor:
        """The learned depth-time ``T``: the sum of the per-step dts, or ``steps * dt`` for one."""
        learned = torch.sigmoid(self.logit)  # (1,) or (steps,)
        return learned.sum() if self.mode == "per_step" else learned[0] * self.steps

    def dts(self, steps: int, dt: float | None) -> list[Any]:
        """The step size of each of ``steps`` steps: ``dt`` (a float) for every step, or (None)
        the learned ones, 0-dim tensors that carry gradients (at another step count than the
        trained one: the learned horizon shared equally)."""
        if dt is not None:
            return [dt] * steps
        if steps == self.steps:
            return list(torch.sigmoid(self.logit).expand(steps).unbind())
        return [self.horizon() / steps] * steps

    def extra_repr(self) -> str:
        return f"learn_dt={self.mode!r}"
