"""Learned halting, PonderNet's (Banino et al. 2021, arXiv 2107.05407): ``halt="ponder"``.

A small halting head reads each step's state and gives every sample a probability ``lambda_n``
of stopping after step ``n``. The halting distribution over the ``N`` steps is

    p_n = lambda_n * prod_{k<n} (1 - lambda_k)      (n < N; step N takes the remaining mass)

and training minimises the expected task loss under it plus a KL towards a geometric prior,

    L = sum_n p_n L(y, y_hat_n) + beta * KL(p || Geometric(lambda_p)),

the prior ``lambda_p (1 - lambda_p)^(n-1)`` truncated at ``N`` the same way (step ``N`` takes the
rest), so both are distributions over ``1..N`` and the KL is >= 0. The task loss ``L(y, y_hat_n)``
belongs to the task: after a training forward the depth offers its per-step weights ``p`` and the
KL term through :meth:`RecurrentDepth.loss_terms` (the channel every LightningModule reads), and
replays each step's state with :meth:`RecurrentDepth.replaying`. At inference, halting
(``halting.py``) stops a sample once ``prod_k (1 - lambda_k) < adaptive_eps``.

A sample is a row of the state, or a ``group`` of rows (a molecule's atoms); the head reads the
mean of the sample's state (over its rows and, for a sequence, its positions: the whole sequence
stops together, so the halting decision of a position sees the sequence's later positions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from score_exp.core.halting import Criterion, make_criterion
from score_exp.core.observers import Observer
from score_exp.core.spec import DepthSpec


def sample_mean(h: Tensor, group: Tensor | None, n: int) -> Tensor:
    """The mean state of each sample: ``(rows, ..., C) -> (n, C)``."""
    x = h.reshape(h.shape[0], -1, h.shape[-1]).mean(1)  # (rows, C)
    if group is None:
        return x
    total = x.new_zeros(n, x.shape[1]).index_add_(0, group, x)  # (n, C)
    count = torch.bincount(group, minlength=n).clamp_min(1).to(x.dtype)  # (n,)
    return total / count[:, None]


class HaltingHead(nn.Module):
    """``lambda_n = sigmoid(w . mean(h_n) + b)`` per sample, ``(n,)``.

    Starts at the prior: ``w = 0`` and ``b = logit(lambda_p)``, so the first halting
    distribution is the prior itself (a KL of 0).
    """

    def __init__(self, width: int, lambda_p: float):
        super().__init__()
        self.linear = nn.Linear(width, 1)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.fill_(math.log(lambda_p / (1 - lambda_p)))

    def forward(self, h: Tensor, group: Tensor | None = None, n: int | None = None) -> Tensor:
        n = h.shape[0] if n is None else n
        x = sample_mean(h, group, n)  # (n, C)
        logit = self.linear(x).squeeze(-1)  # (n,)
        return torch.sigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32)))


class Halting(nn.Module):
    """The depth's halting part: owns the learned halting head ``head`` (a :class:`HaltingHead`
    for ``halt="ponder"``, else the identity: no parameters, never called) and makes each
    forward's criterion and PonderNet's training-time recorder.

    Args:
        spec: the depth's spec (``halt``, ``ponder_lambda_p``).
        width: the state's last dimension (the head's input).
    """

    def __init__(self, spec: DepthSpec, width: int | None):
        super().__init__()
        if spec.halt != "ponder":
            self.head: nn.Module = nn.Identity()
        elif width is None:
            raise ValueError("halt='ponder' needs the state width: RecurrentDepth(width=C)")
        else:
            self.head = HaltingHead(width, spec.ponder_lambda_p)

    def criterion(self, halt: str, readout: Callable[[Tensor], Tensor] | None) -> Criterion:
        """The criterion named ``halt`` for one forward (``halting.py``)."""
        return make_criterion(halt, readout, self.head)

    def recorder(self, group: Tensor | None, n: int) -> PonderRecorder:
        """PonderNet's record of one training forward (each step's state and ``lambda``)."""
        return PonderRecorder(self.head, group, n)


def halting_distribution(lambdas: Tensor) -> Tensor:
    """``p_n = lambda_n prod_{k<n} (1 - lambda_k)``, the last step taking the rest: ``(N, S)``.

    Args:
        lambdas: ``(N, S)`` halting probabilities per step and sample (the last row unused).
    """
    not_halted = torch.cumprod(1 - lambdas, dim=0)  # (N, S): prod_{k<=n} (1 - lambda_k)
    before = torch.cat([torch.ones_like(lambdas[:1]), not_halted[:-1]])  # prod_{k<n}
    return torch.cat([lambdas[:-1] * before[:-1], before[-1:]])  # (N, S), columns sum to 1


def geometric_prior(lambda_p: float, steps: int) -> Tensor:
    """``lambda_p (1 - lambda_p)^(n-1)`` for ``n = 1..steps``, step ``steps`` taking the rest."""
    return halting_distribution(torch.full((steps, 1), float(lambda_p), dtype=torch.float64))[:, 0]


def kl_to_prior(p: Tensor, prior: Tensor) -> Tensor:
    """``KL(p || prior)`` per sample, ``(S,)``, for ``p`` ``(N, S)`` and ``prior`` ``(N,)``."""
    prior = prior.to(p.dtype)[:, None]  # (N, 1)
    return (torch.xlogy(p, p) - p * prior.log()).sum(0)  # 0 log 0 = 0


@dataclass
class DepthLoss:
    """What a depth's parts add to the task's loss after a training forward.

    Attributes:
        step_weights: ``(N, S)``: the task loss is ``mean_s sum_n w[n, s] L_s(y_hat_n)``, with
            ``y_hat_n`` the model's output from step ``n``'s state (see
            :meth:`RecurrentDepth.replaying`); None: the final state's loss alone.
        aux: a scalar added to the loss (logged as ``depth/aux_loss``).
        logs: scalars worth logging beside it (``depth/<name>``).
    """

    step_weights: Tensor | None
    aux: Tensor
    logs: dict[str, Tensor]


class PonderRecorder(Observer):
    """Keeps each step's state and the head's ``lambda`` during a training forward."""

    def __init__(self, head: HaltingHead, group: Tensor | None, n: int):
        self.head, self.group, self.n = head, group, n
        self.states: list[Tensor] = []
        self.lambdas: list[Tensor] = []

    def step(self, h: Tensor, h_next: Tensor) -> Tensor:
        self.states.append(h_next)
        self.lambdas.append(self.head(h_next, self.group, self.n))
        return h_next

    def loss(self, lambda_p: float, beta: float) -> DepthLoss:
        """The step weights ``p`` and ``beta * KL(p || prior)`` (mean over samples)."""
        p = halting_distribution(torch.stack(self.lambdas))  # (N, S)
        kl = kl_to_prior(p, geometric_prior(lambda_p, len(self.lambdas))).mean()
        steps = torch.arange(1, len(p) + 1, dtype=p.dtype, device=p.device)
        expected = (steps[:, None] * p).sum(0).mean()
        return DepthLoss(
            p, beta * kl, {"ponder_kl": kl.detach(), "ponder_steps": expected.detach()}
        )
