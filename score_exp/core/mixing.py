"""Input mixing: what state step ``j`` updates.

``chain`` (the default, SCORE): step ``j`` updates ``h_j``. ``ancre``: step ``j`` updates a
learned mixture ``sum_i softmax(c_j / tau)_i h_i`` of every state so far, ``h_0 .. h_j``
(ANCRe-style connectivity); its logits ``c`` are a ``(steps, steps)`` parameter of the
:class:`Mixing` part.
``ancre_param="residual"`` parameterises the same mixture as the chain plus learned residual
coefficients, ``h_j + sum_{i<j} a_ji (h_i - h_j)`` (``a = 0`` at initialisation), computed as a
running sum without stacking the states.

The :class:`Mixing` part owns the parameters; :meth:`Mixing.start` makes a small per-forward
object: :meth:`Chain.input` gives the input of step ``l`` from
the current state, :meth:`Chain.push` sees each new state, :meth:`Chain.keep` drops the rows of
halted samples. Nothing here evaluates ``F``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from score_exp.core.spec import DepthSpec


class Chain:
    """Step ``l`` updates the current state: no memory, no cost."""

    def input(self, l: int, h: Tensor) -> Tensor:
        return h

    def push(self, h: Tensor) -> None:
        pass

    def keep(self, rows: Tensor) -> None:
        """Only ``rows`` go on (halting removed the others)."""


class Ancre(Chain):
    """Step ``l`` updates ``sum_{i <= l} weights[l, i] h_i`` (``h_0`` is the depth's input).

    Args:
        weights: ``(steps, steps)`` mixture weights, rows summing to 1 over ``h_0 .. h_l``.
        h0: the initial state.
    """

    def __init__(self, weights: Tensor, h0: Tensor):
        self.weights = weights
        self.states = [h0]

    def input(self, l: int, h: Tensor) -> Tensor:
        if l == 0:
            return h
        stacked = torch.stack(self.states)  # (l + 1, *h.shape)
        return torch.tensordot(self.weights[l, : l + 1], stacked, dims=1)  # h.shape

    def push(self, h: Tensor) -> None:
        self.states.append(h)

    def keep(self, rows: Tensor) -> None:
        self.states = [s[rows] for s in self.states]


class AncreResidual(Ancre):
    """Step ``l`` updates ``h_l + sum_{i < l} a[l, i] (h_i - h_l)``: ``a = 0`` is the chain.

    Computed as ``(1 - sum_i a[l, i]) h_l + sum_i a[l, i] h_i``, a running sum of ``l + 1``
    scaled states: no stacking of the earlier states, so the cost is ``l + 1`` axpy's per step.

    Args:
        weights: ``a``, ``(steps, steps)`` coefficients (only ``i < l`` is used in row ``l``).
        h0: the initial state.
    """

    def input(self, l: int, h: Tensor) -> Tensor:
        if l == 0:
            return h
        row = self.weights[l, :l]  # (l,)
        x = h * (1.0 - row.sum())
        for i in range(l):
            x = x + row[i] * self.states[i]
        return x


def residual_weights(a: Tensor) -> Tensor:
    """The mixture weights of :class:`AncreResidual`: ``a`` below the diagonal, ``1 - sum`` on it."""
    strict = a.tril(-1)
    return strict + torch.diag(1.0 - strict.sum(1))


def ancre_init_logits(steps: int, init: float, tau: float) -> Tensor:
    """Logits that give ``h_j`` the weight ``init`` in every row ``j`` (the rest shared equally).

    Row ``j`` holds the logits over ``h_0 .. h_j`` (lower triangle, diagonal included):
    diagonal ``tau * log(p j / (1 - p))`` with zeros elsewhere. The default ``p = 0.9999``
    keeps a deep first forward within 1e-3 of the chain (0.999 drifts ~3e-3 over 6 steps) at
    the price of a saturated softmax that learns slowly; see ``DepthSpec.ancre_init``.
    """
    logits = torch.zeros(steps, steps)
    for j in range(1, steps):
        logits[j, j] = tau * math.log(init * j / (1.0 - init))
    return logits


def ancre_weights(logits: Tensor, mask: Tensor, tau: float) -> Tensor:
    """Row-wise softmax of ``logits / tau`` over the allowed (lower-triangular) entries."""
    return (logits / tau).masked_fill(~mask, float("-inf")).softmax(dim=-1)


class Mixing(nn.Module):
    """The depth's input mixing part: the chain (no parameters) or ANCRe's.

    ``connect="ancre"`` owns ``logits`` ``(steps, steps)`` (and the non-persistent lower-triangle
    ``mask``) or, for ``ancre_param="residual"``, ``residual`` ``(steps, steps)``.

    Args:
        spec: the depth's spec (``connect``, ``ancre_*``, ``steps``).
    """

    def __init__(self, spec: DepthSpec):
        super().__init__()
        self.connect, self.param, self.tau = spec.connect, spec.ancre_param, spec.ancre_tau
        self.steps = n = spec.steps
        if spec.connect == "ancre" and spec.ancre_param == "residual":
            self.residual = nn.Parameter(torch.zeros(n, n))
        elif spec.connect == "ancre":
            self.logits = nn.Parameter(ancre_init_logits(n, spec.ancre_init, spec.ancre_tau))
            self.register_buffer("mask", torch.ones(n, n).tril().bool(), persistent=False)

    def weights(self) -> Tensor:
        """The ANCRe mixture weights, ``(steps, steps)``."""
        if self.param == "residual":
            return residual_weights(self.residual)
        return ancre_weights(self.logits, self.mask, self.tau)

    def connection_weights(self) -> Tensor:
        """``(steps, steps + 1)``: row ``j`` weighs ``h_0 .. h_steps`` (the chain: the identity)."""
        n = self.steps
        w = self.weights() if self.connect == "ancre" else torch.eye(n)  # (n, n)
        return torch.cat([w, w.new_zeros(n, 1)], dim=1)  # (steps, steps + 1)

    def start(self, h0: Tensor) -> Chain:
        """The mixing of one forward from ``h0``."""
        if self.connect != "ancre":
            return Chain()
        if self.param == "residual":
            return AncreResidual(self.residual, h0)
        return Ancre(self.weights(), h0)

    def extra_repr(self) -> str:
        return f"connect={self.connect!r}" + (
            f", param={self.param!r}" if self.connect == "ancre" else ""
        )
