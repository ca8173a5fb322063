"""Fixed-point solver (DEQ-style): solve ``h = F(h)`` per sample with Anderson acceleration.

SCORE's contractive update ``h <- (1 - dt) h + dt F(h)`` is a damped fixed-point iteration, so a
converged depth sits at ``h* = F(h*)``. The solve runs without a graph (memory constant in the
iterations); the output is one differentiable ``F`` step at the fixed point, ``F(h*)``. Its
gradient is either Jacobian-free (JFB, Fung et al., arXiv 2103.12803: back-propagation sees that
one application of ``F``, the implicit gradient's ``(I - dF/dh)^-1`` replaced by ``I``) or the
implicit one (DEQ, Bai et al., arXiv 1909.01377: :func:`implicit_backward` solves
``g = J^T g + dL/dh*`` for the gradient that enters that step, with the same solver).

Every *sample* is solved on its own, as torchdeq does: its own Anderson history (mixing
coefficients from its own residuals), its own stopping test, its own iteration count and
residual, all in batched tensors (no loop over samples). A sample is a row of ``h`` (a vector for
the MLP, a sequence for the language model) or the rows of one ``group`` (a molecule's atoms),
so a sample's fixed point does not depend on the rest of its batch (up to float rounding, as
long as ``F`` itself treats samples independently). A finished sample's state is frozen; the
batch keeps evaluating ``F`` on every row until its last sample stops.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from score_exp.core.spec import DepthSpec


class FixedPoint(NamedTuple):
    """What :func:`anderson` returns; per-sample fields are ``(samples,)``.

    Attributes:
        h: ``f`` at each sample's last iterate, shaped as the start.
        iterations: evaluations of ``f`` each sample used (long).
        residual: each sample's relative residual ``||f(x) - x|| / ||f(x)||`` at its last iterate.
        converged: ``residual < tol`` (bool).
        evals: evaluations of ``f`` the batch ran (the largest of ``iterations``).
    """

    h: Tensor
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    evals: int


def num_samples(rows: int, group: Tensor | None) -> int:
    """Samples in a batch of ``rows`` rows: the rows themselves, or ``group``'s count."""
    if group is None:
        return rows
    return int(group.max()) + 1 if group.numel() else 0


def _sample_sum(v: Tensor, group: Tensor | None, n: int) -> Tensor:
    """Per-row values ``(rows, ...)`` summed per sample, ``(n, ...)``."""
    if group is None:
        return v
    return v.new_zeros((n, *v.shape[1:])).index_add_(0, group, v)


def _per_row(v: Tensor, group: Tensor | None) -> Tensor:
    """Per-sample values ``(n, ...)`` broadcast to their rows, ``(rows, ...)``."""
    return v if group is None else v[group]


def _residual(x: Tensor, fx: Tensor, group: Tensor | None, n: int) -> Tensor:
    """``||f(x) - x|| / ||f(x)||`` per sample, ``(n,)``; ``x``, ``fx`` are ``(rows, d)``."""
    if group is None:
        return (fx - x).norm(dim=1) / fx.norm(dim=1).clamp_min(1e-30)
    diff = _sample_sum((fx - x).pow(2).sum(1), group, n).sqrt()
    return diff / _sample_sum(fx.pow(2).sum(1), group, n).sqrt().clamp_min(1e-30)


def _mixing_weights(M: Tensor) -> Tensor:
    """Anderson's coefficients ``alpha = M^-1 1 / (1^T M^-1 1)`` for each sample, ``(samples, n)``.

    ``alpha`` minimises ``||sum_i alpha_i G_i||^2 + reg ||alpha||^2`` subject to
    ``sum_i alpha_i = 1``, with ``M = G G^T + reg I`` symmetric positive definite, so Gaussian
    elimination without pivoting is stable. It runs as elementwise operations over the samples
    (``n <= m`` pivots): a batched LAPACK solve enters a thread-parallel region at every call,
    which an oversubscribed CPU stalls for a scheduler time slice (measured: 20 ms per iteration,
    10x a whole solve of a few small samples).
    """
    M = M.clone()
    n = M.shape[-1]
    z = M.new_ones(M.shape[:2])  # (samples, n): the right-hand side 1, then M^-1 1
    for k in range(n):  # forward elimination
        factor = M[:, k + 1 :, k] / M[:, k, k, None]  # (samples, n - k - 1)
        M[:, k + 1 :, k:] -= factor[:, :, None] * M[:, k, None, k:]
        z[:, k + 1 :] -= factor * z[:, k, None]
    for k in reversed(range(n)):  # back substitution
        z[:, k] = (z[:, k] - (M[:, k, k + 1 :] * z[:, k + 1 :]).sum(1)) / M[:, k, k]
    return z / z.sum(1, keepdim=True)


