"""Per-step observers: controls of the step loop (``loop.py``) that see each ``(h, h_next)``.

An observer's :meth:`Observer.step` returns the state the depth goes on with (``h_next``).
:class:`Trace` records diagnostics; PonderNet's recorder (``ponder.py``) keeps each step's state
and halting probability. Halting that stops samples is a control too, but not an observer: it
removes them from the computation (``halting.py``). The depth computes no norm unless an
observer asks for one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from score_exp.core.halting import relative_change


class Observer:
    """Sees every step; the base class changes nothing."""

    def __call__(self, loop: Any, l: int, h: Tensor, h_next: Tensor) -> Tensor:
        return self.step(h, h_next)

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
