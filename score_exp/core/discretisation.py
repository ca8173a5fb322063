"""Re-discretisation at evaluation: the rules of :meth:`RecurrentDepth.discretised`, in one place.

A trained depth is an ODE solver run with ``steps`` steps of size ``dt`` by one integrator;
evaluated with other steps, dt or integrator (ContinuousNet-style), it solves the same ODE
differently. :func:`resolve` checks a request against what the depth can do and turns it into a
:class:`Discretisation`, which every forward then runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from score_exp.core import step_size
from score_exp.core.integrators import get_integrator
from score_exp.core.spec import HALTS, DepthSpec

if TYPE_CHECKING:
    from score_exp.core.depth import RecurrentDepth


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
        dts: the step size of each step, filled in by :meth:`RecurrentDepth.discretised`.
    """

    steps: int
    dt: float | None
    integrator: str
    adaptive_eps: float | None
    evals_per_step: int
    halt: str = "state"
    dts: list[Any] = field(default_factory=list)

    @property
    def nfe(self) -> int:
        """Evaluations of ``F`` per forward (an upper bound when halting)."""
        return self.steps * self.evals_per_step


def trained(spec: DepthSpec, steps: int, keep_horizon: bool, drawn: int | None) -> Discretisation:
    """The discretisation a depth trained as ``spec`` runs at ``steps`` (its active count), or at
    ``drawn`` steps (``train_steps``' count of this optimiser step) in training."""
    if drawn is not None:
        dt = (
            spec.horizon / drawn
            if spec.train_dt == "horizon"
            else step_size.fixed_dt(spec, drawn, False)
        )
        return Discretisation(
            drawn, dt, spec.integrator, spec.adaptive_eps, spec.evals_per_step, spec.halt
        )
    learned = spec.learn_dt != "none"
    return Discretisation(
        steps=steps,
        dt=None if learned else step_size.fixed_dt(spec, steps, keep_horizon),
        integrator=spec.integrator,
        adaptive_eps=spec.adaptive_eps,
        evals_per_step=spec.evals_per_step,
        halt=spec.halt,
    )


def resolve(
    depth: RecurrentDepth,
    steps: int | None,
    dt: float | None,
    integrator: str | None,
    keep_horizon: bool,
    adaptive_eps: float | None,
    halt: str | None = None,
) -> Discretisation:
    """Check a re-discretisation request against ``depth`` and resolve its step size.

    Rules: ``steps >= 1``; only a shared depth changes its step count (a stacked one runs its
    blocks); ``connect='ancre'`` fixes the step count; ``dt > 0``; ``update='none'`` is Euler
    only; ``adaptive_eps > 0``.

    Raises:
        ValueError: with a message saying which rule the request breaks.
    """
    spec = depth.spec
    n = depth.steps if steps is None else steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be an integer >= 1, got {n!r}")
    if n != depth.steps and not spec.share:
        raise ValueError(
            f"a stacked depth runs its {len(depth.blocks)} independent blocks; it cannot run "
            f"{n} steps (re-discretising the step count needs share=true)"
        )
    if n != depth.steps and spec.connect == "ancre":
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
        dt = None  # the learned dt (its horizon kept at another step count): see depth.dts()
    else:
        trained = step_size.fixed_dt(spec, depth.steps, depth.keep_horizon)
        if n == depth.steps:
            dt = trained
        elif keep_horizon and spec.update != "none":
            dt = float(depth.steps * trained / n)  # the trained horizon T = steps * dt
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
    return Discretisation(n, dt, method.name, adaptive_eps, evals, halt)
