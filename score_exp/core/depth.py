"""Recurrent depth: one block ``F`` (or a stack of them) applied as steps of an ODE solver.

A block maps a state ``h`` to a *proposal for the next state*. The update rule turns that
proposal into a vector field and an integrator steps it:

===============  ======================  ============================================
``update``       ODE                     one Euler step
===============  ======================  ============================================
``contractive``  ``dh/dt = F(h) - h``    ``h <- (1 - dt) * h + dt * F(h)``  (SCORE)
``residual``     ``dh/dt = F(h)``        ``h <- h + dt * F(h)``  (ResNet when dt = 1)
``none``         (no ODE)                ``h <- F(h)``  (plain stacking)
===============  ======================  ============================================

``share=True`` applies ONE block ``steps`` times; ``share=False`` applies ``steps``
independent blocks in turn. Nothing else differs between the two.

The loop (:meth:`RecurrentDepth.forward`) is the paper's: for each of ``steps`` steps, one
integrator step of the update's vector field with that step's ``dt``. Everything optional is
a small part in a file of its own, off by default (the plain chain, bit for bit); the parts are
listed in ``score_exp/core/__init__.py``.

A part with a training objective hands it to the task through one channel: after a training
forward, :meth:`RecurrentDepth.loss_terms` returns a :class:`~ponder.DepthLoss` (per-step weights
of the task loss and an auxiliary loss) or None, and :meth:`RecurrentDepth.replaying` makes the
model's forward return step ``n``'s state, so the task computes its loss at each step without
knowing the model (``score_exp/tasks/depth_loss.py``, used by every LightningModule).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from score_exp.core import growth, inject, mixing, solver, step_count, step_size
from score_exp.core.discretisation import Discretisation, resolve, trained
from score_exp.core.halting import Select, integrate_halting
from score_exp.core.integrators import INTEGRATORS
from score_exp.core.observers import Observer, Trace
from score_exp.core.ponder import DepthLoss, PonderRecorder, halting_head
from score_exp.core.spec import CONNECTS, LEARN_DT, UPDATES, DepthSpec

__all__ = ["CONNECTS", "LEARN_DT", "UPDATES", "DepthSpec", "Discretisation", "RecurrentDepth"]


class RecurrentDepth(nn.Module):
    """Applies blocks made by ``block_factory`` as ``spec.steps`` updates of a state.

    Args:
        block_factory: a callable returning a fresh ``nn.Module`` ``F`` with
            ``F(h, **ctx) -> Tensor`` of the same shape as ``h``. Called once when
            ``spec.share`` else once per (initial) step.
        spec: the depth specification.
        width: the state's last dimension; needed by ``inject="concat"`` (its ``(C, 2C)``
            projection) and ``halt="ponder"`` (the halting head).

    Attributes:
        last_steps_used: after a forward that stopped adaptively (``spec.adaptive_eps``), the
            number of steps each sample (row of ``h``, or ``group`` of rows) took, a long
            tensor; None after any other forward.
        last_nfe: evaluations of ``F`` the last forward spent per sample (the mean over
            samples when halting; for ``solver=fixed_point`` the batch's solver evaluations
            (its slowest sample's) + 1, the differentiable step).
        last_iterations, last_residual, last_converged: after a ``solver=fixed_point``
            forward, per sample (a row of ``h``, or a ``group`` of rows): the evaluations of
            ``F`` its solve used (long), its final relative residual ``||F(h) - h|| / ||F(h)||``
            and whether that is below ``solver_tol`` (bool); None after any other forward.

    Example:
        >>> spec = DepthSpec(share=True, steps=4, dt=0.25)
        >>> depth = RecurrentDepth(lambda: nn.Linear(8, 8), spec)
        >>> depth(torch.zeros(2, 8)).shape
        torch.Size([2, 8])
        >>> with depth.discretised(steps=8, integrator="rk4") as d:  # same horizon T = 1
        ...     d.nfe, depth(torch.zeros(2, 8)).shape
        (32, torch.Size([2, 8]))
    """

    def __init__(
        self, block_factory: Callable[[], nn.Module], spec: DepthSpec, width: int | None = None
    ):
        super().__init__()
        self.spec = spec
        # growth starts at its first stage; without growth this is spec.steps.
        self._steps = spec.steps_at(0)
        self.keep_horizon = spec.keep_horizon
        n_blocks = 1 if spec.share else self._steps
        self.blocks = nn.ModuleList(block_factory() for _ in range(n_blocks))
        if spec.growth is not None:
            # Persisted so that a checkpoint taken at any stage reloads at that stage.
            self.register_buffer("active_steps", torch.tensor(self._steps))
        mixing.add_parameters(self, spec)  # connect=ancre: connect_logits (or connect_residual)
        if spec.learn_dt != "none":
            self.dt_logit = nn.Parameter(step_size.init_dt_logit(spec))
        self.injection = inject.Injection(spec.inject, width)  # F as every step sees it
        self.halting_head = halting_head(spec, width)  # learned halting's lambda_n, or identity
        self._ponder: PonderRecorder | None = None  # the last training forward's record
        self._replay: Tensor | None = None
        self._override: Discretisation | None = None
        self._drawn_steps: int | None = None
        self.last_steps_used: Tensor | None = None
        self.last_nfe: float | None = None
        self.last_iterations: Tensor | None = None
        self.last_residual: Tensor | None = None
        self.last_converged: Tensor | None = None

    # ------------------------------------------------------------------ the loop

    def forward(
        self,
        h: Tensor,
        *,
        group: Tensor | None = None,
        select: Select | None = None,
        readout: Callable[[Tensor], Tensor] | None = None,
        **ctx: Any,
    ) -> Tensor:
        """Run the depth on ``h``.

        Args:
            h: the input ``e`` (the encoder output), ``(rows, ...)``; the iteration starts at
                ``init_state`` (``e`` itself by default).
            group: for halting and the fixed-point solver, the sample of each row (PyG's
                ``batch``: a molecule stops, or is solved, as a whole); None: each row is a
                sample.
            select: for halting with a block context: ``select(rows_kept, ctx) -> ctx`` cuts
                the context down to the rows still running (e.g. a subgraph).
            readout: for ``halt="kl"``: maps a state to logits (e.g. next-token logits).
            **ctx: passed to every block call, e.g. ``edge_index`` for a graph convolution.
        """
        if self._replay is not None:  # replaying(n): the recorded state of step n
            return self._replay
        d = self.discretisation
        e = h  # the input, which inject= shows to every step
        h = inject.initial_state(self.spec, e)
        self._ponder = None
        if self.spec.solver == "fixed_point":
            return self._solve(h, e, ctx, group)
        self.last_steps_used, self.last_nfe = None, d.nfe
        self.last_iterations = self.last_residual = self.last_converged = None
        training = torch.is_grad_enabled() and self.training
        if training and d.halt == "ponder":  # every step runs; its state and lambda are kept
            n = int(group.max()) + 1 if group is not None and group.numel() else h.shape[0]
            self._ponder = PonderRecorder(self.halting_head, group, n)
            return self._integrate(h, e, d, ctx, self._ponder)
        if d.adaptive_eps is None or training:
            return self._integrate(h, e, d, ctx, None)
        h, used, spent = integrate_halting(self, h, e, d, ctx, group, select, readout)
        self.last_steps_used, self.last_nfe = used, spent / len(used)
        return h

    # ------------------------------------------------------------------ the loss channel

    def loss_terms(self) -> DepthLoss | None:
        """What the parts add to the task's loss after the last training forward, or None.

        ``halt="ponder"``: the halting distribution as per-step weights of the task loss and
        ``ponder_beta * KL(p || Geometric(ponder_lambda_p))`` (see ``ponder.py``). The task
        computes its per-sample loss at step ``n`` inside :meth:`replaying`.
        """
        if self._ponder is None:
            return None
        return self._ponder.loss(self.spec.ponder_lambda_p, self.spec.ponder_beta)

    @contextlib.contextmanager
    def replaying(self, n: int) -> Iterator[None]:
        """Inside the ``with`` block, a forward returns the last training forward's state after
        step ``n`` (0-based, of :meth:`loss_terms`' steps) without running any step, so that a
        model's layers after the depth give that step's prediction."""
        if self._ponder is None:
            raise RuntimeError("replaying(n) needs a training forward that kept its states")
        self._replay = self._ponder.states[n]
        try:
            yield
        finally:
            self._replay = None

    def _integrate(
        self,
        h: Tensor,
        e: Tensor,
        d: Discretisation,
        ctx: dict[str, Any],
        observer: Observer | None,
    ) -> Tensor:
        """``d.steps`` integrator steps of the update's vector field: the paper's depth."""
        dts = self.dts()
        mix = self.input_mixing(h)
        k = self.spec.backprop_steps
        first_grad = d.steps - k if k is not None and torch.is_grad_enabled() else 0
        for l in range(d.steps):
            # backprop_steps: the steps before the last k build no graph.
            with torch.set_grad_enabled(torch.is_grad_enabled() and l >= first_grad):
                x = mix.input(l, h)  # the state step l updates (h itself for the chain)
                h_next = self.step(l, x, e, dts[l], d.integrator, ctx)
            if observer is not None:
                h_next = observer.step(h, h_next)
            h = h_next
            mix.push(h)
        return h

    def step(
        self, l: int, x: Tensor, e: Tensor, dt: Any, integrator: str, ctx: dict[str, Any]
    ) -> Tensor:
        """One step of block ``l`` (the shared block for every ``l``), checkpointed if asked."""
        block = self._block(l, e)
        if self.spec.checkpoint and torch.is_grad_enabled():
            return activation_checkpoint(
                self._update, block, x, dt, integrator, use_reentrant=False, **ctx
            )
        return self._update(block, x, dt, integrator, **ctx)

    def _block(self, l: int, e: Tensor) -> Callable[..., Tensor]:
        """``F`` of step ``l`` as the update sees it (with the input injected, if asked)."""
        return self.injection(self.blocks[0 if self.spec.share else l], e)

    def _solve(self, h: Tensor, e: Tensor, ctx: dict[str, Any], group: Tensor | None) -> Tensor:
        """``solver=fixed_point``: Anderson to ``h* = F(h*)`` per sample, then one
        differentiable ``F``."""
        F = self._block(0, e)
        out, sol = solver.fixed_point(lambda x: F(x, **ctx), h, self.spec, group)
        self.last_nfe = sol.evals + 1
        self.last_steps_used = None
        self.last_iterations, self.last_residual = sol.iterations, sol.residual
        self.last_converged = sol.converged
        return out

    def _update(
        self, block: Callable[..., Tensor], h: Tensor, dt: Any, integrator: str, **ctx: Any
    ) -> Tensor:
        """The update rule: ``F(h)`` itself, or an integrator step of ``F(h) - h`` or ``F(h)``."""
        update = self.spec.update
        if update == "none":
            return block(h, **ctx)
        if update == "contractive":

            def field(x: Tensor) -> Tensor:
                return block(x, **ctx) - x

        else:

            def field(x: Tensor) -> Tensor:
                return block(x, **ctx)

        return INTEGRATORS[integrator].step(field, h, dt)

    # ------------------------------------------------------------------ discretisation

    @property
    def discretisation(self) -> Discretisation:
        """What a forward runs now: the trained discretisation, or :meth:`discretised`'s."""
        if self._override is not None:
            return self._override
        drawn = self._drawn_steps if self.training else None  # train_steps: a drawn count
        return trained(self.spec, self._steps, self.keep_horizon, drawn)

    def discretised(
        self,
        steps: int | None = None,
        dt: float | None = None,
        integrator: str | None = None,
        keep_horizon: bool = True,
        adaptive_eps: float | None = None,
        halt: str | None = None,
    ) -> contextlib.AbstractContextManager[Discretisation]:
        """Run a trained depth with another discretisation inside the ``with`` block.

        Every forward (whoever calls it: a model, a LightningModule) uses it while active, so
        models need no argument of their own. A request that breaks a rule of
        :func:`~discretisation.resolve` raises ``ValueError`` before any work.

        Args:
            steps: the number of steps (None: the trained count).
            dt: one step size for every step (None: resolved, below).
            integrator: an integrator name (None: the trained one).
            keep_horizon: with ``dt`` None and another step count, keep the trained horizon
                ``T = steps * dt`` (``dt = T / steps``); False keeps the spec's ``dt``
                (``1 / steps`` when it is None). A learned dt always keeps the learned horizon
                (and is the learned dt at the trained step count).
            adaptive_eps: halt samples whose criterion falls below it (None: the spec's).
            halt: the criterion, ``state``, ``kl`` or (a depth trained with it) ``ponder``
                (None: the spec's).

        Returns:
            a context manager whose ``as`` target is the resolved :class:`Discretisation`
            (``steps``, ``dts``, ``integrator``, ``nfe``). The request is checked here, before
            the ``with`` block starts.
        """
        return self._activated(
            resolve(self, steps, dt, integrator, keep_horizon, adaptive_eps, halt)
        )

    @contextlib.contextmanager
    def _activated(self, d: Discretisation) -> Iterator[Discretisation]:
        previous, self._override = self._override, d
        try:
            d.dts = [v.detach() if torch.is_tensor(v) else v for v in self.dts()]
            yield d
        finally:
            self._override = previous

    def dts(self) -> list[Any]:
        """The step size of each step a forward now takes (floats; 0-dim tensors when learned)."""
        return step_size.dts(self, self.discretisation)

    def draw_steps(self, index: int, seed: int = 0) -> int:
        """``train_steps``: draw the step count of optimiser step ``index`` (a pure function of
        ``(seed, index)``, so every data-parallel rank draws the same); training forwards run it
        until the next draw, evaluation runs ``steps``. Returns the count."""
        self._drawn_steps = step_count.draw_steps(self.spec, seed, index)
        return self._drawn_steps

    def end_drawn_steps(self) -> None:
        """``train_steps``: forget the last draw, so ``nfe`` and training-mode forwards after
        training (the run record, a resumed evaluation) use ``steps`` again."""
        self._drawn_steps = None

    @property
    def inject_weight(self) -> Tensor:
        """``inject="concat"``'s ``(C, 2C)`` projection (the :class:`~inject.Injection` part's)."""
        return self.injection.weight

    @property
    def steps(self) -> int:
        """The trained (active) number of steps; growth changes it, :meth:`discretised` not."""
        return self._steps

    @property
    def nfe(self) -> int:
        """Evaluations of ``F`` per forward pass under the current discretisation (an upper
        bound when ``adaptive_eps`` stops early; the ANCRe mixtures are not evaluations of F)."""
        return self.discretisation.nfe

    # ------------------------------------------------------------------ optional parts

    def input_mixing(self, h0: Tensor) -> mixing.Chain:
        """The input mixing of one forward that starts at ``h0`` (the chain, or ANCRe's)."""
        return mixing.for_forward(self, h0)

    def connection_weights(self) -> Tensor:
        """Input mixture weights, ``(steps, steps + 1)``: row ``j`` weighs ``h_0 .. h_steps``.

        Rows sum to 1 and are zero above the diagonal (the last column, the output state, is
        never an input). The chain is the identity on the first ``steps`` columns.
        """
        return mixing.connection_weights(self)

    @torch.no_grad()
    def trace(
        self, h: Tensor, *, group: Any = None, select: Any = None, readout: Any = None, **ctx: Any
    ) -> dict[str, Tensor]:
        """Per-step diagnostics of one full-depth forward (no early stopping, no gradients).

        Returns:
            ``rel_change``: ``(steps,)``, the batch mean of ``||h_{t+1} - h_t|| / ||h_t||``;
            ``contraction``: ``(steps,)``, the batch mean of
            ``||h_{t+1} - h_t|| / ||h_t - h_{t-1}||`` (NaN at ``t = 0``, which has no previous
            step); norms over all non-batch dims. ``group``, ``select`` and ``readout`` (the
            halting arguments of :meth:`forward`) are accepted and unused.
        """
        trace = Trace()
        self._integrate(inject.initial_state(self.spec, h), h, self.discretisation, ctx, trace)
        return trace.summary()

    def set_steps(self, n: int, keep_horizon: bool | None = None) -> None:
        """Change the active number of steps of a shared depth (growth).

        Args:
            n: the new number of steps, >= 1.
            keep_horizon: keep ``T = spec.steps * dt`` (dt becomes ``T / n``); None keeps the
                current choice (``spec.keep_horizon`` at first).
        """
        growth.set_steps(self, n, keep_horizon)

    def refine(self) -> None:
        """Double a stacked depth (growth): block ``l`` becomes blocks ``2l`` and ``2l + 1``."""
        growth.refine(self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A stacked growth checkpoint may hold more (or fewer) blocks than this module has
        # now: resize the block list before the children load their tensors.
        growth.resize_to_state_dict(self, state_dict, prefix)
        if prefix + "inject_weight" in state_dict:  # checkpoints before the Injection part
            state_dict[prefix + "injection.weight"] = state_dict.pop(prefix + "inject_weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "active_steps"
        if key in state_dict:
            self._steps = int(state_dict[key])

    def reset_parameters(self) -> None:
        for block in self.blocks:
            for module in block.modules():
                if module is not block and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if hasattr(block, "reset_parameters"):
                block.reset_parameters()

    def extra_repr(self) -> str:
        s = self.spec
        text = (
            f"share={s.share}, steps={self._steps}, dt={s.dt}, update={s.update!r}, "
            f"integrator={s.integrator!r}, nfe={self.nfe}"
        )
        shown = {"share", "steps", "dt", "update", "integrator"}
        for f in dataclasses.fields(s):  # every other field that is switched on
            value = getattr(s, f.name)
            if f.name not in shown and value != f.default:
                text += f", {f.name}={value!r}"
        return text
