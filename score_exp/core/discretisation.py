"""Re-discretisation at evaluation: the rules of :meth:`RecurrentDepth.discretised`, in one place.

A trained depth is an ODE solver run with ``steps`` steps of size ``dt`` by one integrator;
evaluated with other steps, dt or integrator (ContinuousNet-style), it solves the same ODE
differently. :func:`resolve` checks a request against what the depth can do and turns it into a
:class:`Discretisation`, which every forward then runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from score_exp.core.integrators import get_integrator
from score_exp.core.spec import HALTS, DepthSpec
from score_exp.core.step_size import fixed_dt


@dataclass
class Discretisation:
    """What a forward of the depth runs.

    Attributes:
        steps: number of steps.
        dt: one step size for every step, or None for the learned dt (recomputed each forward).
        integrator: integrator name.
        adaptive_eps: halting threshold at inference (None: every sample runs every step).
        halt: the halting criterion, ``state``, ``kl`` or ``ponder``
            (:data:`~score_exp.core.spec.HALTS`).
        evals_per_step: evaluations of ``F`` per step.
        solver: ``unroll`` (steps) or ``fixed_point`` (the spec's).
        dts: the step size of each step, filled in by :meth:`RecurrentDepth.discretised`.
        replay: for :meth:`RecurrentDepth.replaying`: the step whose recorded state a forward
            returns (None: a forward runs).
        runner, train_runner: the runner (``runners.py``) an evaluation forward, and a training
            forward, uses: chosen once here, from the solver, ``halt`` and ``adaptive_eps``.
    """

    steps: int
    dt: float | None
    integrator: str
    adaptive_eps: float | None
    evals_per_step: int
    halt: str = "state"
    solver: str = "unroll"
    dts: list[Any] = field(default_factory=list)
    replay: int | None = None
    runner: str = field(init=False)
    train_runner: str = field(init=False)

    def __post_init__(self) -> None:
        if self.replay is not None:
            self.runner = self.train_runner = "replay"
        elif self.solver == "fixed_point":
            self.runner = self.train_runner = "fixed_point"
        else:
            # Halting saves compute at inference only; a training forward runs every step
            # (PonderNet's recording them, for its loss).
            self.runner = "unroll" if self.adaptive_eps is None else "halting"
            self.train_runner = "record" if self.halt == "ponder" else "unroll"

    @property
    def nfe(self) -> int:
        """Evaluations of ``F`` per forward (an upper bound when halting)."""
        return self.steps * self.evals_per_step


def trained(spec: DepthSpec, steps: int, keep_horizon: bool, drawn: int | None) -> Discretisation:
    """The discretisation a depth trained as ``spec`` runs at ``steps`` (its active count), or at
    ``drawn`` steps (``train_steps``' count of this optimiser step) in training."""
    if drawn is not None:
        dt = spec.horizon / drawn if spec.train_dt == "horizon" else fixed_dt(spec, drawn, False)
        return Discretisation(
            drawn, dt, spec.integrator, spec.adaptive_eps, spec.evals_per_step, spec.halt,
            spec.solver,
        )  # fmt: skip
    learned = spec.learn_dt != "none"
    return Discretisation(
        steps=steps,
        dt=None if learned else fixed_dt(spec, steps, keep_horizon),
        integrator=spec.integrator,
        adaptive_eps=spec.adaptive_eps,
        evals_per_step=spec.evals_per_step,
        halt=spec.halt,
        solver=spec.solver,
    )


def resolve(
    spec: DepthSpec,
    trained_steps: int,
    keep_horizon_trained: bool,
    steps: int | None,
    dt: float | None,
    integrator: str | None,
    keep_horizon: bool,
    adaptive_eps: float | None,
    halt: str | None = None,
) -> Discretisation:
    """Check a re-discretisation request against a depth trained as ``spec``, now at
    ``trained_steps`` (its active count; growth changes it, with ``keep_horizon_trained``),
    and resolve its step size.

    Rules: ``steps >= 1``; only a shared depth changes its step count (a stacked one runs its
    blocks); ``connect='ancre'`` fixes the step count; ``dt > 0``; ``update='none'`` is Euler
    only; ``adaptive_eps > 0``.

    Raises:
        ValueError: with a message saying which rule the request breaks.
    """
    n = trained_steps if steps is None else steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {n!r}")
    if n != trained_steps and not spec.share:
        raise ValueError(
            f"a stacked depth runs its {trained_steps} independent blocks; it cannot run "
            f"{n} steps (re-discretising the step count needs share=true)"
        )
    if n != trained_steps and spec.connect == "ancre":
        raise ValueError(
            f"connect='ancre' learns one mixture per step: it runs exactly {spec.steps} "
            f"steps, not {n}"
        )
    method = get_integrator(integrator or spec.integrator)  # raises with the valid names
    if spec.update == "none" and method.name != "euler":
        raise ValueError(
            f"update='none' is plain stacking, not an ODE: it runs only the 'euler' "
            f"integrator, not {method.name!r}"
        )
    if dt is not None:
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt!r}")
        dt = float(dt)
    elif spec.learn_dt != "none":
        dt = None  # the learned dt (its horizon kept at another step count): StepSize.dts
    else:
        trained = fixed_dt(spec, trained_steps, keep_horizon_trained)
        if n == trained_steps:
            dt = trained
        elif keep_horizon and spec.update != "none":
            dt = float(trained_steps * trained / n)  # the trained horizon T = steps * dt
        else:
            dt = spec.dt if spec.dt is not None else 1.0 / n
    if adaptive_eps is None:
        adaptive_eps = spec.adaptive_eps
    elif (
        isinstance(adaptive_eps, bool)
        or not isinstance(adaptive_eps, (int, float))
        or not (adaptive_eps > 0)
    ):
        raise ValueError(f"adaptive_eps must be > 0, got {adaptive_eps!r}")
    else:
        adaptive_eps = float(adaptive_eps)
    halt = spec.halt if halt is None else halt
    # ponder reads a learned halting head: only a depth trained with halt=ponder has one.
    valid = HALTS if spec.halt == "ponder" else tuple(x for x in HALTS if x != "ponder")
    if halt not in valid:
        raise ValueError(
            f"halt must be one of {', '.join(valid)}, got {halt!r}"
            + (" (ponder needs a depth trained with halt=ponder)" if halt == "ponder" else "")
        )
    if halt == "ponder" and adaptive_eps is not None and not adaptive_eps < 1:
        raise ValueError(
            "halt='ponder' stops once the cumulative halting probability passes "
            f"1 - adaptive_eps: adaptive_eps must lie in (0, 1), got {adaptive_eps}"
        )
    evals = 1 if spec.update == "none" else method.evals_per_step
    return Discretisation(n, dt, method.name, adaptive_eps, evals, halt, spec.solver)
