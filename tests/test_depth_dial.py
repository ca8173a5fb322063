"""Depth as a dial: input injection, initial state, random step counts, truncated backprop,
halting that removes finished samples, and the fixed-point solver (docs/depth.md, "Depth as a
dial")."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from score_exp.core import DepthSpec, RecurrentDepth
from score_exp.core.solver import anderson

pytestmark = pytest.mark.usefixtures("float64")


def _tanh_block():
    return nn.Sequential(nn.Linear(5, 5), nn.Tanh())


class Contractive(nn.Module):
    """``F(h) = tanh(h A^T + b)`` with ``||A|| = 0.5``: a contraction with one fixed point."""

    def __init__(self, d: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(d, d, generator=g)
        self.A = nn.Parameter(0.5 * A / torch.linalg.matrix_norm(A, ord=2))
        self.b = nn.Parameter(0.3 * torch.randn(d, generator=g))

    def forward(self, h):
        return torch.tanh(h @ self.A.T + self.b)


def _pair(spec_a: dict, spec_b: dict, factory=_tanh_block, width=5):
    torch.manual_seed(0)
    a = RecurrentDepth(factory, DepthSpec(**spec_a), width)
    b = RecurrentDepth(factory, DepthSpec(**spec_b), width)
    b.load_state_dict(a.state_dict(), strict=False)
    return a, b


# ----------------------------------------------------------------------------- defaults


def test_defaults_are_the_score_closed_form_bit_for_bit():
    spec = DepthSpec(steps=3, dt=0.5)
    assert (spec.inject, spec.init_state, spec.train_steps, spec.backprop_steps) == (
        "none",
        "input",
        "fixed",
        None,
    )
    assert (spec.solver, spec.halt, spec.train_dt) == ("unroll", "state", "fixed")
    depth = RecurrentDepth(_tanh_block, spec, 5)
    assert all(k.startswith("blocks.") for k in depth.state_dict())
    h = torch.randn(4, 5)
    ref = h
    for _ in range(3):
        ref = ref + 0.5 * (depth.blocks[0](ref) - ref)
    assert torch.equal(depth(h), ref)  # the same operations in one process: the same bits
    assert depth.last_nfe == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"inject": "mul"}, "valid inject: none, add, concat"),
        ({"init_state": "zeros"}, "needs inject=add or inject=concat"),
        ({"init_state": "random", "inject": "add", "init_std": 0}, "init_std must be > 0"),
        ({"train_steps": "poisson:3"}, "train_steps must be fixed, uniform"),
        ({"train_steps": "uniform:3"}, "takes two numbers"),
        ({"train_steps": "uniform:0,3"}, "1 <= a <= b"),
        ({"train_steps": "uniform:2,6", "share": False}, "needs a shared depth"),
        ({"train_steps": "lognormal_poisson:0,1"}, "mean > 0"),
        ({"train_dt": "free"}, "valid train_dt"),
        ({"backprop_steps": 0}, "backprop_steps must be an integer >= 1"),
        ({"solver": "newton"}, "valid solver"),
        ({"solver": "fixed_point"}, "inject=add or concat"),
        ({"solver": "fixed_point", "inject": "add", "update": "residual"}, "contractive"),
        ({"solver": "fixed_point", "inject": "add", "backprop_steps": 2}, "cannot be combined"),
        ({"solver_max_iter": 1}, "solver_max_iter must be an integer >= 2"),
        ({"halt": "entropy"}, "valid halt: state, kl"),
    ],
)
def test_dial_fields_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthSpec(**kwargs)


# ----------------------------------------------------------------------------- injection


def test_inject_add_and_concat_see_the_input_at_every_step():
    add, concat = _pair(
        {"steps": 3, "dt": 0.5, "inject": "add"}, {"steps": 3, "dt": 0.5, "inject": "concat"}
    )
    block = add.blocks[0]
    e = torch.randn(4, 5)
    h = e
    for _ in range(3):
        h = h + 0.5 * (block(h + e) - h)
    assert torch.equal(add(e), h)
    assert concat.injection.weight.shape == (5, 10)
    assert torch.allclose(concat(e), h, atol=1e-12)  # W = [I, I] starts as add
    concat(e).sum().backward()
    assert concat.injection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs the state width"):
        RecurrentDepth(_tanh_block, DepthSpec(inject="concat"))


@pytest.mark.parametrize("init", ["zeros", "random"])
def test_init_state_starts_away_from_the_input(init):
    depth = RecurrentDepth(
        _tanh_block, DepthSpec(steps=1, dt=1.0, inject="add", init_state=init, init_std=2.0), 5
    )
    e = torch.randn(3, 7, 5)  # (B, T, C)
    torch.manual_seed(1)
    out = depth(e)
    torch.manual_seed(1)
    h0 = torch.zeros_like(e) if init == "zeros" else 2.0 * torch.randn_like(e)
    assert out.shape == e.shape
    assert torch.equal(out, h0 + 1.0 * (depth.blocks[0](h0 + e) - h0))  # one Euler step


# ----------------------------------------------------------------------------- random depth


def test_drawn_steps_are_a_function_of_seed_and_index():
    spec = DepthSpec(steps=4, train_steps="uniform:2,6")
    a = RecurrentDepth(_tanh_block, spec)
    b = RecurrentDepth(_tanh_block, spec)
    draws = [a.draw_steps(i, seed=3) for i in range(200)]
    assert draws == [b.draw_steps(i, seed=3) for i in range(200)]  # any process, any order
    assert draws[::-1] == [b.draw_steps(i, seed=3) for i in reversed(range(200))]
    assert set(draws) == {2, 3, 4, 5, 6}
    assert draws != [a.draw_steps(i, seed=4) for i in range(200)]
    huginn = RecurrentDepth(_tanh_block, DepthSpec(steps=4, train_steps="lognormal_poisson:4,0.5"))
    counts = torch.tensor([huginn.draw_steps(i) for i in range(2000)], dtype=torch.float64)
    assert counts.min() >= 1 and counts.max() <= 16
    assert 3.5 < counts.mean() < 5.5  # 1 + Poisson(mean 4) - capping


@pytest.mark.parametrize("train_dt, dt", [("fixed", 0.5), ("horizon", 4 * 0.5 / 6)])
def test_training_runs_the_drawn_count_and_evaluation_the_trained_one(train_dt, dt):
    depth = RecurrentDepth(
        _tanh_block, DepthSpec(steps=4, dt=0.5, train_steps="uniform:6,6", train_dt=train_dt)
    )
    h = torch.randn(2, 5)
    assert depth.draw_steps(0) == 6
    ref = h
    for _ in range(6):
        ref = ref + dt * (depth.blocks[0](ref) - ref)
    assert depth.nfe == 6 and depth.dts() == [dt] * 6
    assert torch.allclose(depth(h), ref, atol=1e-12)
    depth.eval()
    assert depth.nfe == 4 and depth.dts() == [0.5] * 4


# ----------------------------------------------------------------------------- truncated backprop


@pytest.mark.parametrize("inject", ["none", "add"])
def test_backprop_steps_is_no_grad_then_k_steps_with_grad(inject):
    steps, k = 5, 2
    full, trunc = _pair(
        {"steps": steps, "dt": 0.5, "inject": inject},
        {"steps": steps, "dt": 0.5, "inject": inject, "backprop_steps": k},
    )
    block = full.blocks[0]
    e = torch.randn(3, 5, requires_grad=True)
    inj = e if inject == "add" else 0.0
    with torch.no_grad():  # the hand-written reference
        h = e
        for _ in range(steps - k):
            h = h + 0.5 * (block(h + inj) - h)
    for _ in range(k):
        h = h + 0.5 * (block(h + inj) - h)
    ref_grads = torch.autograd.grad(h.pow(2).sum(), [e, *block.parameters()], allow_unused=True)
    out = trunc(e)
    grads = torch.autograd.grad(
        out.pow(2).sum(), [e, *trunc.blocks[0].parameters()], allow_unused=True
    )
    assert torch.equal(out, h)
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    # k = steps is full backprop.
    every = RecurrentDepth(_tanh_block, DepthSpec(steps=steps, dt=0.5, inject=inject,
                                                   backprop_steps=steps))  # fmt: skip
    every.load_state_dict(full.state_dict())
    x = torch.randn(3, 5)
    full(x).sum().backward()
    every(x).sum().backward()
    for a, b in zip(full.parameters(), every.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


# ----------------------------------------------------------------------------- halting


def _scaled_rows():
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, 5, generator=g) * torch.tensor([[0.01], [1], [30], [0.1], [3], [100]])


def test_halting_stops_samples_independently_and_never_changes_running_ones():
    torch.manual_seed(0)
    depth = RecurrentDepth(Contractive, DepthSpec(steps=30, dt=0.5, adaptive_eps=1e-3)).eval()
    h = _scaled_rows()
    with torch.no_grad():
        out = depth(h)
    used = depth.last_steps_used
    assert len(set(used.tolist())) > 2 and used.max() < 30  # stopped at different steps
    assert depth.last_nfe == pytest.approx(float(used.double().mean()))
    for i, n in enumerate(used.tolist()):  # each sample = a full run of its own step count
        ref = RecurrentDepth(Contractive, DepthSpec(steps=n, dt=0.5))
        ref.load_state_dict(depth.state_dict())
        with torch.no_grad():
            assert torch.allclose(out[i], ref(h)[i], rtol=1e-12, atol=1e-14)
        # A sample's result does not depend on the others: alone it stops at the same step.
        with torch.no_grad():
            alone = depth(h[i : i + 1])
        assert depth.last_steps_used.tolist() == [n]
        assert torch.allclose(alone[0], out[i], rtol=1e-12, atol=1e-14)


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Contractive()
        self.rows = 0

    def forward(self, h):
        self.rows += h.shape[0]
        return self.inner(h)


def test_finished_samples_leave_the_computation():
    depth = RecurrentDepth(Counting, DepthSpec(steps=30, dt=0.5, adaptive_eps=1e-3)).eval()
    with torch.no_grad():
        depth(_scaled_rows())
    block = depth.blocks[0]
    assert block.rows == int(depth.last_steps_used.sum()) < 6 * 30  # rows evaluated = spent


class GraphMean(nn.Module):
    """``F(h) = tanh(W mean_{j -> i} h_j + b)``: couples the atoms of a molecule."""

    def __init__(self):
        super().__init__()
        self.lin = Contractive()

    def forward(self, h, edge_index):
        src, dst = edge_index
        agg = torch.zeros_like(h).index_add_(0, dst, h[src])
        deg = torch.zeros(h.shape[0], dtype=h.dtype).index_add_(
            0, dst, torch.ones_like(dst, dtype=h.dtype)
        )
        return self.lin(agg / deg.clamp_min(1)[:, None] + h)


def test_graph_halting_stops_whole_molecules_and_cuts_the_graph():
    from score_exp.models.mol_gnn import keep_nodes

    # Three molecules: a 2-atom, a 3-atom chain and a 2-atom one, at very different scales.
    batch = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    pairs = [(0, 1), (2, 3), (3, 4), (5, 6)]
    edge_index = torch.tensor([[a for p in pairs for a in (p[0], p[1])],
                               [b for p in pairs for b in (p[1], p[0])]])  # fmt: skip
    h = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    h = h * torch.tensor([0.01, 0.01, 1.0, 1.0, 1.0, 50.0, 50.0])[:, None]
    depth = RecurrentDepth(GraphMean, DepthSpec(steps=40, dt=0.5, adaptive_eps=1e-4)).eval()
    with torch.no_grad():
        out = depth(h, edge_index=edge_index, group=batch, select=keep_nodes)
    used = depth.last_steps_used
    assert used.shape == (3,) and len(set(used.tolist())) > 1
    for m, n in enumerate(used.tolist()):  # each molecule = its own full run of n steps
        rows = batch == m
        ref = RecurrentDepth(GraphMean, DepthSpec(steps=n, dt=0.5))
        ref.load_state_dict(depth.state_dict())
        with torch.no_grad():
            full = ref(h, edge_index=edge_index)
        assert torch.allclose(out[rows], full[rows], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="needs select="):
        depth(h, edge_index=edge_index, group=batch)


def test_kl_halting_compares_successive_readouts():
    torch.manual_seed(0)
    spec = DepthSpec(steps=30, dt=0.5, adaptive_eps=1e-6, halt="kl")
    depth = RecurrentDepth(Contractive, spec).eval()
    head = nn.Linear(5, 7)
    h = _scaled_rows().reshape(2, 3, 5)  # (B, T, C): two sequences
    with torch.no_grad():
        out = depth(h, readout=head)
    used = depth.last_steps_used
    assert used.shape == (2,) and (used < 30).all()
    n = int(used[0])  # at its last step the KL fell below eps, not before
    ref = RecurrentDepth(Contractive, DepthSpec(steps=n, dt=0.5))
    ref.load_state_dict(depth.state_dict())
    with torch.no_grad():
        assert torch.allclose(out[0], ref(h)[0], rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="must pass readout="):
        depth(h)


def test_the_halting_criterion_is_chosen_at_evaluation():
    torch.manual_seed(0)
    trained = RecurrentDepth(Contractive, DepthSpec(steps=30, dt=0.5)).eval()  # halt="state"
    kl = RecurrentDepth(Contractive, DepthSpec(steps=30, dt=0.5, adaptive_eps=1e-6, halt="kl"))
    kl.load_state_dict(trained.state_dict())
    head = nn.Linear(5, 7)
    h = _scaled_rows().reshape(2, 3, 5)  # (B, T, C)
    with torch.no_grad():
        ref = kl.eval()(h, readout=head)
        with trained.discretised(adaptive_eps=1e-6, halt="kl") as d:
            out = trained(h, readout=head)
        assert d.halt == "kl" and torch.equal(out, ref)
        assert torch.equal(trained.last_steps_used, kl.last_steps_used)
        with trained.discretised(adaptive_eps=1e-6) as d:  # None: the spec's
            trained(h)
        assert d.halt == "state"
    with pytest.raises(ValueError, match="halt must be one of state, kl, got 'kll'"):
        trained.discretised(adaptive_eps=1e-6, halt="kll")


def test_halting_via_discretised_and_evaluations_spent():
    depth = RecurrentDepth(Contractive, DepthSpec(steps=30, dt=0.5)).eval()
    with torch.no_grad(), depth.discretised(adaptive_eps=1e-3) as d:
        depth(_scaled_rows())
    assert d.nfe == 30 and depth.last_nfe < 30
    with torch.no_grad(), depth.discretised(adaptive_eps=1e-300):
        depth(torch.randn(2, 5))
    used, spent = depth.last_steps_used, depth.last_nfe * len(depth.last_steps_used)
    assert spent == 2 * 30 and used.tolist() == [30, 30]  # no eps: nobody stops


# ----------------------------------------------------------------------------- fixed point


def test_anderson_reaches_the_tolerance_on_a_contraction():
    f = Contractive()
    h0 = torch.randn(4, 5)
    with torch.no_grad():
        h, iterations, res, converged, evals = anderson(f, h0, tol=1e-6, max_iter=50)
        assert converged.all() and (res < 1e-6).all() and evals == int(iterations.max()) < 50
        assert ((f(h) - h).norm() / f(h).norm()) < 1e-6
        # Picard iteration needs more evaluations to the same tolerance (||A|| = 0.5).
        x, picard = h0, 0
        while ((f(x) - x).norm() / f(x).norm()) >= 1e-6:
            x, picard = f(x), picard + 1
        assert evals < picard


class Tanh(nn.Module):
    """``F(h) = tanh(h A^T + b)``, ``A`` scaled to a spectral radius ``radius`` (float64)."""

    def __init__(self, radius: float, seed: int, d: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        A = torch.randn(d, d, generator=g, dtype=torch.float64)
        self.b = nn.Parameter(0.3 * torch.randn(d, generator=g, dtype=torch.float64))
        self.A = nn.Parameter(radius * A / torch.linalg.eigvals(A).abs().max())

    def forward(self, h):
        return torch.tanh(h @ self.A.T + self.b)


def _picard(f, h, iters: int = 5000):
    """The float64 reference: ``iters`` Picard steps; the state and its per-row residual."""
    with torch.no_grad():
        for _ in range(iters):
            h = f(h)
        fh = f(h)
        return h, (fh - h).norm(dim=1) / fh.norm(dim=1)


def _fixed_point_depth(block, tol=1e-4, max_iter=30, grad="jfb"):
    spec = DepthSpec(steps=4, dt=0.5, inject="add", solver="fixed_point", solver_tol=tol,
                     solver_max_iter=max_iter, solver_grad=grad)  # fmt: skip
    return RecurrentDepth(lambda: block, spec)


@pytest.mark.parametrize("grouped", [False, True], ids=["rows", "groups"])
def test_a_sample_is_solved_as_if_alone_in_its_batch(grouped):
    # Per-sample Anderson: each sample's own history and stopping test. Solved in a batch of 8
    # or alone, a sample takes the same iterations and reaches the same point up to float64
    # rounding (the batch's matrix products round differently from one row's). Before, the
    # batch was one vector with one stopping test: 8.7e-6 apart at the default tolerance.
    block = Tanh(radius=0.9, seed=1)
    g = torch.Generator().manual_seed(2)
    scales = torch.tensor([0.05, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0], dtype=torch.float64)
    e = torch.randn(8, 5, generator=g, dtype=torch.float64) * scales[:, None]
    group = None
    if grouped:  # a "molecule" of 1-3 rows per sample, F row-wise: solved as one vector each
        group = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6, 7])
        e = e[group] * (1 + 0.1 * torch.arange(len(group), dtype=torch.float64))[:, None]
    depth = _fixed_point_depth(block).eval()
    with torch.no_grad():
        out = depth(e, group=group)
    iterations, residual = depth.last_iterations, depth.last_residual
    assert depth.last_converged.all() and (residual < 1e-4).all()
    assert len(set(iterations.tolist())) > 1  # the samples stopped at different iterations
    for i in range(8):
        rows = (group == i) if grouped else torch.arange(8) == i
        with torch.no_grad():
            alone = depth(e[rows], group=torch.zeros(int(rows.sum()), dtype=torch.long)
                          if grouped else None)  # fmt: skip
        torch.testing.assert_close(out[rows], alone, rtol=1e-12, atol=1e-14)
        assert depth.last_iterations.tolist() == [iterations[i].item()]
        torch.testing.assert_close(depth.last_residual, residual[i : i + 1], rtol=1e-9, atol=0)


def test_fixed_points_match_a_float64_picard_reference_on_a_contraction():
    block = Contractive().double()  # ||A|| = 0.5: Picard converges from anywhere
    scale = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0, 30.0], dtype=torch.float64)
    e = torch.randn(6, 5, dtype=torch.float64) * scale[:, None]
    ref, ref_res = _picard(lambda h: block(h + e), torch.zeros_like(e), iters=200)
    assert (ref_res < 1e-15).all()
    for tol in (1e-4, 1e-8):
        depth = _fixed_point_depth(block, tol=tol).eval()
        with torch.no_grad():
            out = depth(e)
        assert depth.last_converged.all() and (depth.last_residual < tol).all()
        assert (depth.last_iterations < 30).all()
        assert depth.last_nfe == depth.last_iterations.max() + 1
        # Within a contraction factor of the reported residual (||A|| = 0.5).
        err = (out - ref).norm(dim=1) / ref.norm(dim=1)
        assert (err <= 2 * depth.last_residual).all(), (err, depth.last_residual)
        if tol == 1e-8:
            assert err.max() < 5e-8


def test_a_non_converging_block_is_reported_with_its_residual():
    # A block whose fixed point repels Picard iteration (spectral radius of A 1.2) for samples
    # with no input (e = 0); inputs of scale 2-4 saturate tanh and make the same block contract.
    block = Tanh(radius=1.2, seed=21)
    g = torch.Generator().manual_seed(1)
    scale = torch.tensor([0, 0, 0, 0, 2, 2, 4, 4], dtype=torch.float64)
    e = torch.randn(8, 5, generator=g, dtype=torch.float64) * scale[:, None]
    hard = scale == 0
    ref, ref_res = _picard(lambda h: block(h + e), torch.zeros_like(e))
    assert (ref_res[hard] > 1e-2).all() and (ref_res[~hard] < 1e-14).all()
    with torch.no_grad():  # the Jacobian at the fixed point (Newton's) has radius > 1
        x = torch.zeros(5, dtype=torch.float64)
        for _ in range(50):
            J = torch.autograd.functional.jacobian(block, x)
            x = x - torch.linalg.solve(J - torch.eye(5, dtype=torch.float64), block(x) - x)
        assert (block(x) - x).norm() < 1e-12
        assert torch.linalg.eigvals(torch.autograd.functional.jacobian(block, x)).abs().max() > 1
    depth = _fixed_point_depth(block).train()  # the default budget: tol 1e-4, 30 evaluations
    e.requires_grad_(True)
    out = depth(e)
    out.sum().backward()  # training goes on; the record says what it got
    assert depth.last_converged.tolist() == (~hard).tolist()
    assert (depth.last_residual[hard] > 100 * 1e-4).all()
    assert (depth.last_iterations[hard] == 30).all() and (depth.last_iterations[~hard] < 30).all()
    assert depth.last_nfe == 31
    # The converged samples are at Picard's fixed point (to the tolerance), the others are not.
    err = (out.detach() - ref).norm(dim=1) / ref.norm(dim=1)
    assert (err[~hard] < 1e-3).all() and (err[hard] > 1e-2).all()
    # The residual reported is the solver's: with 2 evaluations, h1 = F(h0), h = F(h1).
    with torch.no_grad():
        sol = anderson(lambda h: block(h + e), torch.zeros_like(e), 1e-4, max_iter=2)
        h1 = block(e)
        torch.testing.assert_close(sol.h, block(h1 + e), rtol=0, atol=0)
        want = (sol.h - h1).norm(dim=1) / sol.h.norm(dim=1)
        torch.testing.assert_close(sol.residual, want, rtol=1e-15, atol=0)
        assert not sol.converged.any() and sol.iterations.tolist() == [2] * 8


def test_implicit_gradient_is_the_exact_inverse_jacobian_formula():
    # dL/dtheta = dF/dtheta^T g with g = (I - J)^-T dL/dh* per sample, J = dF/dh at h*.
    block = Contractive().double()
    depth = _fixed_point_depth(block, tol=1e-12, max_iter=100, grad="implicit").train()
    e = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64)
    params = [e, block.A, block.b]
    got = torch.autograd.grad((depth(e) * w).sum(), params)
    assert depth.last_converged.all()
    h_star = depth(e).detach()
    eye = torch.eye(5, dtype=torch.float64)
    g = torch.stack([
        torch.linalg.solve((eye - torch.autograd.functional.jacobian(
            lambda h, i=i: block(h + e[i].detach()), h_star[i])).T, w[i])
        for i in range(4)
    ])  # fmt: skip
    want = torch.autograd.grad(block(h_star + e), params, g)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() <= 4e-8 * b.abs().max(), (a - b).abs().max()


def test_fixed_point_solver_output_and_jacobian_free_gradient():
    spec = DepthSpec(steps=4, dt=0.5, inject="add", solver="fixed_point", solver_tol=1e-12,
                     solver_max_iter=60)  # fmt: skip
    depth = RecurrentDepth(Contractive, spec)
    block = depth.blocks[0]
    e = torch.randn(3, 5, requires_grad=True)
    out = depth(e)
    assert depth.last_nfe <= 101
    with torch.no_grad():  # the fixed point of h -> F(h + e)
        assert torch.allclose(block(out + e), out, atol=1e-8)
    # JFB: the gradient of one F step at the (detached) fixed point, by definition.
    h_star = out.detach()
    ref = block(h_star + e)
    params = [e, *block.parameters()]
    g_ref = torch.autograd.grad(ref.pow(2).sum(), params)
    g = torch.autograd.grad(depth(e).pow(2).sum(), params)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-10)
    # The unrolled contractive depth converges to the same fixed point.
    unrolled = RecurrentDepth(Contractive, DepthSpec(steps=200, dt=0.5, inject="add"))
    unrolled.load_state_dict(depth.state_dict())
    with torch.no_grad():
        assert torch.allclose(unrolled(e), out, atol=1e-9)


def test_implicit_gradient_agrees_with_finite_differences_in_float64():
    def solve(depth, e):  # the output at the fixed point h* = F(h* + e), to the last bits
        return depth(e)

    spec = DepthSpec(steps=4, dt=0.5, inject="add", solver="fixed_point", solver_tol=1e-13,
                     solver_max_iter=200, solver_grad="implicit")  # fmt: skip
    depth = RecurrentDepth(Contractive, spec).double()
    jfb = RecurrentDepth(Contractive, dataclasses.replace(spec, solver_grad="jfb")).double()
    jfb.load_state_dict(depth.state_dict())
    assert "solver_grad='implicit'" in repr(depth)
    e = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64)
    params = [e, *depth.parameters()]
    g = torch.autograd.grad((solve(depth, e) * w).sum(), params)
    g_jfb = torch.autograd.grad((solve(jfb, e) * w).sum(), [e, *jfb.parameters()])
    # Central differences of the loss, every entry of e, A and b.
    eps = 1e-6
    for p, gp, gj in zip(params, g, g_jfb, strict=True):
        fd = torch.zeros_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                p.view(-1)[i] += eps
                up = (solve(depth, e) * w).sum()
                p.view(-1)[i] -= 2 * eps
                down = (solve(depth, e) * w).sum()
                p.view(-1)[i] += eps
                fd.view(-1)[i] = (up - down) / (2 * eps)
        assert torch.allclose(gp, fd, rtol=1e-6, atol=1e-8), (gp - fd).abs().max()
        assert not torch.allclose(gj, fd, rtol=1e-2, atol=1e-3)  # JFB is another gradient
    with pytest.raises(ValueError, match="solver_grad=implicit .* needs solver=fixed_point"):
        DepthSpec(solver_grad="implicit")


# ----------------------------------------------------------------------------- the real CLI

TASKS = {
    "esol_mlp": ["trainer.max_epochs=1", "task.model.hidden=32"],
    "esol_gnn": [
        "task=esol_gnn",
        "depth=score025",
        "trainer.max_epochs=1",
        "task.model.hidden=32",
        "task.data.batch_size=128",
    ],  # fmt: skip
    "shakespeare_char_cpu": [
        "task=shakespeare_char_cpu",
        "depth=score",
        "task.max_steps=8",
        "task.val_check_interval=4",
        "task.data.eval_iters=2",
    ],  # fmt: skip
}
UNROLLED = ["depth.steps=2", "trainer.log_every_n_steps=1", "depth.inject=concat", "depth.init_state=random",
            "depth.train_steps='uniform:1,3'", "depth.train_dt=horizon",
            "depth.backprop_steps=1", "depth.adaptive_eps=0.5"]  # fmt: skip
FIXED_POINT = ["depth.steps=2", "trainer.log_every_n_steps=1", "depth.inject=add",
               "depth.solver=fixed_point", "depth.solver_max_iter=4"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("dial", ["unrolled", "fixed_point"])
def test_cli_trains_every_task_with_the_dial_fields(tmp_path, task, dial):
    import csv

    from conftest import cli_env, load_results, train_cli

    over = UNROLLED if dial == "unrolled" else FIXED_POINT
    if task == "shakespeare_char_cpu" and dial == "unrolled":
        over = [*over, "depth.halt=kl"]
    implicit = task != "esol_mlp" and dial == "fixed_point"  # the MLP keeps the default, jfb
    if implicit:
        over = [*over, "depth.solver_grad=implicit"]
    run = tmp_path / "run"
    out = train_cli(run, *TASKS[task], *over, env=cli_env(OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = load_results(run)
    assert r["status"] == "ok"
    if dial == "unrolled":
        assert r["depth"]["inject"] == "concat" and r["depth"]["train_steps"] == "uniform:1,3"
        assert r["depth"]["backprop_steps"] == 1 and r["depth"]["init_state"] == "random"
        with open(run / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        drawn = {float(x["depth/train_steps"]) for x in rows if x.get("depth/train_steps")}
        assert drawn and drawn <= {1.0, 2.0, 3.0}
        assert r["nfe"] == 2  # evaluation runs depth.steps, whatever training drew last
    else:
        assert r["depth"]["solver"] == "fixed_point" and r["depth"]["inject"] == "add"
        assert r["depth"].get("solver_grad", "jfb") == ("implicit" if implicit else "jfb")
        _check_solver_record(r["solver"], run, out.stderr)


def _check_solver_record(solver: dict, run, stderr: str) -> None:
    """results.json's "solver", metrics.csv's depth/solver_*, and the one-line warning."""
    import csv

    assert (solver["tol"], solver["max_iter"]) == (1e-4, 4)
    for stage in ("train", "test"):
        assert 0 <= solver[stage]["converged"] <= 1 and solver[stage]["max_residual"] >= 0
        assert solver[stage]["samples"] > 0
    with open(run / "metrics.csv") as f:
        rows = [x for x in csv.DictReader(f) if x.get("depth/solver_converged")]
    assert rows and all(0 <= float(x["depth/solver_converged"]) <= 1 for x in rows)
    largest = max(float(x["depth/solver_max_residual"]) for x in rows)
    assert 0 < largest <= solver["train"]["max_residual"]  # logged steps are a subset
    warned = [line for line in stderr.splitlines() if "fixed point: only" in line]
    if solver["train"]["converged"] < 0.5:  # 4 evaluations: mostly short of 1e-4
        assert len(warned) == 1
        assert "depth.solver_max_iter=4" in warned[0] and "depth.solver_tol=0.0001" in warned[0]
    else:
        assert not warned


@pytest.mark.slow
def test_score_eval_records_the_fixed_point_convergence(tmp_path):
    import csv

    from conftest import cli_env, load_results, run_cli, train_cli

    run, env = tmp_path / "run", cli_env(OMP_NUM_THREADS="1")
    out = train_cli(run, *TASKS["esol_mlp"], *FIXED_POINT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    test = load_results(run)["solver"]["test"]
    out = run_cli(f"run_dir={run}", module="score_exp.cli.eval", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(run / "eval.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    # The same checkpoint on the same split: the same solves as the run's own test pass.
    assert float(row["solver_converged"]) == round(test["converged"], 4)
    assert float(row["solver_max_residual"]) == pytest.approx(test["max_residual"], rel=1e-3)
    assert "solver_converged" in out.stdout and "solver_max_residual" in out.stdout


@pytest.mark.slow
def test_score_eval_records_the_evaluations_spent_when_halting(tmp_path):
    import csv

    from conftest import cli_env, run_cli, train_cli

    run = tmp_path / "run"
    out = train_cli(run, *TASKS["esol_mlp"], "depth.steps=8", env=cli_env(OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_cli(f"run_dir={run}", "depth.adaptive_eps=1e-9,10", module="score_exp.cli.eval",
                  env=cli_env(OMP_NUM_THREADS="1"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with open(run / "eval.csv", newline="") as f:
        rows = {float(r["adaptive_eps"]): r for r in csv.DictReader(f)}
    assert float(rows[1e-9]["nfe_spent"]) == 8  # nobody stops
    assert float(rows[10.0]["nfe_spent"]) == 1  # everybody stops after one step
    assert "nfe_spent" in out.stdout


@pytest.mark.slow
def test_score_eval_halts_a_language_model_on_kl(tmp_path):
    import csv

    from conftest import cli_env, run_cli, train_cli

    run, env = tmp_path / "run", cli_env(OMP_NUM_THREADS="1")
    out = train_cli(run, *TASKS["shakespeare_char_cpu"], env=env)  # trained with halt=state
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_cli(f"run_dir={run}", "depth.steps=8", "depth.halt=kl",
                  "depth.adaptive_eps=1e-12,100", module="score_exp.cli.eval", env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    with open(run / "eval.csv", newline="") as f:
        rows = {float(r["adaptive_eps"]): r for r in csv.DictReader(f)}
    assert {r["halt"] for r in rows.values()} == {"kl"}
    assert float(rows[1e-12]["nfe_spent"]) == 8  # nobody stops
    assert float(rows[100.0]["nfe_spent"]) == 1  # all stop after one step (KL vs the input's)
    out = run_cli(f"run_dir={run}", "depth.adaptive_eps=0.1", "depth.halt=kll",
                  module="score_exp.cli.eval", env=env)  # fmt: skip
    assert out.returncode == 2 and "halt must be one of state, kl, got 'kll'" in out.stderr


# ----------------------------------------------------------------------------- ANCRe, residual


def test_ancre_residual_starts_as_the_chain_bit_for_bit_and_learns():
    chain, ancre = _pair(
        {"steps": 4, "dt": 0.5},
        {"steps": 4, "dt": 0.5, "connect": "ancre", "ancre_param": "residual"},
    )
    h = torch.randn(3, 5)
    assert torch.equal(ancre(h), chain(h))
    w = ancre.connection_weights()
    assert torch.equal(w[:, :4], torch.eye(4)) and "ancre_param='residual'" in repr(ancre)
    ancre(h).pow(2).sum().backward()
    g = ancre.mixing.residual.grad
    assert (g.tril(-1)[1:].abs().sum(1) > 0).all()  # every row with a choice learns at init
    assert torch.equal(g.triu(), torch.zeros(4, 4))  # the diagonal and above are unused
    # A hand-written mixture with random coefficients.
    with torch.no_grad():
        ancre.mixing.residual.copy_(0.2 * torch.randn(4, 4))
    a, block = ancre.mixing.residual.detach(), ancre.blocks[0]
    states = [h]
    for j in range(4):
        x = states[j] + sum(a[j, i] * (states[i] - states[j]) for i in range(j))
        states.append(x + 0.5 * (block(x) - x))
    assert torch.allclose(ancre(h), states[-1], atol=1e-12)
    w = ancre.connection_weights()
    assert torch.allclose(w.sum(1), torch.ones(4)) and torch.equal(w.triu(1), torch.zeros(4, 5))


@pytest.mark.slow
def test_random_depth_draws_the_same_counts_on_one_and_two_processes(tmp_path):
    """Two gloo ranks drawing other counts than one process would train other weights."""
    import math

    from conftest import cli_env, load_results, train_cli

    tiny = ["trainer.max_epochs=2", "task.model.hidden=32", "task.model.dropout=0",
            "depth.train_steps='uniform:1,4'", "depth.train_dt=horizon"]  # fmt: skip
    env = cli_env(OMP_NUM_THREADS="1")
    out = train_cli(tmp_path / "ddp", "trainer=ddp_cpu", *tiny, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    out = train_cli(tmp_path / "one", *tiny, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = load_results(tmp_path / "ddp"), load_results(tmp_path / "one")
    assert a["status"] == b["status"] == "ok"
    assert a["best_val"]["step"] == b["best_val"]["step"]
    for key in ("rmse", "mae", "r2"):  # test_ddp.py: identical steps agree to float rounding
        assert math.isclose(a["test"][key], b["test"][key], rel_tol=1e-5), key
