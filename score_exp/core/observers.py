"""Per-step observers: they see each step's ``(h, h_next)`` and may act on it.

An observer's :meth:`Observer.step` returns the state the depth goes on with (normally
``h_next``); :attr:`Observer.done` ends the loop early. :class:`Trace` records diagnostics,
:class:`Halting` freezes the samples that have converged (adaptive depth at inference). The
depth computes no norm unless one of them is attached.
"""

from __future__ import annotations

import torch
from torch import Tensor


def row_norm(x: Tensor) -> Tensor:
    """Euclidean norm over all dims but the first: ``(B, ...) -> (B,)``."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)


def relative_change(h: Tensor, h_next: Tensor) -> tuple[Tensor, Tensor]:
    """``(||h_next - h|| / ||h||, ||h_next - h||)`` per sample, each ``(B,)``."""
    change = row_norm(h_next - h)  # (B,)
    return change / row_norm(h).clamp_min(1e-30), change


class Observer:
    """Sees every step; the base class changes nothing and never stops the loop."""

    done = False

    def step(self, h: Tensor, h_next: Tensor) -> Tensor:
        return h_next


class Trace(Observer):
    """Records ``(rel_change, change)`` per step, each ``(B,)``: see :meth:`RecurrentDepth.trace`."""

    def __init__(self) -> None:
        self.record: list[tuple[Tensor, Tensor]] = []

    def step(self, h: Tensor, h_next: Tensor) -> Tensor:
        self.record.append(relative_change(h, h_next))
        return h_next

    def summary(self) -> dict[str, Tensor]:
        rel = torch.stack([r.mean() for r, _ in self.record])
        contraction = [torch.full((), float("nan"), device=rel.device)]
        for (_, prev), (_, cur) in zip(self.record, self.record[1:], strict=False):
            contraction.append((cur / prev.clamp_min(1e-30)).mean())
        return {"rel_change": rel, "contraction": torch.stack(contraction)}


class Halting(Observer):
    """A sample stops once ``||h_{t+1} - h_t|| / ||h_t|| < eps``; a stopped sample keeps its state.

    Attributes:
        steps_used: ``(B,)`` long, the steps each sample took (the step that fell below ``eps``
            included).
    """

    def __init__(self, eps: float, h0: Tensor):
        self.eps = eps
        self.active = torch.ones(h0.shape[0], dtype=torch.bool, device=h0.device)  # (B,)
        self.steps_used = torch.zeros(h0.shape[0], dtype=torch.long, device=h0.device)  # (B,)

    def step(self, h: Tensor, h_next: Tensor) -> Tensor:
        rel, _ = relative_change(h, h_next)
        h_next = torch.where(self.active.view(-1, *[1] * (h.dim() - 1)), h_next, h)
        self.steps_used += self.active.long()
        self.active = self.active & (rel >= self.eps)
        return h_next

    @property
    def done(self) -> bool:
        return not bool(self.active.any())
