"""Runners: how a forward of the depth runs its steps, chosen once per discretisation.

As torchdeq picks its solver and torchdiffeq its method by name, a :class:`Discretisation`
names its runner (``runner`` for evaluation, ``train_runner`` for training) and the depth calls
``RUNNERS[name]``. Every runner that takes steps takes them in the one loop
(:func:`~score_exp.core.loop.integrate`), with a control of its own:

==============  ===========================================================================
``unroll``      every step, no control: the paper's depth
``record``      every step, PonderNet's recorder keeps each state and ``lambda`` (training)
``halting``     early exit: finished samples leave the computation (``halting.EarlyExit``)
``fixed_point`` Anderson to ``h* = F(h*)`` per sample, then one differentiable ``F``
``replay``      no step: the state a ``record`` forward kept at step ``n`` (PonderNet's loss)
==============  ===========================================================================

A runner is ``run(loop, h, request) -> RunResult``: it sees the forward's :class:`Loop` and the
halting arguments (:class:`Request`), and returns the state and its statistics, never touching
the depth. Adding one: a function here, a name in :data:`RUNNERS`, and the rule that picks it
in ``Discretisation.__post_init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from score_exp.core import solver
from score_exp.core.halting import EarlyExit, Select
from score_exp.core.loop import Loop, integrate
from score_exp.core.ponder import Halting, PonderRecorder
from score_exp.core.spec import DepthSpec


@dataclass
class Request:
    """What a forward asks beyond its state (see :meth:`RecurrentDepth.forward`)."""

    spec: DepthSpec
    halt: str
    adaptive_eps: float | None
    evals_per_step: int
    halting: Halting
    group: Tensor | None = None
    select: Select | None = None
    readout: Callable[[Tensor], Tensor] | None = None
    record: PonderRecorder | None = None  # replay: the last training forward's record
    replay: int | None = None


@dataclass
class RunResult:
    """A forward's state and what it spent (per sample where a tensor)."""

    h: Tensor
    nfe: float
    steps_used: Tensor | None = None
    iterations: Tensor | None = None
    residual: Tensor | None = None
    converged: Tensor | None = None
    record: PonderRecorder | None = None


def num_samples(h: Tensor, group: Tensor | None) -> int:
    return int(group.max()) + 1 if group is not None and group.numel() else h.shape[0]


def unroll(loop: Loop, h: Tensor, request: Request) -> RunResult:
    return RunResult(integrate(loop, h), loop.steps * request.evals_per_step)


def record(loop: Loop, h: Tensor, request: Request) -> RunResult:
    rec = request.halting.recorder(request.group, num_samples(h, request.group))
    return RunResult(integrate(loop, h, rec), loop.steps * request.evals_per_step, record=rec)


def halting(loop: Loop, h: Tensor, request: Request) -> RunResult:
    criterion = request.halting.criterion(request.halt, request.readout)
    control = EarlyExit(
        criterion, request.adaptive_eps, h, request.group, request.select, request.evals_per_step
    )
    integrate(loop, h, control)
    used = control.used
    return RunResult(control.out, control.spent / len(used), steps_used=used)


def fixed_point(loop: Loop, h: Tensor, request: Request) -> RunResult:
    """``solver=fixed_point``: Anderson to ``h* = F(h*)`` per sample, then one differentiable
    ``F``; the step context's ``index`` counts the evaluations of ``F``."""
    count = iter(range(1 << 62))

    def F(x: Tensor) -> Tensor:
        return loop.F(next(count), x, loop.e, loop.ctx, loop.rows)

    out, sol = solver.fixed_point(F, h, request.spec, request.group)
    return RunResult(
        out,
        sol.evals + 1,
        iterations=sol.iterations,
        residual=sol.residual,
        converged=sol.converged,
    )


def replay(loop: Loop, h: Tensor, request: Request) -> RunResult:
    """The state the last ``record`` forward kept after step ``request.replay``."""
    if request.record is None:
        raise RuntimeError("replaying(n) needs a training forward that kept its states")
    rec = request.record
    # The statistics of the forward that recorded it: a replay spends nothing new.
    nfe = len(rec.states) * request.evals_per_step
    return RunResult(rec.states[request.replay], nfe, record=rec)


Runner = Callable[[Loop, Tensor, Request], RunResult]

RUNNERS: dict[str, Runner] = {
    "unroll": unroll,
    "record": record,
    "halting": halting,
    "fixed_point": fixed_point,
    "replay": replay,
}


def get_runner(name: str) -> Runner:
    try:
        return RUNNERS[name]
    except KeyError:
        raise ValueError(f"unknown runner {name!r}; valid runners: {', '.join(RUNNERS)}") from None
