"""Growth: incremental-in-depth training (ContinuousNet). A shared depth changes its step count
(:meth:`RecurrentDepth.set_steps`); a stacked depth duplicates every block
(:meth:`RecurrentDepth.refine`, with :func:`doubled`).

The :class:`Growth` part owns the active step count; with ``spec.growth`` it is persisted as the
buffer ``active_steps``, so that a checkpoint taken at any stage reloads at that stage (a stacked
depth first takes as many blocks as the checkpoint holds: :func:`blocks_in_state_dict`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from score_exp.core.spec import DepthSpec


class Growth(nn.Module):
    """The active (trained) number of steps and whether a change keeps the horizon.

    Without ``spec.growth`` it holds no buffer and its count is ``spec.steps`` unless
    :meth:`set` changes it (``set_steps`` works on any plain shared depth).
    """

    def __init__(self, spec: DepthSpec):
        super().__init__()
        self.steps = spec.steps_at(0)  # growth starts at its first stage
        self.keep_horizon = spec.keep_horizon
        # Learned per-step parameters (ANCRe, learn_dt) fix the step count.
        self.fixed = spec.connect != "chain" or spec.learn_dt != "none"
        # Persisted with a growth schedule only: a plain depth's state dict is its blocks'.
        active = torch.tensor(self.steps) if spec.growth is not None else None
        self.register_buffer("active_steps", active)

    def check(self) -> None:
        if self.fixed:
            raise ValueError("connect='ancre' and learn_dt fix the number of steps")

    def set(self, n: int, keep_horizon: bool | None = None) -> None:
        """Make ``n`` the active step count (and change ``keep_horizon`` unless None)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"steps must be >= 1, got {n}")
        self.check()
        if keep_horizon is not None:
            self.keep_horizon = keep_horizon
        self.steps = n
        if self.active_steps is not None:
            self.active_steps.fill_(n)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "active_steps" in state_dict:
            self.steps = int(state_dict[prefix + "active_steps"])

    def extra_repr(self) -> str:
        return f"steps={self.steps}, keep_horizon={self.keep_horizon}"


def doubled(blocks: nn.ModuleList) -> nn.ModuleList:
    """Block ``l`` becomes blocks ``2l`` and ``2l + 1`` (a copy): ContinuousNet's
    piecewise-constant interpolation in depth. With dt halved (``keep_horizon``) the refined
    depth integrates the same piecewise-constant-in-time vector field over the same horizon."""
    out = []
    for block in blocks:
        out += [block, copy.deepcopy(block)]
    return nn.ModuleList(out)


def blocks_in_state_dict(state_dict: dict, prefix: str) -> int:
    """How many blocks a stacked depth's state dict holds (``<prefix>blocks.<i>.*``)."""
    ids = {
        int(k[len(prefix) + 7 :].split(".", 1)[0])
        for k in state_dict
        if k.startswith(prefix + "blocks.")
    }
    return len(ids)


def resized(blocks: nn.ModuleList, n: int) -> nn.ModuleList:
    """``blocks`` cut or extended (by copies of the last) to ``n`` blocks."""
    out = list(blocks)[:n]
    while len(out) < n:
        out.append(copy.deepcopy(out[-1]))
    return nn.ModuleList(out)