@torch.no_grad()
def anderson(
    f: Callable[[Tensor], Tensor],
    h0: Tensor,
    tol: float,
    max_iter: int,
    m: int = 5,
    lam: float = 1e-4,
    group: Tensor | None = None,
) -> FixedPoint:
    """Anderson acceleration of ``h <- f(h)``, each sample with its own history and stopping test.

    Args:
        f: the map whose fixed point is sought; it maps ``(rows, ...)`` to the same shape.
        h0: the starting point, ``(rows, ...)``.
        tol: a sample stops when its ``||f(h) - h|| / ||f(h)|| < tol``.
        max_iter: evaluations of ``f`` at most (>= 2).
        m: history size; lam: Tikhonov regularisation of each sample's least-squares problem,
            relative to the mean squared residual of its history.
        group: the sample of each row (PyG's ``batch``), None: each row is a sample.

    Returns:
        a :class:`FixedPoint`: ``(h, iterations, residual, converged, evals)``.
    """
    shape, rows = h0.shape, h0.shape[0]
    n_samples = num_samples(rows, group)
    d = math.prod(shape[1:])
    x0 = h0.reshape(rows, d)

    def F_(x: Tensor) -> Tensor:
        return f(x.view(shape)).reshape(rows, d)

    X = x0.new_zeros(rows, m, d)
    F = x0.new_zeros(rows, m, d)
    X[:, 0] = x0
    F[:, 0] = F_(x0)
    X[:, 1] = F[:, 0]
    F[:, 1] = F_(F[:, 0])
    evals = 2
    residual = _residual(X[:, 1], F[:, 1], group, n_samples)
    iterations = torch.full((n_samples,), evals, dtype=torch.long, device=h0.device)
    out = F[:, 1].clone()
    active = residual >= tol  # (samples,): still iterating
    while evals < max_iter and bool(active.any()):
        k = evals
        n = min(k, m)
        G = F[:, :n] - X[:, :n]  # (rows, n, d)
        GG = _sample_sum(torch.bmm(G, G.transpose(1, 2)), group, n_samples)  # (samples, n, n)
        # Tikhonov term relative to each sample's residuals, which shrink as it converges.
        reg = lam * GG.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)  # (samples,)
        eye = torch.eye(n, dtype=x0.dtype, device=x0.device)
        # A finished sample solves the identity instead (its state no longer changes), so a
        # system that degenerates once a sample has converged never reaches the solve.
        M = torch.where(active[:, None, None], GG + reg[:, None, None] * eye, eye)
        alpha = _mixing_weights(M)  # (samples, n)
        row_active = _per_row(active, group)[:, None]  # (rows, 1)
        x = torch.bmm(_per_row(alpha, group)[:, None], F[:, :n])[:, 0]  # (rows, d)
        x = torch.where(row_active, x, out)  # finished samples: frozen at their result
        X[:, k % m] = x
        F[:, k % m] = fx = F_(x)
        evals += 1
        res = _residual(x, fx, group, n_samples)
        iterations = torch.where(active, evals, iterations)
        residual = torch.where(active, res, residual)
        out = torch.where(row_active, fx, out)
        active = active & (res >= tol)
    return FixedPoint(out.view(shape).clone(), iterations, residual, residual < tol, evals)


def implicit_backward(
    out: Tensor, h_star: Tensor, tol: float, max_iter: int, group: Tensor | None = None
) -> None:
    """Make the gradient that reaches ``out = F(h_star)`` the implicit (DEQ) one.

    With ``h* = F(h*)`` and ``J = dF/dh`` at ``h*``, ``dL/dtheta = g^T dF/dtheta`` where
    ``g = (I - J^T)^-1 dL/dh*``. A hook on ``out`` replaces the incoming ``dL/dh*`` by ``g``,
    found by Anderson acceleration of ``g <- J^T g + dL/dh*`` (vector-Jacobian products through
    ``out``'s one-step graph: memory constant in the iterations), per sample as the forward
    solve; the backward pass then carries ``g`` through that step to the parameters and the
    injected input. The hook removes itself when it runs (its products go through ``out``'s
    graph), so a second backward through a retained graph gets the Jacobian-free gradient.

    Args:
        out: ``F(h_star)``, built with gradients; ``h_star`` a leaf that requires grad.
        tol, max_iter: the backward solve's tolerance and budget (the forward's).
        group: the sample of each row (as :func:`anderson`).
    """
    handle = None

    def hook(grad: Tensor) -> Tensor:
        handle.remove()  # the products below run through out's graph: no recursion

        def step(g: Tensor) -> Tensor:
            (jtg,) = torch.autograd.grad(out, h_star, g, retain_graph=True)
            return jtg + grad

        return anderson(step, grad, tol, max_iter, group=group).h

    handle = out.register_hook(hook)


def fixed_point(
    F: Callable[[Tensor], Tensor], h: Tensor, spec: DepthSpec, group: Tensor | None = None
) -> tuple[Tensor, FixedPoint]:
    """A depth's ``solver=fixed_point`` forward: Anderson to ``h* = F(h*)`` per sample, then one
    differentiable ``F``, whose gradient is Jacobian-free (``solver_grad="jfb"``) or the implicit
    one (:func:`implicit_backward`).

    Args:
        F: the block, ``(rows, ...) -> (rows, ...)``, its context bound.
        h: the starting state.
        spec: the depth's spec (``solver_tol``, ``solver_max_iter``, ``solver_grad``).
        group: the sample of each row (PyG's ``batch``), None: each row is a sample.

    Returns:
        ``F(h*)`` and the solve (:class:`FixedPoint`).
    """
    sol = anderson(F, h, spec.solver_tol, spec.solver_max_iter, group=group)
    h_star = sol.h
    if spec.solver_grad == "jfb" or not torch.is_grad_enabled():
        return F(h_star), sol  # Jacobian-free backprop: one step carries the gradient
    h_star.requires_grad_()  # a leaf: the vector-Jacobian products below differentiate to it
    out = F(h_star)
    if out.requires_grad:
        implicit_backward(out, h_star, spec.solver_tol, spec.solver_max_iter, group=group)
    return out, sol
