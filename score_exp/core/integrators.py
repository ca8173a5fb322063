"""Explicit one-step integrators for ``dh/dt = f(h)``, kept in a name registry.

Each integrator is a tiny step function ``step(f, h, dt) -> h_next`` plus its declared
order and number of field evaluations per step (as torchdiffeq's fixed-grid methods). The field
is called as ``f(x, stage)``: ``stage`` numbers the step's evaluations ``0 .. evals_per_step - 1``
in order, so a block that keeps something per evaluation (a KV cache per step and stage) knows
which one it is (see :class:`~score_exp.core.loop.StepContext`). The loop over steps lives in
one place (``loop.py``); nothing here knows about blocks or weight sharing.

Our ``rk4`` is the classic fourth-order Runge-Kutta (weights 1/6, 1/3, 1/3, 1/6); torchdiffeq's
``rk4`` is the 3/8 rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

Field = Callable[[Tensor, int], Tensor]  # f(x, stage)


@dataclass(frozen=True)
class Integrator:
    """A registered explicit Runge-Kutta step.

    Attributes:
        name: registry key (``euler``, ``heun``, ``midpoint``, ``rk4``).
        order: global order of accuracy of the method.
        evals_per_step: evaluations of the field ``f`` (hence of the block ``F``) per step.
        step: ``step(f, h, dt)`` returns the state after one step of size ``dt``.
    """

    name: str
    order: int
    evals_per_step: int
    step: Callable[[Field, Tensor, float], Tensor]


def euler_step(f: Field, h: Tensor, dt: float) -> Tensor:
    """Forward Euler: ``h + dt * f(h)``."""
    return h + dt * f(h, 0)


def heun_step(f: Field, h: Tensor, dt: float) -> Tensor:
    """Heun's method (explicit trapezoid): average the slopes at both ends of an Euler step."""
    k1 = f(h, 0)
    k2 = f(h + dt * k1, 1)
    return h + 0.5 * dt * (k1 + k2)


def midpoint_step(f: Field, h: Tensor, dt: float) -> Tensor:
    """Explicit midpoint: the slope at half an Euler step."""
    k1 = f(h, 0)
    k2 = f(h + 0.5 * dt * k1, 1)
    return h + dt * k2


def rk4_step(f: Field, h: Tensor, dt: float) -> Tensor:
    """Classic fourth-order Runge-Kutta (weights 1/6, 1/3, 1/3, 1/6).

    Note: torchdiffeq's ``rk4`` is the 3/8 rule variant; this is the classic one.
    """
    k1 = f(h, 0)
    k2 = f(h + 0.5 * dt * k1, 1)
    k3 = f(h + 0.5 * dt * k2, 2)
    k4 = f(h + dt * k3, 3)
    return h + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


INTEGRATORS: dict[str, Integrator] = {
    i.name: i
    for i in (
        Integrator("euler", order=1, evals_per_step=1, step=euler_step),
        Integrator("heun", order=2, evals_per_step=2, step=heun_step),
        Integrator("midpoint", order=2, evals_per_step=2, step=midpoint_step),
        Integrator("rk4", order=4, evals_per_step=4, step=rk4_step),
    )
}


def get_integrator(name: str) -> Integrator:
    """Look up an integrator by name.

    Raises:
        ValueError: the name is not registered; the message lists the valid names.
    """
    try:
        return INTEGRATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown integrator {name!r}; valid integrators: {', '.join(sorted(INTEGRATORS))}"
        ) from None
