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


def initial_state(spec: DepthSpec, e: Tensor) -> Tensor:
    """``h_0`` for the input ``e``."""
    if spec.init_state == "zeros":
        return torch.zeros_like(e)
    if spec.init_state == "random":
        return torch.randn_like(e) * spec.init_std
    return e


def concat_weight(width: int) -> Tensor:
    """``[I, I]``: ``W [h, e] = h + e`` at initialisation."""
    eye = torch.eye(width)
    return torch.cat([eye, eye], dim=1)  # (C, 2C)


def injected(
    block: nn.Module, spec: DepthSpec, e: Tensor, weight: Tensor | None
) -> Callable[..., Tensor]:
    """``block`` as seen by the update rule: ``F`` itself, ``F(h + e)`` or ``F(W [h, e])``."""
    if spec.inject == "add":

        def add(h: Tensor, **ctx: Any) -> Tensor:
            return block(h + e, **ctx)

        return add
    if spec.inject == "concat":

        def concat(h: Tensor, **ctx: Any) -> Tensor:
            return block(torch.cat([h, e], dim=-1) @ weight.T, **ctx)  # (..., C)

        return concat
    return block
