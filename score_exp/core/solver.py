"""Fixed-point solver (DEQ-style): solve ``h = F(h)`` with Anderson acceleration.

SCORE's contractive update ``h <- (1 - dt) h + dt F(h)`` is a damped fixed-point iteration, so a
converged depth sits at ``h* = F(h*)``. The solve runs without a graph (memory constant in the
iterations); the output is one differentiable ``F`` step at the fixed point, ``F(h*)``. Its
gradient is either Jacobian-free (JFB, Fung et al., arXiv 2103.12803: back-propagation sees that
one application of ``F``, the implicit gradient's ``(I - dF/dh)^-1`` replaced by ``I``) or the
implicit one (DEQ, Bai et al., arXiv 1909.01377: :func:`implicit_backward` solves
``g = J^T g + dL/dh*`` for the gradient that enters that step, with the same solver).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


@torch.no_grad()
def anderson(
    f: Callable[[Tensor], Tensor],
    h0: Tensor,
    tol: float,
    max_iter: int,
    m: int = 5,
    lam: float = 1e-4,
) -> tuple[Tensor, int, float]:
    """Anderson acceleration of ``h <- f(h)`` on the whole state as one vector.

    Args:
        f: the map whose fixed point is sought.
        h0: the starting point.
        tol: stop when ``||f(h) - h|| / ||f(h)|| < tol``.
        max_iter: evaluations of ``f`` at most (>= 2).
        m: history size; lam: Tikhonov regularisation of the least-squares problem, relative
            to the mean squared residual of the history.

    Returns:
        ``(h, evaluations of f, final relative residual)``.
    """
    shape = h0.shape
    x0 = h0.reshape(1, -1)
    d = x0.shape[1]
    X = x0.new_zeros(1, m, d)
    F = x0.new_zeros(1, m, d)
    X[:, 0] = x0
    F[:, 0] = f(x0.view(shape)).reshape(1, -1)
    X[:, 1] = F[:, 0]
    F[:, 1] = f(F[:, 0].view(shape)).reshape(1, -1)
    H = x0.new_zeros(1, m + 1, m + 1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = x0.new_zeros(1, m + 1, 1)
    y[:, 0] = 1
    evals, k = 2, 1
    res = _residual(X[:, 1], F[:, 1])
    while res >= tol and evals < max_iter:
        k = evals
        n = min(k, m)
        G = F[:, :n] - X[:, :n]  # (1, n, d)
        GG = torch.bmm(G, G.transpose(1, 2))  # (1, n, n)
        # Tikhonov term relative to the residuals' scale, which shrinks as the solve converges.
        reg = lam * GG.diagonal(dim1=1, dim2=2).mean().clamp_min(1e-30)
        H[:, 1 : n + 1, 1 : n + 1] = GG + reg * torch.eye(n, dtype=x0.dtype, device=x0.device)
        alpha = torch.linalg.solve(H[:, : n + 1, : n + 1], y[:, : n + 1])[:, 1 : n + 1, 0]
        X[:, k % m] = (alpha[:, None] @ F[:, :n])[:, 0]
        F[:, k % m] = f(X[:, k % m].view(shape)).reshape(1, -1)
        evals += 1
        res = _residual(X[:, k % m], F[:, k % m])
    return F[:, k % m].view(shape).clone(), evals, res


def _residual(x: Tensor, fx: Tensor) -> float:
    return float((fx - x).norm() / fx.norm().clamp_min(1e-30))


def implicit_backward(out: Tensor, h_star: Tensor, tol: float, max_iter: int) -> None:
    """Make the gradient that reaches ``out = F(h_star)`` the implicit (DEQ) one.

    With ``h* = F(h*)`` and ``J = dF/dh`` at ``h*``, ``dL/dtheta = g^T dF/dtheta`` where
    ``g = (I - J^T)^-1 dL/dh*``. A hook on ``out`` replaces the incoming ``dL/dh*`` by ``g``,
    found by Anderson acceleration of ``g <- J^T g + dL/dh*`` (vector-Jacobian products through
    ``out``'s one-step graph: memory constant in the iterations); the backward pass then carries
    ``g`` through that step to the parameters and the injected input. The hook removes itself
    when it runs (its products go through ``out``'s graph), so a second backward through a
    retained graph gets the Jacobian-free gradient.

    Args:
        out: ``F(h_star)``, built with gradients; ``h_star`` a leaf that requires grad.
        tol, max_iter: the backward solve's tolerance and budget (the forward's).
    """
    handle = None

    def hook(grad: Tensor) -> Tensor:
        handle.remove()  # the products below run through out's graph: no recursion

        def step(g: Tensor) -> Tensor:
            (jtg,) = torch.autograd.grad(out, h_star, g, retain_graph=True)
            return jtg + grad

        g, _, _ = anderson(step, grad, tol, max_iter)
        return g

    handle = out.register_hook(hook)
