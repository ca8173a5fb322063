"""``DepthSpec``: the typed, validated configuration of a recurrent depth.

Also the ``depth`` group's schema. Each choice is a typed ``Literal`` whose values are also the
tuple of valid names (``UPDATES``, ...); OmegaConf 2.3 has no ``Literal``, so the schema
(``score_exp.config.depth_schema``) declares them ``str`` and ``__post_init__`` checks them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, get_args

from score_exp.core.integrators import get_integrator

Update = Literal["contractive", "residual", "none"]
Connect = Literal["chain", "ancre"]
AncreParam = Literal["softmax", "residual"]
LearnDt = Literal["none", "global", "per_step"]
Inject = Literal["none", "add", "concat"]
InitState = Literal["input", "zeros", "random"]
TrainDt = Literal["fixed", "horizon"]
Solver = Literal["unroll", "fixed_point"]
SolverGrad = Literal["jfb", "implicit"]
Halt = Literal["state", "kl", "ponder"]

UPDATES: tuple[str, ...] = get_args(Update)
CONNECTS: tuple[str, ...] = get_args(Connect)
ANCRE_PARAMS: tuple[str, ...] = get_args(AncreParam)
LEARN_DT: tuple[str, ...] = get_args(LearnDt)
INJECTS: tuple[str, ...] = get_args(Inject)
INIT_STATES: tuple[str, ...] = get_args(InitState)
TRAIN_STEPS = ("fixed", "uniform", "lognormal_poisson")  # a law with arguments: "uniform:2,8"
TRAIN_DT: tuple[str, ...] = get_args(TrainDt)
SOLVERS: tuple[str, ...] = get_args(Solver)
SOLVER_GRADS: tuple[str, ...] = get_args(SolverGrad)
HALTS: tuple[str, ...] = get_args(Halt)
# Bounds of a drawn step count (train_steps): a draw is a torch integer (int64) and a step count
# beyond a million is no depth anyone trains; lognormal_poisson caps its draws at 4 * mean, and
# a sigma beyond 10 gives exp(tau) outside float range.
MAX_TRAIN_STEPS = 1_000_000
MAX_SIGMA = 10.0
# A sane maximum of depth.steps (score-eval's re-discretised steps too), checked before any model
# is built: a run folder's config.yaml is data. The paper's depths are <= 64 steps.
MAX_STEPS = 100_000


@dataclass
class DepthSpec:
    """How a depth of recurrent (or stacked) blocks is applied.

    Args:
        share: one block applied ``steps`` times (True) or ``steps`` independent blocks (False).
        steps: number of updates of ``h`` (the depth); an integer >= 1.
        dt: step size, a positive float; ``None`` means ``1 / steps`` (total depth-time 1).
            Unused when ``update="none"``.
        update: ``contractive`` (SCORE), ``residual`` or ``none``.
        integrator: name of an integrator in :data:`INTEGRATORS`; must be ``euler`` for
            ``update="none"``, which is not an ODE.
        checkpoint: recompute each step in the backward pass (activation checkpointing),
            trading compute for memory that stays flat as ``steps`` grows.
        connect: ``chain`` (step ``j`` updates ``h_j``) or ``ancre`` (step ``j`` updates a learned
            mixture ``sum_i softmax(c_j / tau)_i h_i`` of ``h_0 .. h_j``; starts as the chain).
        ancre_tau: softmax temperature ``tau`` of the ``ancre`` coefficients; > 0.
        ancre_init: weight of ``h_j`` in row ``j`` at initialisation, in (0, 1). The default
            0.9999 starts as the chain to 1e-3, but saturates the softmax (its gradient scales
            with ``p (1 - p)``) so the coefficients barely move; 0.9 or less lets them learn.
        ancre_param: how the ``ancre`` mixture is parameterised: ``softmax`` (above) or
            ``residual``: ``h_j + sum_{i<j} a_ji (h_i - h_j)`` with ``a`` initialised at 0, the
            chain bit for bit at initialisation, with gradients that do not saturate (no
            ``ancre_tau``/``ancre_init``), computed as a running sum (no stacking of states).
        learn_dt: ``none``, ``global`` (one learned dt) or ``per_step`` (one per step); dt is
            ``sigmoid(logit)`` in (0, 1), initialised at the configured step size, which must
            then lie strictly inside (0, 1).
        adaptive_eps: at inference only, a sample (a row of ``h``'s first dim) stops iterating
            once its ``halt`` criterion falls below it (``state``:
            ``||h_{t+1} - h_t|| / ||h_t|| < adaptive_eps``); ``steps`` is the upper bound.
        growth: incremental-in-depth schedule ``[[at, steps], ...]`` starting at ``at = 0`` and
            ending at ``steps``, with step counts that never decrease (``at`` counts epochs, or
            optimiser steps for iteration-based trainers, in the ``DepthGrowth`` callback).
            Shared depths change their step count; stacked ones double their blocks at each stage.
        keep_horizon: when ``growth`` changes the step count, keep ``T = steps * dt`` (dt
            becomes ``T / n``) rather than ``dt``.
        inject: ``none``, ``add`` (every step sees the initial state: ``F(h + h_0)``) or
            ``concat`` (``F(W [h, h_0])``, ``W`` a learned ``(C, 2C)`` projection initialised
            at ``[I, I]``, i.e. as ``add``).
        init_state: where the iteration starts: ``input`` (``h_0``, the encoder output),
            ``zeros`` or ``random`` (``N(0, init_std^2)``, Huginn's); the last two need
            ``inject`` to carry the input.
        init_std: standard deviation of the ``random`` initial state; > 0.
        train_steps: steps per optimiser step in training: ``fixed`` (``steps``),
            ``uniform:a,b`` (uniform on ``a..b``) or ``lognormal_poisson:mean,sigma`` (Huginn's:
            ``1 + Poisson(exp(tau))``, ``tau ~ N(log(mean) - sigma^2 / 2, sigma)``, capped at
            ``4 * mean``); drawn by :meth:`RecurrentDepth.draw_steps` from the seed and the
            optimiser step only (the same on every data-parallel rank). Evaluation runs ``steps``.
        train_dt: how dt follows a drawn step count: ``fixed`` (dt stays) or ``horizon``
            (``dt = steps * dt / n``, the horizon stays).
        backprop_steps: None (all) or ``k``: only the last ``k`` steps build a graph; the
            earlier ones run under ``torch.no_grad`` (memory flat in the step count).
        solver: ``unroll`` (the steps) or ``fixed_point``: solve ``h = F(h)`` (contractive
            update, shared block, with ``inject``) by Anderson acceleration to ``solver_tol``
            within ``solver_max_iter`` iterations without a graph, then one differentiable
            ``F`` step at the fixed point.
        solver_grad: the fixed point's gradient: ``jfb`` (Jacobian-free, arXiv 2103.12803: the
            gradient of that one step) or ``implicit`` (DEQ's, arXiv 1909.01377: the backward
            pass solves ``g = J^T g + dL/dh*`` with the same solver, ``J = dF/dh`` at ``h*``).
        solver_tol: relative residual ``||F(h) - h|| / ||F(h)||`` at which the solver stops.
        solver_max_iter: the solver's iteration budget; >= 2.
        halt: the halting criterion of ``adaptive_eps``: ``state`` (relative state change),
            ``kl`` (Huginn's: KL between successive readout distributions; the model passes
            ``readout=`` to the depth, e.g. a language model's next-token logits) or ``ponder``
            (PonderNet, arXiv 2107.05407: a learned halting head gives ``lambda_n`` per sample
            and step; training minimises the expected task loss under the halting distribution
            ``p_n = lambda_n prod_{k<n} (1 - lambda_k)`` plus ``ponder_beta * KL(p ||
            Geometric(ponder_lambda_p))``; at inference a sample stops once its cumulative
            halting probability passes ``1 - adaptive_eps``).
        ponder_lambda_p: the geometric prior's halting probability per step, in (0, 1): a prior
            mean of ``1 / ponder_lambda_p`` steps (truncated at ``steps``, the last step taking
            the remaining mass).
        ponder_beta: weight of the KL term; >= 0.
    """

    share: bool = True
    steps: int = 4
    dt: Optional[float] = 0.5  # noqa: UP045 (OmegaConf reads typing.Optional)
    update: Update = "contractive"
    integrator: str = "euler"
    checkpoint: bool = False
    connect: Connect = "chain"
    ancre_tau: float = 1.0
    ancre_init: float = 0.9999
    ancre_param: AncreParam = "softmax"
    learn_dt: LearnDt = "none"
    adaptive_eps: Optional[float] = None  # noqa: UP045
    growth: Optional[list] = None  # noqa: UP045
    keep_horizon: bool = True
    inject: Inject = "none"
    init_state: InitState = "input"
    init_std: float = 1.0
    train_steps: str = "fixed"
    train_dt: TrainDt = "fixed"
    backprop_steps: Optional[int] = None  # noqa: UP045
    solver: Solver = "unroll"
    solver_tol: float = 1e-4
    solver_max_iter: int = 30
    solver_grad: SolverGrad = "jfb"
    halt: Halt = "state"
    ponder_lambda_p: float = 0.2
    ponder_beta: float = 0.01

    def __post_init__(self) -> None:
        if self.update not in UPDATES:
            raise ValueError(f"unknown update {self.update!r}; valid updates: {', '.join(UPDATES)}")
        get_integrator(self.integrator)  # raises with the list of valid names
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            if isinstance(self.steps, float) and self.steps.is_integer():
                self.steps = int(self.steps)
            else:
                raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.steps > MAX_STEPS:
            raise ValueError(f"steps must be <= {MAX_STEPS:,} (a sane maximum), got {self.steps:,}")
        if self.dt is not None:
            if isinstance(self.dt, bool) or not isinstance(self.dt, (int, float)):
                raise ValueError(f"dt must be a positive number or null, got {self.dt!r}")
            self.dt = float(self.dt)
            if not math.isfinite(self.dt) or self.dt <= 0:
                raise ValueError(f"dt must be > 0 (or null for 1/steps), got {self.dt}")
        if self.update == "none" and self.integrator != "euler":
            raise ValueError(
                f"update='none' is plain stacking, not an ODE: integrator must be 'euler', "
                f"got {self.integrator!r}"
            )
        if self.update == "contractive" and self.dt is not None and self.dt > 1:
            warnings.warn(
                f"dt={self.dt} > 1 with update='contractive': (1 - dt) * h + dt * F(h) is no "
                "longer a convex combination and the update may not contract",
                stacklevel=2,
            )
        self._validate_beyond()

    def _validate_beyond(self) -> None:
        if self.connect not in CONNECTS:
            raise ValueError(
                f"unknown connect {self.connect!r}; valid connects: {', '.join(CONNECTS)}"
            )
        if not _is_number(self.ancre_tau) or not self.ancre_tau > 0:
            raise ValueError(f"ancre_tau must be > 0, got {self.ancre_tau!r}")
        self.ancre_tau = float(self.ancre_tau)
        if not _is_number(self.ancre_init) or not 0 < self.ancre_init < 1:
            raise ValueError(f"ancre_init must lie in (0, 1), got {self.ancre_init!r}")
        self.ancre_init = float(self.ancre_init)
        if self.ancre_param not in ANCRE_PARAMS:
            raise ValueError(
                f"unknown ancre_param {self.ancre_param!r}; valid ancre_param: "
                f"{', '.join(ANCRE_PARAMS)}"
            )
        if self.learn_dt not in LEARN_DT:
            raise ValueError(
                f"unknown learn_dt {self.learn_dt!r}; valid learn_dt: {', '.join(LEARN_DT)}"
            )
        if self.learn_dt != "none":
            if self.update == "none":
                raise ValueError("learn_dt needs a step size: update='none' has none")
            if not 0 < configured_dt(self) < 1:
                raise ValueError(
                    f"learn_dt keeps dt in (0, 1) with a sigmoid: the initial dt must lie "
                    f"strictly inside (0, 1), got {configured_dt(self)}"
                )
        if self.adaptive_eps is not None and (
            not _is_number(self.adaptive_eps) or not self.adaptive_eps > 0
        ):
            raise ValueError(f"adaptive_eps must be > 0 or null, got {self.adaptive_eps!r}")
        if self.growth is not None:
            self._validate_growth()
        self._validate_dial()

    def _validate_dial(self) -> None:
        for name, valid in (
            ("inject", INJECTS),
            ("init_state", INIT_STATES),
            ("train_dt", TRAIN_DT),
            ("solver", SOLVERS),
            ("solver_grad", SOLVER_GRADS),
            ("halt", HALTS),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"unknown {name} {getattr(self, name)!r}; valid {name}: {', '.join(valid)}"
                )
        if self.init_state != "input" and self.inject == "none":
            raise ValueError(
                f"init_state={self.init_state!r} starts without the input: it needs inject=add "
                "or inject=concat to carry it"
            )
        if not _is_number(self.init_std) or not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {self.init_std!r}")
        self.init_std = float(self.init_std)
        self.train_steps_law()  # raises on a malformed law
        per_step = self.connect != "chain" or self.learn_dt != "none" or self.growth is not None
        if self.train_steps != "fixed" and (not self.share or per_step):
            raise ValueError(
                "train_steps draws the step count: it needs a shared depth (share=true) "
                "without connect=ancre, learn_dt or growth"
            )
        k = self.backprop_steps
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"backprop_steps must be an integer >= 1 or null, got {k!r}")
        if self.solver == "fixed_point":
            if self.update != "contractive" or not self.share or self.inject == "none":
                raise ValueError(
                    "solver=fixed_point solves h = F(h): it needs update=contractive, "
                    "share=true and inject=add or concat (without injection the fixed point "
                    "forgets the input)"
                )
            if per_step or self.train_steps != "fixed" or self.backprop_steps is not None:
                raise ValueError(
                    "solver=fixed_point runs no steps: it cannot be combined with connect, "
                    "learn_dt, growth, train_steps or backprop_steps"
                )
        if self.solver_grad == "implicit" and self.solver != "fixed_point":
            raise ValueError(
                "solver_grad=implicit is the fixed point's gradient: it needs solver=fixed_point"
            )
        self._validate_ponder()
        if not _is_number(self.solver_tol) or not self.solver_tol > 0:
            raise ValueError(f"solver_tol must be > 0, got {self.solver_tol!r}")
        self.solver_tol = float(self.solver_tol)
        it = self.solver_max_iter
        if isinstance(it, bool) or not isinstance(it, int) or it < 2:
            raise ValueError(f"solver_max_iter must be an integer >= 2, got {it!r}")

    def _validate_ponder(self) -> None:
        lp, beta = self.ponder_lambda_p, self.ponder_beta
        if not _is_number(lp) or not 0 < lp < 1:
            raise ValueError(f"ponder_lambda_p must lie in (0, 1), got {lp!r}")
        if not _is_number(beta) or beta < 0:
            raise ValueError(f"ponder_beta must be >= 0, got {beta!r}")
        self.ponder_lambda_p, self.ponder_beta = float(lp), float(beta)
        if self.halt == "ponder" and self.solver != "unroll":
            raise ValueError("halt=ponder learns when to stop the steps: it needs solver=unroll")
        if self.halt == "ponder" and self.adaptive_eps is not None and not self.adaptive_eps < 1:
            raise ValueError(
                "halt=ponder stops a sample once its cumulative halting probability passes "
                f"1 - adaptive_eps: adaptive_eps must lie in (0, 1), got {self.adaptive_eps!r}"
            )

    def train_steps_law(self) -> tuple[str, tuple[float, ...]]:
        """``train_steps`` parsed: ``("fixed", ())``, ``("uniform", (a, b))`` or
        ``("lognormal_poisson", (mean, sigma))``."""
        name, _, args = str(self.train_steps).partition(":")
        if name not in TRAIN_STEPS or (name == "fixed") != (args == ""):
            raise ValueError(
                f"train_steps must be fixed, uniform:a,b or lognormal_poisson:mean,sigma, "
                f"got {self.train_steps!r}"
            )
        if name == "fixed":
            return name, ()
        try:
            values = tuple(float(v) for v in args.split(","))
        except ValueError:
            values = ()
        if len(values) != 2 or not all(math.isfinite(v) for v in values):
            raise ValueError(f"train_steps {name} takes two numbers, finite, got {self.train_steps!r}")  # fmt: skip
        a, b = values
        if name == "uniform" and not (
            a.is_integer() and b.is_integer() and 1 <= a <= b <= MAX_TRAIN_STEPS
        ):
            raise ValueError(
                f"train_steps uniform:a,b needs integers 1 <= a <= b <= {MAX_TRAIN_STEPS}, "
                f"got {a:g}, {b:g}"
            )
        if name == "lognormal_poisson" and not (
            0 < a <= MAX_TRAIN_STEPS / 4 and 0 <= b <= MAX_SIGMA
        ):
            raise ValueError(
                f"train_steps lognormal_poisson:mean,sigma needs mean > 0, sigma >= 0 (mean <= "
                f"{MAX_TRAIN_STEPS // 4}, sigma <= {MAX_SIGMA:g}), got {a:g}, {b:g}"
            )
        return name, values

    def _validate_growth(self) -> None:
        g = self.growth
        if not isinstance(g, (list, tuple)) or not g:
            raise ValueError(f"growth must be a non-empty list of [at, steps] pairs, got {g!r}")
        pairs = []
        for item in g:
            if (
                not isinstance(item, (list, tuple))
                or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            ):
                raise ValueError(f"growth entries must be [at, steps] integer pairs, got {item!r}")
            pairs.append([int(item[0]), int(item[1])])
        ats = [a for a, _ in pairs]
        if ats[0] != 0 or any(b <= a for a, b in zip(ats, ats[1:], strict=False)):
            raise ValueError(f"growth 'at' values must start at 0 and increase, got {ats}")
        counts = [n for _, n in pairs]
        if min(counts) < 1:
            raise ValueError(f"growth steps must be >= 1, got {counts}")
        if any(b < a for a, b in zip(counts, counts[1:], strict=False)):
            raise ValueError(f"growth only grows the depth: its step counts must not decrease, got {counts}")  # fmt: skip
        if counts[-1] != self.steps:
            raise ValueError(f"growth must end at steps={self.steps}, got {counts[-1]}")
        if not self.share and any(b != 2 * a for a, b in zip(counts, counts[1:], strict=False)):
            raise ValueError(
                f"a stacked depth grows by duplicating every block: each growth stage must "
                f"double the steps, got {counts}"
            )
        if self.connect != "chain" or self.learn_dt != "none":
            raise ValueError(
                "growth changes the number of steps: it cannot be combined with "
                "connect='ancre' or learn_dt (their parameters are per step)"
            )
        if self.update == "contractive" and self.keep_horizon and self.horizon / counts[0] > 1:
            worst = self.horizon / counts[0]
            warnings.warn(
                f"growth keeps the horizon {self.horizon:g}: the first "
                f"stage ({counts[0]} steps) runs the contractive update with dt={worst:g} > 1",
                stacklevel=3,
            )
        self.growth = pairs

    def steps_at(self, at: int) -> int:
        """The number of steps the growth schedule prescribes at ``at`` (``steps`` without one)."""
        if self.growth is None:
            return self.steps
        n = self.growth[0][1]
        for start, count in self.growth:
            if at >= start:
                n = count
        return n

    @property
    def horizon(self) -> float:
        """The depth-time ``T = steps * dt`` of the configured spec (``dt = 1 / steps`` if None)."""
        return self.steps * configured_dt(self)

    @property
    def evals_per_step(self) -> int:
        return 1 if self.update == "none" else get_integrator(self.integrator).evals_per_step

    @property
    def nfe(self) -> int:
        """Evaluations of ``F`` per forward pass."""
        return self.steps * self.evals_per_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def configured_dt(spec: DepthSpec) -> float:
    """The spec's ``dt``, or ``1 / steps`` when it is None (before any learning or growth)."""
    return spec.dt if spec.dt is not None else 1.0 / spec.steps
