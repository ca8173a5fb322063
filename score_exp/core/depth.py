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
"""

from __future__ import annotations

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
    """

    share: bool = True
    steps: int = 4
    dt: float | None = 0.5
    update: str = "contractive"
    integrator: str = "euler"
    checkpoint: bool = False

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


class RecurrentDepth(nn.Module):
    """Applies blocks made by ``block_factory`` as ``spec.steps`` updates of a state.

    Args:
        block_factory: a callable returning a fresh ``nn.Module`` ``F`` with
            ``F(h, **ctx) -> Tensor`` of the same shape as ``h``. Called once when
            ``spec.share`` else ``spec.steps`` times.
        spec: the depth specification.

    Example:
        >>> spec = DepthSpec(share=True, steps=4, dt=0.25)
        >>> depth = RecurrentDepth(lambda: nn.Linear(8, 8), spec)
        >>> depth(torch.zeros(2, 8)).shape
        torch.Size([2, 8])
    """

    def __init__(self, block_factory: Callable[[], nn.Module], spec: DepthSpec):
        super().__init__()
        self.spec = spec
        n_blocks = 1 if spec.share else spec.steps
        self.blocks = nn.ModuleList(block_factory() for _ in range(n_blocks))

    @property
    def nfe(self) -> int:
        """Evaluations of ``F`` per forward pass with the configured spec."""
        return self.spec.nfe

    def reset_parameters(self) -> None:
        for block in self.blocks:
            for module in block.modules():
                if module is not block and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if hasattr(block, "reset_parameters"):
                block.reset_parameters()

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
            h: the initial state ``h_0``.
            steps, dt, integrator: optional overrides of the spec for this call, to evaluate a
                trained shared model with another discretisation (ContinuousNet-style). When
                ``steps`` is overridden and the spec's ``dt`` is None, ``dt`` becomes
                ``1 / steps``.
            **ctx: passed to every block call, e.g. ``edge_index`` for a graph convolution.
        """
        spec = self.spec
        n_steps = spec.steps if steps is None else steps
        if n_steps < 1:
            raise ValueError(f"steps must be >= 1, got {n_steps}")
        if not spec.share and n_steps != spec.steps:
            raise ValueError(
                f"a stacked depth has {spec.steps} independent blocks; it cannot run {n_steps} steps"
            )
        if dt is None:
            dt = spec.dt if spec.dt is not None else 1.0 / n_steps
        if dt <= 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        method = get_integrator(integrator or spec.integrator)
        if spec.update == "none" and method.name != "euler":
            raise ValueError("update='none' supports only the 'euler' integrator")

        use_ckpt = spec.checkpoint and torch.is_grad_enabled()
        for l in range(n_steps):
            block = self.blocks[0 if spec.share else l]
            if use_ckpt:
                h = activation_checkpoint(
                    self._step, block, h, dt, method.name, use_reentrant=False, **ctx
                )
            else:
                h = self._step(block, h, dt, method.name, **ctx)
        return h

    def _step(self, block: nn.Module, h: Tensor, dt: float, method: str, **ctx: Any) -> Tensor:
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
        return (
            f"share={s.share}, steps={s.steps}, dt={s.dt}, update={s.update!r}, "
            f"integrator={s.integrator!r}, nfe={s.nfe}"
        )
