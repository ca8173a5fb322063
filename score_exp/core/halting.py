"""Halting that saves compute: at inference, finished samples leave the computation.

A *sample* is a row of ``h`` (a vector for the MLP, a sequence for the language model), or a
group of rows given by ``group`` (PyG's ``batch`` vector: one molecule's atoms). After each step
a sample whose criterion falls below ``adaptive_eps`` is finished: its state is written to the
output and the next step runs on the remaining samples only (indexed, not masked), so the work
shrinks with them. Criteria (``DepthSpec.halt``):

* ``state``: ``||h_{t+1} - h_t|| / ||h_t||`` over the sample's rows;
* ``kl``: Huginn's, ``KL(p_{t+1} || p_t)`` between successive distributions of the model's
  ``readout(h)`` (e.g. next-token logits), the largest over a sequence's positions.

Graph samples need the model's ``select(rows, ctx) -> ctx``, which cuts the block's context
(``edge_index``, ...) down to the kept rows; without ``ctx`` nothing needs cutting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

if TYPE_CHECKING:
    from score_exp.core.depth import RecurrentDepth
    from score_exp.core.discretisation import Discretisation

Select = Callable[[Tensor, dict[str, Any]], dict[str, Any]]


def _group_norm(x: Tensor, group: Tensor | None, n: int) -> Tensor:
    """Euclidean norm of each sample: ``(n,)``."""
    sq = x.reshape(x.shape[0], -1).pow(2).sum(1)  # (rows,)
    if group is not None:
        sq = torch.zeros(n, dtype=sq.dtype, device=sq.device).index_add_(0, group, sq)
    return sq.sqrt()


def criterion(
    h: Tensor,
    h_next: Tensor,
    group: Tensor | None,
    n: int,
    readout: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """The per-sample halting criterion, ``(n,)``: KL with a readout, else relative change."""
    if readout is not None:
        logp_next = F.log_softmax(readout(h_next).float(), dim=-1)
        logp = F.log_softmax(readout(h).float(), dim=-1)
        kl = (logp_next.exp() * (logp_next - logp)).sum(-1)  # (B, T) or (B,)
        return kl.reshape(kl.shape[0], -1).amax(1)
    change = _group_norm(h_next - h, group, n)
    return change / _group_norm(h, group, n).clamp_min(1e-30)


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

    ``F evaluations spent`` counts sample-evaluations: the sum over steps of the samples still
    running, times the integrator's evaluations per step.
    """
    n = int(group.max()) + 1 if group is not None and group.numel() else h.shape[0]
    out = h.clone()
    used = torch.zeros(n, dtype=torch.long, device=h.device)
    samples = torch.arange(n, device=h.device)  # the running samples
    rows = torch.arange(h.shape[0], device=h.device)  # their rows in out
    local = group  # each running row's sample, numbered 0..len(samples)-1
    dts = depth.dts()
    spent = 0
    for l in range(d.steps):
        h_next = depth._step(l, h, e, dts[l], d.integrator, ctx)
        spent += len(samples) * d.evals_per_step
        used[samples] += 1
        keep = criterion(h, h_next, local, len(samples), readout) >= d.adaptive_eps  # (S,)
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
        if local is not None:
            renumber = torch.cumsum(keep.long(), 0) - 1  # old sample id -> new
            local = renumber[local[kept]]
        if ctx:
            if select is None:
                raise ValueError("halting a depth with a block context needs select=")
            ctx = select(row_keep, ctx)
    return out, used, spent
