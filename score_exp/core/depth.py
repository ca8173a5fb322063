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

The loop (``loop.py``) is the paper's: for each of ``steps`` steps, one integrator step of the
update's vector field with that step's ``dt``. Everything optional is a part, a child module
built from the spec and always present (the identity, holding nothing, when off; the plain
chain, bit for bit): ``step_size``, ``mixing``, ``growth``, ``injection``, ``halting``,
``step_count``. Each owns its parameters and buffers; the depth asks them, they never reach
into the depth or each other. How a forward runs (unroll, halting, fixed point, recording,
replay) is a runner (``runners.py``) that the discretisation names; see
``score_exp/core/__init__.py``.

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

from score_exp.core.discretisation import Discretisation, resolve, trained
from score_exp.core.growth import Growth, blocks_in_state_dict, doubled, resized
from score_exp.core.halting import Select
from score_exp.core.inject import Injection
from score_exp.core.loop import Loop, StepContext, integrate, takes_step, update_step
from score_exp.core.migrate import migrate_keys
from score_exp.core.mixing import Mixing
from score_exp.core.observers import Trace
from score_exp.core.ponder import DepthLoss, Halting, PonderRecorder
from score_exp.core.runners import Request, get_runner
from score_exp.core.spec import CONNECTS, LEARN_DT, UPDATES, DepthSpec
from score_exp.core.step_count import StepCount
from score_exp.core.step_size import StepSize

__all__ = ["CONNECTS", "LEARN_DT", "UPDATES", "DepthSpec", "Discretisation", "RecurrentDepth"]


