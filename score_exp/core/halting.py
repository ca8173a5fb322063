"""Halting that saves compute: at inference, finished samples leave the computation.

A *sample* is a row of ``h`` (a vector for the MLP, a sequence for the language model), or a
group of rows given by ``group`` (PyG's ``batch`` vector: one molecule's atoms). After each step
a sample whose criterion falls below ``adaptive_eps`` is finished: its state is written to the
output and the next step runs on the remaining samples only (indexed, not masked), so the work
shrinks with them. This is the one halting path of the depth (every criterion, every input
mixing). Criteria (``DepthSpec.halt``), each defined once here:

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
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from score_exp.core.depth import RecurrentDepth
    from score_exp.core.discretisation import Discretisation

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


def integrate_halting(
    depth: RecurrentDepth,
    h: Tensor,
    e: Tensor,
    d: Discretisation,
    ctx: dict[str, Any],
    group: Tensor | None = None,
    select: Select | None = None,
    readout: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Run ``depth`` with halting; returns ``(h, steps used per sample, F evaluations spent)``.

    Uses the depth's public pieces only: :meth:`~RecurrentDepth.step`,
    :meth:`~RecurrentDepth.input_mixing` (the chain, or ANCRe's states, cut with the samples),
    :meth:`~RecurrentDepth.dts` and its ``halting_head`` (for ``ponder``).

    ``F evaluations spent`` counts sample-evaluations: the sum over steps of the samples still
    running, times the integrator's evaluations per step.
    """
    criterion = make_criterion(d.halt, readout, depth.halting_head)
    mix = depth.input_mixing(h)
    dts = depth.dts()
    n = int(group.max()) + 1 if group is not None and group.numel() else h.shape[0]
    out = h.clone()
    used = torch.zeros(n, dtype=torch.long, device=h.device)
    samples = torch.arange(n, device=h.device)  # the running samples
    rows = torch.arange(h.shape[0], device=h.device)  # their rows in out
    local = group  # each running row's sample, numbered 0..len(samples)-1
    spent = 0
    for l in range(d.steps):
        h_next = depth.step(l, mix.input(l, h), e, dts[l], d.integrator, ctx)
        mix.push(h_next)
        spent += len(samples) * d.evals_per_step
        used[samples] += 1
        keep = criterion(h, h_next, local, len(samples)) >= d.adaptive_eps  # (S,)
        if bool(keep.all()) and l + 1 < d.steps:
            h = h_next
            continue
        out[rows] = h_next  # the finished samples' final state (the others are overwritten)
        if not bool(keep.any()) or l + 1 == d.steps:
            break
        row_keep = keep[local] if local is not None else keep  # (rows,)
        kept = row_keep.nonzero().squeeze(1)
        samples, rows = samples[keep], rows[kept]
        h, e = h_next[kept], e[kept]
        mix.keep(kept)
        criterion.keep(keep)
        if local is not None:
            renumber = torch.cumsum(keep.long(), 0) - 1  # old sample id -> new
            local = renumber[local[kept]]
        if ctx:
            if select is None:
                raise ValueError("halting a depth with a block context needs select=")
            ctx = select(row_keep, ctx)
    return out, used, spent
