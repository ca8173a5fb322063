"""The one step loop of the depth, the update rule, and the context each block call gets.

Every runner (``runners.py``) that takes steps takes them here, in :func:`integrate`: for each
step ``l``, the input mixing gives the state it updates, one integrator step of the update's
vector field makes the next state, and a *control* (a runner's per-step hook) sees
``(h, h_next)``: it records, or removes finished samples, or stops the loop. ``backprop_steps``
(truncated backprop) is honoured here, so every runner honours it.

A block is called as ``F(h, **ctx)``: ``ctx`` is what the model passed to the depth (e.g.
``edge_index``). A block whose ``forward`` takes a keyword ``step`` also gets a
:class:`StepContext` (the step's index, the integrator's stage and the rows still running), so
it can keep something per (step, stage), e.g. a KV cache, without the core knowing what.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from score_exp.core.integrators import INTEGRATORS


@dataclass(frozen=True)
class StepContext:
    """Where a block call sits in the forward, for blocks that ask (a ``step`` keyword).

    Attributes:
        index: the step, ``0 .. steps - 1`` (for the fixed-point solver: the evaluation of
            ``F``, the last one being the differentiable step).
        stage: the integrator's evaluation within the step, ``0 .. evals_per_step - 1``
            (``k1 .. k4`` of ``rk4`` are stages 0..3); always 0 for ``update="none"``.
        rows: the rows of the forward's input that this call sees, when halting has removed
            finished samples (a long tensor); None: every row.
    """

    index: int
    stage: int = 0
    rows: Tensor | None = None


def takes_step(block: nn.Module) -> bool:
    """Whether ``block``'s forward takes the :class:`StepContext` (a parameter named ``step``),
    read from its signature (as PyG's ``MessagePassing`` reads its ``message``'s)."""
    try:
        return "step" in inspect.signature(block.forward).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def update_step(
    F: Callable[..., Tensor],
    h: Tensor,
    dt: Any,
    update: str,
    integrator: str,
    ctx: dict[str, Any],
    context: Callable[[int], StepContext] | None = None,
) -> Tensor:
    """The update rule: ``F(h)`` itself (``none``), or an integrator step of ``F(h) - h``
    (``contractive``) or ``F(h)`` (``residual``). ``context(stage)``: the step context of each
    evaluation, for a block that takes one (None: the block is called with ``ctx`` alone)."""

    def call(x: Tensor, stage: int) -> Tensor:
        if context is None:
            return F(x, **ctx)
        return F(x, step=context(stage), **ctx)

    if update == "none":
        return call(h, 0)
    if update == "contractive":

        def field(x: Tensor, stage: int) -> Tensor:
            return call(x, stage) - x

    else:
        field = call
    return INTEGRATORS[integrator].step(field, h, dt)


class MixState(Protocol):
    """One forward's input mixing (``mixing.py``): what state step ``l`` updates."""

    def input(self, l: int, h: Tensor) -> Tensor: ...
    def push(self, h: Tensor) -> None: ...
    def keep(self, rows: Tensor) -> None: ...


Step = Callable[..., Tensor]  # step(l, x, e, dt, integrator, ctx, rows) -> h_next


@dataclass
class Loop:
    """What one forward's steps run on; a control may cut it to the samples still running.

    Attributes:
        step: the depth's step function (its block ``l``, injection and update rule).
        F: the depth's block ``l`` as a step sees it (injection, context), without the update
            rule: ``F(l, x, e, ctx, rows)`` (the fixed-point solver's map).
        steps, integrator, dts: the discretisation (the step size of each step).
        mix: the forward's input mixing.
        e: the depth's input (injected into every step); ctx: the block's context.
        rows: the rows still running (None: all of them).
        backprop_steps: only the last ``k`` steps build a graph (None: all).
    """

    step: Step
    F: Callable[..., Tensor]
    steps: int
    integrator: str
    dts: list[Any]
    mix: MixState
    e: Tensor
    ctx: dict[str, Any] = field(default_factory=dict)
    rows: Tensor | None = None
    backprop_steps: int | None = None


# A control sees (loop, l, h, h_next) after step l and returns the state to go on from, or None
# to stop; it may cut ``loop`` (rows, e, ctx, mix) to the samples still running.
Control = Callable[[Loop, int, Tensor, Tensor], "Tensor | None"]


def integrate(loop: Loop, h: Tensor, control: Control | None = None) -> Tensor:
    """``loop.steps`` steps from ``h``: the paper's depth, and the only loop over steps."""
    grad = torch.is_grad_enabled()
    k = loop.backprop_steps
    first_grad = loop.steps - k if k is not None and grad else 0
    for l in range(loop.steps):
        # backprop_steps: the steps before the last k build no graph.
        with torch.set_grad_enabled(grad and l >= first_grad):
            x = loop.mix.input(l, h)  # the state step l updates (h itself for the chain)
            h_next = loop.step(l, x, loop.e, loop.dts[l], loop.integrator, loop.ctx, loop.rows)
        loop.mix.push(h_next)
        h_next = h_next if control is None else control(loop, l, h, h_next)
        if h_next is None:
            break
        h = h_next
    return h