class RecurrentDepth(nn.Module):
    """Applies blocks made by ``block_factory`` as ``spec.steps`` updates of a state.

    Args:
        block_factory: a callable returning a fresh ``nn.Module`` ``F`` with
            ``F(h, **ctx) -> Tensor`` of the same shape as ``h``. Called once when
            ``spec.share`` else once per (initial) step. A block whose forward takes a
            keyword ``step`` is also given a :class:`~loop.StepContext` (step index,
            integrator stage, running rows) at every call (``takes_step``, read from the
            first block's signature).
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
        self.growth = Growth(spec)  # the active step count (active_steps with a schedule)
        n_blocks = 1 if spec.share else self.growth.steps
        self.blocks = nn.ModuleList(block_factory() for _ in range(n_blocks))
        # Read once from the factory's block (a plain bool, so torch.compile guards on it).
        self.takes_step = takes_step(self.blocks[0])
        # Parameter order as before the parts (an optimiser's state is saved by position).
        self.mixing = Mixing(spec)  # the chain, or ANCRe's connections
        self.step_size = StepSize(spec)  # fixed dt, or the learned logit
        self.injection = Injection(spec, width)  # F as every step sees it, and h_0
        self.halting = Halting(spec, width)  # PonderNet's head, or the identity
        self.step_count = StepCount(spec)  # train_steps: the drawn count
        self._active: Discretisation | None = None  # discretised() / replaying()
        self._record: PonderRecorder | None = None  # the last training forward's record
        self.last_steps_used: Tensor | None = None
        self.last_nfe: float | None = None
        self.last_iterations: Tensor | None = None
        self.last_residual: Tensor | None = None
        self.last_converged: Tensor | None = None

    # ------------------------------------------------------------------ the forward

    def forward(
        self,
        h: Tensor,
        *,
        group: Tensor | None = None,
        select: Select | None = None,
        readout: Callable[[Tensor], Tensor] | None = None,
        h0: Tensor | None = None,
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
            h0: the state the iteration starts from, instead of ``init_state``'s (e.g. a
                language model's warm start from the previous token's final state); the
                input ``h`` is still what ``inject`` shows every step.
            **ctx: passed to every block call, e.g. ``edge_index`` for a graph convolution.
        """
        d = self.discretisation
        training = torch.is_grad_enabled() and self.training
        runner = get_runner(d.train_runner if training else d.runner)
        request = Request(
            self.spec, d.halt, d.adaptive_eps, d.evals_per_step, self.halting,
            group, select, readout, self._record, d.replay,
        )  # fmt: skip
        if d.replay is not None:  # no step runs: nothing to prepare
            return runner(None, h, request).h
        if h0 is None:
            h0 = self.injection.initial_state(h)  # the input h is e, which inject= shows each step
        out = runner(self._loop(d, h0, h, ctx), h0, request)
        self._record = out.record
        self.last_nfe, self.last_steps_used = out.nfe, out.steps_used
        self.last_iterations, self.last_residual = out.iterations, out.residual
        self.last_converged = out.converged
        return out.h

    def _loop(self, d: Discretisation, h0: Tensor, e: Tensor, ctx: dict[str, Any]) -> Loop:
        """One forward's loop from ``h0`` with the input ``e``."""
        return Loop(
            step=self.step,
            F=self._call_block,
            steps=d.steps,
            integrator=d.integrator,
            dts=self.dts(),
            mix=self.mixing.start(h0),
            e=e,
            ctx=ctx,
            backprop_steps=self.spec.backprop_steps,
        )

    def step(
        self,
        l: int,
        x: Tensor,
        e: Tensor,
        dt: Any,
        integrator: str,
        ctx: dict[str, Any],
        rows: Tensor | None = None,
    ) -> Tensor:
        """One step of block ``l`` (the shared block for every ``l``) from ``x``, with the input
        ``e`` injected, checkpointed if asked; ``rows``: the running rows (halting)."""
        if self.spec.checkpoint and torch.is_grad_enabled():
            return activation_checkpoint(
                self._update, l, x, e, dt, integrator, rows, use_reentrant=False, **ctx
            )
        return self._update(l, x, e, dt, integrator, rows, **ctx)

    def _update(self, l, x, e, dt, integrator, rows, **ctx) -> Tensor:
        block = self.blocks[0 if self.spec.share else l]
        F = self.injection(block, e)
        context = (lambda stage: StepContext(l, stage, rows)) if self.takes_step else None
        return update_step(F, x, dt, self.spec.update, integrator, ctx, context)

    def _call_block(self, l: int, x: Tensor, e: Tensor, ctx: dict, rows: Tensor | None) -> Tensor:
        """``F`` of step ``l`` at ``x`` as a step sees it (injected), without the update rule."""
        block = self.blocks[0 if self.spec.share else l]
        F = self.injection(block, e)
        if self.takes_step:
            return F(x, step=StepContext(l, 0, rows), **ctx)
        return F(x, **ctx)

    # ------------------------------------------------------------------ the loss channel

    def loss_terms(self) -> DepthLoss | None:
        """What the parts add to the task's loss after the last training forward, or None.

        ``halt="ponder"``: the halting distribution as per-step weights of the task loss and
        ``ponder_beta * KL(p || Geometric(ponder_lambda_p))`` (see ``ponder.py``). The task
        computes its per-sample loss at step ``n`` inside :meth:`replaying`.
        """
        if self._record is None:
            return None
        return self._record.loss(self.spec.ponder_lambda_p, self.spec.ponder_beta)

    def replaying(self, n: int) -> contextlib.AbstractContextManager[Discretisation]:
        """Inside the ``with`` block, a forward returns the last training forward's state after
        step ``n`` (0-based, of :meth:`loss_terms`' steps) without running any step (the
        ``replay`` runner), so that a model's layers after the depth give that step's
        prediction."""
        if self._record is None:
            raise RuntimeError("replaying(n) needs a training forward that kept its states")
        return self._activated(dataclasses.replace(self.discretisation, replay=n))

    # ------------------------------------------------------------------ discretisation

    @property
    def discretisation(self) -> Discretisation:
        """What a forward runs now: the trained discretisation, or :meth:`discretised`'s."""
        if self._active is not None:
            return self._active
        drawn = self.step_count.drawn if self.training else None  # train_steps: a drawn count
        return trained(self.spec, self.growth.steps, self.growth.keep_horizon, drawn)

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
        request = (steps, dt, integrator, keep_horizon, adaptive_eps, halt)
        return self._activated(
            resolve(self.spec, self.growth.steps, self.growth.keep_horizon, *request)
        )

    @contextlib.contextmanager
    def _activated(self, d: Discretisation) -> Iterator[Discretisation]:
        previous, self._active = self._active, d
        try:
            d.dts = [v.detach() if torch.is_tensor(v) else v for v in self.dts()]
            yield d
        finally:
            self._active = previous

    def dts(self) -> list[Any]:
        """The step size of each step a forward now takes (floats; 0-dim tensors when learned)."""
        d = self.discretisation
        return self.step_size.dts(d.steps, d.dt)

    def draw_steps(self, index: int, seed: int = 0) -> int:
        """``train_steps``: draw the step count of optimiser step ``index`` (a pure function of
        ``(seed, index)``, so every data-parallel rank draws the same); training forwards run it
        until the next draw, evaluation runs ``steps``. Returns the count."""
        return self.step_count.draw(index, seed)

    def end_drawn_steps(self) -> None:
        """``train_steps``: forget the last draw, so ``nfe`` and training-mode forwards after
        training (the run record, a resumed evaluation) use ``steps`` again."""
        self.step_count.end()

    @property
    def steps(self) -> int:
        """The trained (active) number of steps; growth changes it, :meth:`discretised` not."""
        return self.growth.steps

    @property
    def nfe(self) -> int:
        """Evaluations of ``F`` per forward pass under the current discretisation (an upper
        bound when ``adaptive_eps`` stops early; the ANCRe mixtures are not evaluations of F)."""
        return self.discretisation.nfe

    # ------------------------------------------------------------------ optional parts

    def connection_weights(self) -> Tensor:
        """Input mixture weights, ``(steps, steps + 1)``: row ``j`` weighs ``h_0 .. h_steps``.

        Rows sum to 1 and are zero above the diagonal (the last column, the output state, is
        never an input). The chain is the identity on the first ``steps`` columns.
        """
        return self.mixing.connection_weights()

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
        h0 = self.injection.initial_state(h)
        integrate(self._loop(self.discretisation, h0, h, ctx), h0, trace)
        return trace.summary()

    def set_steps(self, n: int, keep_horizon: bool | None = None) -> None:
        """Change the active number of steps of a shared depth (growth).

        Args:
            n: the new number of steps, >= 1.
            keep_horizon: keep ``T = spec.steps * dt`` (dt becomes ``T / n``); None keeps the
                current choice (``spec.keep_horizon`` at first).
        """
        if not self.spec.share:
            raise ValueError("set_steps is for shared depths; a stacked depth grows by refine()")
        self.growth.set(n, keep_horizon)

    def refine(self) -> None:
        """Double a stacked depth (growth): block ``l`` becomes blocks ``2l`` and ``2l + 1``
        (:func:`~growth.doubled`)."""
        if self.spec.share:
            raise ValueError("refine is for stacked depths; a shared depth grows by set_steps()")
        self.growth.check()
        self.blocks = doubled(self.blocks)
        self.growth.set(len(self.blocks))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints from before the parts were child modules: their keys, renamed.
        migrate_keys(state_dict, prefix)
        # A stacked growth checkpoint may hold more (or fewer) blocks than this module has
        # now: resize the block list before the children load their tensors.
        n = blocks_in_state_dict(state_dict, prefix)
        if not self.spec.share and n and n != len(self.blocks):
            self.blocks = resized(self.blocks, n)
            self.growth.steps = n
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
            f"share={s.share}, steps={self.steps}, dt={s.dt}, update={s.update!r}, "
            f"integrator={s.integrator!r}, nfe={self.nfe}"
        )
        shown = {"share", "steps", "dt", "update", "integrator"}
        for f in dataclasses.fields(s):  # every other field that is switched on
            value = getattr(s, f.name)
            if f.name not in shown and value != f.default:
                text += f", {f.name}={value!r}"
        return text
