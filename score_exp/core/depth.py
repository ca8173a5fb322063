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

Beyond SCORE (all off by default, which is the plain chain above, bit for bit):

* ``connect="ancre"``: step ``j`` starts from a learned softmax mixture of ``h_0 .. h_j``
  (ANCRe-style connectivity) instead of ``h_j`` alone.
* ``learn_dt``: the step size is a sigmoid of a learned logit (one, or one per step).
* ``adaptive_eps``: at inference, a sample stops once its relative state change is below eps.
* ``growth``: a schedule of step counts for incremental-in-depth training (ContinuousNet).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from score_exp.core.integrators import INTEGRATORS, get_integrator

UPDATES = ("contractive", "residual", "none")
CONNECTS = ("chain", "ancre")
LEARN_DT = ("none", "global", "per_step")


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
        learn_dt: ``none``, ``global`` (one learned dt) or ``per_step`` (one per step); dt is
            ``sigmoid(logit)`` in (0, 1), initialised at the configured step size, which must
            then lie strictly inside (0, 1).
        adaptive_eps: at inference only, a sample (a row of ``h``'s first dim) stops iterating
            once ``||h_{t+1} - h_t|| / ||h_t|| < adaptive_eps``; ``steps`` is the upper bound.
        growth: incremental-in-depth schedule ``[[at, steps], ...]`` starting at ``at = 0`` and
            ending at ``steps`` (``at`` counts epochs, or optimiser steps for iteration-based
            trainers, in the ``DepthGrowth`` callback). Shared depths change their step
            count; stacked ones double their blocks at each stage.
        keep_horizon: when ``growth`` changes the step count, keep ``T = steps * dt`` (dt
            becomes ``T / n``) rather than ``dt``.
    """

    share: bool = True
    steps: int = 4
    dt: float | None = 0.5
    update: str = "contractive"
    integrator: str = "euler"
    checkpoint: bool = False
    connect: str = "chain"
    ancre_tau: float = 1.0
    ancre_init: float = 0.9999
    learn_dt: str = "none"
    adaptive_eps: float | None = None
    growth: list | None = None
    keep_horizon: bool = True

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
        if self.learn_dt not in LEARN_DT:
            raise ValueError(
                f"unknown learn_dt {self.learn_dt!r}; valid learn_dt: {', '.join(LEARN_DT)}"
            )
        if self.learn_dt != "none":
            if self.update == "none":
                raise ValueError("learn_dt needs a step size: update='none' has none")
            if not 0 < self.step_size < 1:
                raise ValueError(
                    f"learn_dt keeps dt in (0, 1) with a sigmoid: the initial dt must lie "
                    f"strictly inside (0, 1), got {self.step_size}"
                )
        if self.adaptive_eps is not None and (
            not _is_number(self.adaptive_eps) or not self.adaptive_eps > 0
        ):
            raise ValueError(f"adaptive_eps must be > 0 or null, got {self.adaptive_eps!r}")
        if self.growth is not None:
            self._validate_growth()

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
        if self.update == "contractive" and self.keep_horizon:
            worst = self.steps * self.step_size / counts[0]
            if worst > 1:
                warnings.warn(
                    f"growth keeps the horizon {self.steps * self.step_size:g}: the first stage "
                    f"({counts[0]} steps) runs the contractive update with dt={worst:g} > 1",
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
        """The depth-time ``T = steps * dt`` of the configured spec."""
        return self.steps * self.step_size

    @property
    def step_size(self) -> float:
        """The resolved step size: ``dt``, or ``1 / steps`` when ``dt`` is None."""
        return self.dt if self.dt is not None else 1.0 / self.steps

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


class RecurrentDepth(nn.Module):
    """Applies blocks made by ``block_factory`` as ``spec.steps`` updates of a state.

    Args:
        block_factory: a callable returning a fresh ``nn.Module`` ``F`` with
            ``F(h, **ctx) -> Tensor`` of the same shape as ``h``. Called once when
            ``spec.share`` else once per (initial) step.
        spec: the depth specification.

    Attributes:
        last_steps_used: after a forward that stopped adaptively (``spec.adaptive_eps``), the
            number of steps each sample (row of ``h``'s first dim; a node for graph batches)
            took, a ``(B,)`` long tensor; None after any other forward.

    Example:
        >>> spec = DepthSpec(share=True, steps=4, dt=0.25)
        >>> depth = RecurrentDepth(lambda: nn.Linear(8, 8), spec)
        >>> depth(torch.zeros(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, block_factory: Callable[[], nn.Module], spec: DepthSpec):
        super().__init__()
        self.spec = spec
        # growth starts at its first stage; without growth this is spec.steps.
        self._steps = spec.steps_at(0)
        self._keep_horizon = spec.keep_horizon
        n_blocks = 1 if spec.share else self._steps
        self.blocks = nn.ModuleList(block_factory() for _ in range(n_blocks))
        if spec.growth is not None:
            # Persisted so that a checkpoint taken at any stage reloads at that stage.
            self.register_buffer("active_steps", torch.tensor(self._steps))
        if spec.connect == "ancre":
            # Row j holds the logits over h_0..h_j (lower triangle, diagonal included).
            # Diagonal tau * log(p j / (1 - p)) with zeros elsewhere gives h_j the weight
            # p = ancre_init in every row. The default 0.9999 keeps a deep first forward within
            # 1e-3 of the chain (0.999 drifts ~3e-3 over 6 steps) at the price of a saturated
            # softmax that learns slowly; see DepthSpec.ancre_init.
            n = spec.steps
            p = spec.ancre_init
            init = torch.zeros(n, n)
            for j in range(1, n):
                init[j, j] = spec.ancre_tau * math.log(p * j / (1.0 - p))
            self.connect_logits = nn.Parameter(init)
            self.register_buffer("connect_mask", torch.ones(n, n).tril().bool(), persistent=False)
        if spec.learn_dt != "none":
            size = 1 if spec.learn_dt == "global" else spec.steps
            logit = math.log(spec.step_size / (1.0 - spec.step_size))  # sigmoid^-1(dt)
            self.dt_logit = nn.Parameter(torch.full((size,), logit))
        self.last_steps_used: Tensor | None = None

    # ------------------------------------------------------------------ state of the depth

    @property
    def steps(self) -> int:
        """The active number of steps (changes with growth)."""
        return self._steps

    @property
    def step_size(self) -> float:
        """The configured (not learned) step size at the active number of steps."""
        spec = self.spec
        if self._steps != spec.steps and self._keep_horizon and spec.update != "none":
            return spec.horizon / self._steps
        return spec.step_size

    @property
    def nfe(self) -> int:
        """Evaluations of ``F`` per forward pass at the active number of steps (upper bound
        when ``adaptive_eps`` stops early; the ANCRe mixtures are not evaluations of ``F``)."""
        return self._steps * self.spec.evals_per_step

    def set_steps(self, n: int, keep_horizon: bool | None = None) -> None:
        """Change the active number of steps of a shared depth (growth).

        Args:
            n: the new number of steps, >= 1.
            keep_horizon: keep ``T = spec.steps * dt`` (dt becomes ``T / n``); None means
                ``spec.keep_horizon``.
        """
        if not self.spec.share:
            raise ValueError("set_steps is for shared depths; a stacked depth grows by refine()")
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {n}")
        if self.spec.connect != "chain" or self.spec.learn_dt != "none":
            raise ValueError("connect='ancre' and learn_dt fix the number of steps")
        if keep_horizon is not None:
            self._keep_horizon = keep_horizon
        self._set_active(n)

    def refine(self) -> None:
        """Double a stacked depth: block ``l`` becomes blocks ``2l`` and ``2l + 1``.

        This is ContinuousNet's piecewise-constant interpolation in depth: with dt halved
        (residual and contractive updates, ``keep_horizon``) the refined depth integrates
        the same piecewise-constant-in-time vector field over the same horizon.
        """
        if self.spec.share:
            raise ValueError("refine is for stacked depths; a shared depth grows by set_steps()")
        if self.spec.connect != "chain" or self.spec.learn_dt != "none":
            raise ValueError("connect='ancre' and learn_dt fix the number of steps")
        blocks = []
        for block in self.blocks:
            blocks += [block, copy.deepcopy(block)]
        self.blocks = nn.ModuleList(blocks)
        self._set_active(len(blocks))

    def _set_active(self, n: int) -> None:
        self._steps = n
        if hasattr(self, "active_steps"):
            self.active_steps.fill_(n)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A stacked growth checkpoint may hold more (or fewer) blocks than this module has
        # now: resize the block list before the children load their tensors.
        if not self.spec.share:
            ids = {
                int(k[len(prefix) + 7 :].split(".", 1)[0])
                for k in state_dict
                if k.startswith(prefix + "blocks.")
            }
            if ids and len(ids) != len(self.blocks):
                blocks = list(self.blocks)[: len(ids)]
                while len(blocks) < len(ids):
                    blocks.append(copy.deepcopy(blocks[-1]))
                self.blocks = nn.ModuleList(blocks)
                self._steps = len(blocks)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "active_steps"
        if key in state_dict:
            self._steps = int(state_dict[key])

    def connection_weights(self) -> Tensor:
        """Input mixture weights, ``(steps, steps + 1)``: row ``j`` weighs ``h_0 .. h_steps``.

        Rows sum to 1 and are zero above the diagonal (the last column, the output state, is
        never an input). The chain is the identity on the first ``steps`` columns.
        """
        n = self.spec.steps
        w = self._mixture() if self.spec.connect == "ancre" else torch.eye(n)  # (steps, steps)
        return torch.cat([w, w.new_zeros(n, 1)], dim=1)  # (steps, steps + 1)

    def _mixture(self) -> Tensor:
        logits = self.connect_logits / self.spec.ancre_tau
        return logits.masked_fill(~self.connect_mask, float("-inf")).softmax(dim=-1)

    def current_dt(self) -> Tensor:
        """The step size of each active step, a ``(steps,)`` tensor (learned or configured)."""
        if self.spec.learn_dt != "none":
            return torch.sigmoid(self.dt_logit).expand(self._steps)
        return torch.full((self._steps,), self.step_size)

    def reset_parameters(self) -> None:
        for block in self.blocks:
            for module in block.modules():
                if module is not block and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if hasattr(block, "reset_parameters"):
                block.reset_parameters()

    # ------------------------------------------------------------------ running it

    def forward(
        self,
        h: Tensor,
        *,
        steps: int | None = None,
        dt: float | None = None,
        integrator: str | None = None,
        **ctx: Any,
    ) -> Tensor:
        """Run the depth on ``h``.

        Args:
            h: the initial state ``h_0``; its first dim indexes samples (for ``adaptive_eps``).
            steps, dt, integrator: optional overrides of the spec for this call, to evaluate a
                trained shared model with another discretisation (ContinuousNet-style). When
                ``steps`` is overridden and the spec's ``dt`` is None, ``dt`` becomes
                ``1 / steps``; with a learned dt, the learned horizon is kept (``T / steps``).
                ``connect='ancre'`` fixes the number of steps.
            **ctx: passed to every block call, e.g. ``edge_index`` for a graph convolution.
        """
        adaptive = self.spec.adaptive_eps is not None and not (
            torch.is_grad_enabled() and self.training
        )
        return self._run(h, steps, dt, integrator, ctx, adaptive=adaptive)

    @torch.no_grad()
    def trace(self, h: Tensor, **ctx: Any) -> dict[str, Tensor]:
        """Per-step diagnostics of one full-depth forward (no early stopping, no gradients).

        Returns:
            ``rel_change``: ``(steps,)``, the batch mean of ``||h_{t+1} - h_t|| / ||h_t||``;
            ``contraction``: ``(steps,)``, the batch mean of
            ``||h_{t+1} - h_t|| / ||h_t - h_{t-1}||`` (NaN at ``t = 0``, which has no previous
            step); norms over all non-batch dims.
        """
        record: list[tuple[Tensor, Tensor]] = []
        self._run(h, None, None, None, ctx, adaptive=False, record=record)
        rel = torch.stack([r.mean() for r, _ in record])
        contraction = [torch.full((), float("nan"), device=h.device)]
        for (_, prev), (_, cur) in zip(record, record[1:], strict=False):
            contraction.append((cur / prev.clamp_min(1e-30)).mean())
        return {"rel_change": rel, "contraction": torch.stack(contraction)}

    def step_sizes(self, steps: int | None = None, dt: float | None = None) -> list[Any]:
        """The step size of each step a forward with these overrides would take."""
        return self._step_sizes(self._steps if steps is None else steps, steps is not None, dt)

    def _step_sizes(self, n: int, overridden: bool, dt: float | None) -> list[Any]:
        """One step size per step: an override, the learned ones or the configured one."""
        spec = self.spec
        if dt is not None:
            if dt <= 0:
                raise ValueError(f"dt must be > 0, got {dt}")
            return [dt] * n
        if spec.learn_dt != "none":
            learned = torch.sigmoid(self.dt_logit)  # (1,) or (steps,)
            if not overridden or n == self._steps:
                return list(learned.expand(self._steps).unbind())
            horizon = learned.sum() if spec.learn_dt == "per_step" else learned[0] * spec.steps
            return [horizon / n] * n
        if not overridden:
            return [self.step_size] * n
        return [spec.dt if spec.dt is not None else 1.0 / n] * n

    def _run(
        self,
        h: Tensor,
        steps: int | None,
        dt: float | None,
        integrator: str | None,
        ctx: dict[str, Any],
        adaptive: bool,
        record: list | None = None,
    ) -> Tensor:
        spec = self.spec
        n_steps = self._steps if steps is None else steps
        if n_steps < 1:
            raise ValueError(f"steps must be >= 1, got {n_steps}")
        if not spec.share and n_steps != len(self.blocks):
            raise ValueError(
                f"a stacked depth has {len(self.blocks)} independent blocks; "
                f"it cannot run {n_steps} steps"
            )
        ancre = spec.connect == "ancre"
        if ancre and n_steps != spec.steps:
            raise ValueError(
                f"connect='ancre' learns one mixture per step: it runs exactly {spec.steps} "
                f"steps, not {n_steps}"
            )
        dts = self._step_sizes(n_steps, steps is not None, dt)
        method = get_integrator(integrator or spec.integrator)
        if spec.update == "none" and method.name != "euler":
            raise ValueError("update='none' supports only the 'euler' integrator")

        use_ckpt = spec.checkpoint and torch.is_grad_enabled()
        weights = self._mixture() if ancre else None  # (steps, steps)
        states = [h] if ancre else None
        active = used = None
        if adaptive:
            active = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)  # (B,)
            used = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)  # (B,)
        for l in range(n_steps):
            block = self.blocks[0 if spec.share else l]
            x = h
            if ancre and l > 0:
                stacked = torch.stack(states)  # (l + 1, *h.shape)
                x = torch.tensordot(weights[l, : l + 1], stacked, dims=1)  # h.shape
            if use_ckpt:
                h_next = activation_checkpoint(
                    self._step, block, x, dts[l], method.name, use_reentrant=False, **ctx
                )
            else:
                h_next = self._step(block, x, dts[l], method.name, **ctx)
            if adaptive or record is not None:
                change = _row_norm(h_next - h)  # (B,)
                rel = change / _row_norm(h).clamp_min(1e-30)  # (B,)
                if record is not None:
                    record.append((rel, change))
                if adaptive:
                    # Stopped samples keep their state; the rest take the step.
                    h_next = torch.where(active.view(-1, *[1] * (h.dim() - 1)), h_next, h)
                    used += active.long()
                    active = active & (rel >= spec.adaptive_eps)
            h = h_next
            if ancre:
                states.append(h)
            if adaptive and not bool(active.any()):
                break
        self.last_steps_used = used
        return h

    def _step(self, block: nn.Module, h: Tensor, dt: Any, method: str, **ctx: Any) -> Tensor:
        update = self.spec.update
        if update == "none":
            return block(h, **ctx)
        if update == "contractive":

            def field(x: Tensor) -> Tensor:
                return block(x, **ctx) - x

        else:

            def field(x: Tensor) -> Tensor:
                return block(x, **ctx)

        return INTEGRATORS[method].step(field, h, dt)

    def extra_repr(self) -> str:
        s = self.spec
        text = (
            f"share={s.share}, steps={self._steps}, dt={s.dt}, update={s.update!r}, "
            f"integrator={s.integrator!r}, nfe={self.nfe}"
        )
        if s.connect != "chain":
            text += f", connect={s.connect!r}, ancre_tau={s.ancre_tau}, ancre_init={s.ancre_init}"
        if s.learn_dt != "none":
            text += f", learn_dt={s.learn_dt!r}"
        if s.adaptive_eps is not None:
            text += f", adaptive_eps={s.adaptive_eps}"
        if s.growth is not None:
            text += f", growth={s.growth}, keep_horizon={s.keep_horizon}"
        return text


def _row_norm(x: Tensor) -> Tensor:
    """Euclidean norm over all dims but the first: ``(B, ...) -> (B,)``."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
