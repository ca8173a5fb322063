"""Input injection and the initial state (Huginn-style recurrent depth).

``inject``: every step sees the depth's input ``e`` (the encoder output): ``F(h + e)`` (``add``)
or ``F(W [h, e])`` (``concat``, ``W`` a learned ``(C, 2C)`` matrix initialised at ``[I, I]``, so
it starts as ``add``). ``init_state``: the iteration starts at ``e`` (``input``), at zeros, or at
a random state (``N(0, init_std^2)``); the last two need injection to see the input at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from score_exp.core.spec import DepthSpec


def concat_weight(width: int) -> Tensor:
    """``[I, I]``: ``W [h, e] = h + e`` at initialisation."""
    eye = torch.eye(width)
    return torch.cat([eye, eye], dim=1)  # (C, 2C)


class Injection(nn.Module):
    """How every step sees the input ``e``: ``F`` itself (``none``), ``F(h + e)`` or ``F(W [h, e])``,
    and where the iteration starts (:meth:`initial_state`).

    Always present in a depth; only ``concat`` holds a parameter, ``weight`` ``(C, 2C)``.

    Args:
        spec: the depth's spec (``inject``, ``init_state``, ``init_std``).
        width: the state's last dimension (``concat``'s projection).
    """

    def __init__(self, spec: DepthSpec, width: int | None = None):
        super().__init__()
        self.kind, self.init_state, self.init_std = spec.inject, spec.init_state, spec.init_std
        if self.kind == "concat":
            if width is None:
                raise ValueError("inject='concat' needs the state width: RecurrentDepth(width=C)")
            self.weight = nn.Parameter(concat_weight(width))

    def initial_state(self, e: Tensor) -> Tensor:
        """``h_0`` for the input ``e``."""
        if self.init_state == "zeros":
            return torch.zeros_like(e)
        if self.init_state == "random":
            return torch.randn_like(e) * self.init_std
        return e

    def forward(self, block: nn.Module, e: Tensor) -> Callable[..., Tensor]:
        """``block`` as seen by the update rule."""
        if self.kind == "add":

            def add(h: Tensor, **ctx: Any) -> Tensor:
                return block(h + e, **ctx)

            return add
        if self.kind == "concat":

            def concat(h: Tensor, **ctx: Any) -> Tensor:
                return block(torch.cat([h, e], dim=-1) @ self.weight.T, **ctx)  # (..., C)

            return concat
        return block

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, init_state={self.init_state!r}"
