"""Random step counts in training (Huginn): the number of steps drawn per optimiser step.

The draw is a pure function of ``(seed, index)`` (the optimiser step), so every data-parallel
rank draws the same count without communicating, and a resumed run draws what it drew before.
The :class:`StepCount` part keeps the last draw (not persisted: a resumed run draws again).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from score_exp.core.spec import DepthSpec


def draw_steps(spec: DepthSpec, seed: int, index: int) -> int:
    """The step count of optimiser step ``index`` for ``spec.train_steps`` (``steps`` if fixed)."""
    law, args = spec.train_steps_law()
    if law == "fixed":
        return spec.steps
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (2**63))
    if law == "uniform":
        a, b = int(args[0]), int(args[1])
        return int(torch.randint(a, b + 1, (1,), generator=g))
    mean, sigma = args  # lognormal_poisson, Huginn's sampler
    tau = torch.normal(math.log(mean) - sigma**2 / 2, sigma, (1,), generator=g)
    n = 1 + int(torch.poisson(tau.exp(), generator=g))
    return min(n, math.ceil(4 * mean))


class StepCount(nn.Module):
    """``train_steps``: the count drawn for the current optimiser step (``drawn``; None: the
    trained count). Training forwards run it; evaluation forwards never do."""

    def __init__(self, spec: DepthSpec):
        super().__init__()
        self.spec = spec
        self.drawn: int | None = None

    def draw(self, index: int, seed: int = 0) -> int:
        self.drawn = draw_steps(self.spec, seed, index)
        return self.drawn

    def end(self) -> None:
        self.drawn = None

    def extra_repr(self) -> str:
        return f"train_steps={self.spec.train_steps!r}"
