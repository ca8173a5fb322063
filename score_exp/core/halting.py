"""Halting that saves compute: at inference, finished samples leave the computation.

A *sample* is a row of ``h`` (a vector for the MLP, a sequence for the language model), or a
group of rows given by ``group`` (PyG's ``batch`` vector: one molecule's atoms). After each step
a sample whose criterion falls below ``adaptive_eps`` is finished: its state is written to the
output and the next step runs on the remaining samples only (indexed, not masked), so the work
shrinks with them. This is the one halting path of the depth (every criterion, every input
mixing): :class:`EarlyExit`, the halting runner's control of the one step loop (``loop.py``).
Criteria (``DepthSpec.halt``), each defined once here:

* ``state``: ``||h_{t+1} - h_t|| / ||h_t||`` over the sample's rows (:func:`relative_change`,
  which the trace diagnostics share);
* ``kl``: Huginn's, ``KL(p_{t+1} || p_t)`` between successive distributions of the model's
  ``readout(h)`` (e.g. next-token logits), the largest over a sequence's positions;
* ``ponder``: PonderNet's, the probability that the sample has not halted yet,
  ``prod_{k<=t} (1 - lambda_k)`` from the learned halting head (``ponder.py``): the sample stops
  once its cumulative halting probability passes ``1 - adaptive_eps``.

Graph samples need the model's ``select(rows, ctx) -> ctx``, which cuts the block's context
(``edge_index``, ...) down to the kept rows; without ``ctx`` nothing needs cutting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from score_exp.core.loop import Loop

Select = Callable[[Tensor, dict[str, Any]], dict[str, Any]]


def sample_norm(x: Tensor, group: Tensor | None = None, n: int | None = None) -> Tensor:
    """Euclidean norm of each sample over all its non-batch entries: ``(n,)``."""
    if group is None:
        return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
    sq = x.reshape(x.shape[0], -1).pow(2).sum(1)  # (rows,)
    return torch.zeros(n, dtype=sq.dtype, device=sq.device).index_add_(0, group, sq).sqrt()


def relative_change(
    h: Tensor, h_next: Tensor, group: Tensor | None = None, n: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(||h_next - h|| / ||h||, ||h_next - h||)`` per sample, each ``(n,)``."""
    change = sample_norm(h_next - h, group, n)
    return change / sample_norm(h, group, n).clamp_min(1e-30), change


class Criterion:
    """A per-sample value after each step; a sample stops once it falls below ``adaptive_eps``.

    ``keep(mask)`` tells a criterion with memory which samples go on (``(S,)`` bool).
    """

    def __call__(self, h: Tensor, h_next: Tensor, group: Tensor | None, n: int) -> Tensor:
        raise NotImplementedError

    def keep(self, mask: Tensor) -> None:
        pass


class StateChange(Criterion):
    """``state``: the relative change of the sample's state."""

    def __call__(self, h: Tensor, h_next: Tensor, group: Tensor | None, n: int) -> Tensor:
        return relative_change(h, h_next, group, n)[0]


class ReadoutKL(Criterion):
    """``kl``: ``KL(p_{t+1} || p_t)`` of ``readout``'s distributions, the largest per sample."""

    def __init__(self, readout: Callable[[Tensor], Tensor]):
        self.readout = readout

    def __call__(self, h: Tensor, h_next: Tensor, group: Tensor | None, n: int) -> Tensor:
        logp_next = F.log_softmax(self.readout(h_next).float(), dim=-1)
        logp = F.log_softmax(self.readout(h).float(), dim=-1)
        kl = (logp_next.exp() * (logp_next - logp)).sum(-1)  # (B, T) or (B,)
        return kl.reshape(kl.shape[0], -1).amax(1)


class NotHalted(Criterion):
    """``ponder``: ``prod_{k<=t} (1 - lambda_k)``, the probability of running on after step t."""

    def __init__(self, head: nn.Module):
        self.head, self.remaining = head, None

    def __call__(self, h: Tensor, h_next: Tensor, group: Tensor | None, n: int) -> Tensor:
        lam = self.head(h_next, group, n)  # (n,)
        self.remaining = (1 - lam) if self.remaining is None else self.remaining * (1 - lam)
        return self.remaining

    def keep(self, mask: Tensor) -> None:
        self.remaining = self.remaining[mask]


def make_criterion(
    halt: str, readout: Callable[[Tensor], Tensor] | None, head: nn.Module
) -> Criterion:
    """The criterion named ``halt`` (``DepthSpec.halt``) for one forward."""
    if halt == "kl":
        if readout is None:
            raise ValueError("halt='kl' compares readouts: the model must pass readout=")
        return ReadoutKL(readout)
    if halt == "ponder":
        return NotHalted(head)
    return StateChange()


class EarlyExit:
    """The halting runner's control of the step loop: after each step, the samples whose
    criterion fell below ``eps`` are finished (their state written to :attr:`out`) and the loop
    goes on with the others only (its state, input, context, mixing and ``rows`` cut).

    Attributes:
        out: the final state of every row, once the loop has ended.
        used: the steps each sample took, ``(n,)`` long.
        spent: evaluations of ``F`` summed over the running samples (sample-evaluations).
    """

    def __init__(
        self,
        criterion: Criterion,
        eps: float,
        h: Tensor,
        group: Tensor | None,
        select: Select | None,
        evals_per_step: int,
    ):
        self.criterion, self.eps, self.select = criterion, eps, select
        self.evals_per_step = evals_per_step
        n = int(group.max()) + 1 if group is not None and group.numel() else h.shape[0]
        self.out = h.clone()
        self.used = torch.zeros(n, dtype=torch.long, device=h.device)
        self.samples = torch.arange(n, device=h.device)  # the running samples
        self.rows = torch.arange(h.shape[0], device=h.device)  # their rows in out
        self.local = group  # each running row's sample, numbered 0..len(samples)-1
        self.spent = 0

    def __call__(self, loop: Loop, l: int, h: Tensor, h_next: Tensor) -> Tensor | None:
        self.spent += len(self.samples) * self.evals_per_step
        self.used[self.samples] += 1
        keep = self.criterion(h, h_next, self.local, len(self.samples)) >= self.eps  # (S,)
        if bool(keep.all()) and l + 1 < loop.steps:
            return h_next
        self.out[self.rows] = h_next  # the finished samples' final state (others overwritten)
        if not bool(keep.any()) or l + 1 == loop.steps:
            return None
        row_keep = keep[self.local] if self.local is not None else keep  # (rows,)
        kept = row_keep.nonzero().squeeze(1)
        self.samples, self.rows = self.samples[keep], self.rows[kept]
        loop.e, loop.rows = loop.e[kept], self.rows
        loop.mix.keep(kept)
        self.criterion.keep(keep)
        if self.local is not None:
            renumber = torch.cumsum(keep.long(), 0) - 1  # old sample id -> new
            self.local = renumber[self.local[kept]]
        if loop.ctx:
            if self.select is None:
                raise ValueError("halting a depth with a block context needs select=")
            loop.ctx = self.select(row_keep, loop.ctx)
        return h_next[kept]
