"""The recurrent-depth core against closed forms, analytic ODE solutions and known counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from score_exp.core import INTEGRATORS, DepthSpec, RecurrentDepth, get_integrator

# Convergence orders and exact comparisons need float64 (the conftest fixture restores it).
pytestmark = pytest.mark.usefixtures("float64")


class Linear(nn.Module):
    """F(h) = h @ A^T, so the contractive ODE is dh/dt = (A - I) h."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, h):
        return h @ self.A.T


def _A(d: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------- registry


def test_registry_orders_and_evals():
    expected = {"euler": (1, 1), "heun": (2, 2), "midpoint": (2, 2), "rk4": (4, 4)}
    assert {k: (v.order, v.evals_per_step) for k, v in INTEGRATORS.items()} == expected
    assert get_integrator("rk4").order == 4
    assert get_integrator("heun").evals_per_step == 2


def test_unknown_integrator_lists_valid_names():
    with pytest.raises(ValueError, match="euler, heun, midpoint, rk4"):
        get_integrator("dopri5")


# ----------------------------------------------------------------------------- DepthSpec


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"update": "additive"}, "valid updates: contractive, residual, none"),
        ({"integrator": "rk45"}, "valid integrators: euler, heun, midpoint, rk4"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"steps": -3}, "steps must be >= 1"),
        ({"steps": 2.5}, "integer"),
        ({"steps": True}, "integer"),
        ({"dt": 0.0}, "dt must be > 0"),
        ({"dt": -1}, "dt must be > 0"),
        ({"dt": float("nan")}, "dt must be > 0"),
        ({"dt": "0.5"}, "dt must be a positive number"),
        ({"update": "none", "integrator": "rk4"}, "must be 'euler'"),
    ],
)
def test_depthspec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthSpec(**kwargs)


def test_depthspec_warns_when_contractive_dt_exceeds_one():
    with pytest.warns(UserWarning, match="no longer a convex combination"):
        DepthSpec(update="contractive", dt=1.5)


def test_depthspec_dt_null_means_one_over_steps_and_nfe():
    spec = DepthSpec(steps=8, dt=None, integrator="rk4")
    assert spec.horizon == pytest.approx(1.0)
    assert RecurrentDepth(nn.Identity, spec).dts() == [1 / 8] * 8
    assert spec.nfe == 32
    assert DepthSpec(steps=3, update="none", dt=None).nfe == 3
    assert DepthSpec(steps=4.0).steps == 4


# ----------------------------------------------------------------------------- semantics


def test_euler_contractive_step_is_the_closed_form():
    block = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
    depth = RecurrentDepth(lambda: block, DepthSpec(share=True, steps=1, dt=0.3))
    h = torch.randn(7, 5)
    assert torch.allclose(depth(h), (1 - 0.3) * h + 0.3 * block(h), atol=1e-12)


def test_residual_and_none_updates():
    block = nn.Sequential(nn.Linear(5, 5), nn.Tanh())
    h = torch.randn(3, 5)
    res = RecurrentDepth(lambda: block, DepthSpec(steps=2, dt=1.0, update="residual"))
    h1 = h + block(h)
    assert torch.allclose(res(h), h1 + block(h1))
    plain = RecurrentDepth(lambda: block, DepthSpec(steps=3, dt=None, update="none"))
    assert torch.allclose(plain(h), block(block(block(h))))


@pytest.mark.parametrize(
    "update, generator",
    [("contractive", lambda A: A - torch.eye(len(A))), ("residual", lambda A: A)],
)
@pytest.mark.parametrize("name", ["euler", "heun", "midpoint", "rk4"])
def test_linear_field_converges_to_matrix_exp_at_the_declared_order(name, update, generator):
    A = _A()
    h0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    T = 1.0
    exact = h0 @ torch.linalg.matrix_exp(generator(A) * T).T
    errors = []
    for steps in (8, 16, 32):
        spec = DepthSpec(share=True, steps=steps, dt=T / steps, update=update, integrator=name)
        depth = RecurrentDepth(lambda: Linear(A), spec)
        with torch.no_grad():
            errors.append((depth(h0) - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    expected = get_integrator(name).order
    assert all(abs(o - expected) < 0.3 for o in orders), (name, errors, orders)


def test_dt_null_integrates_to_time_one():
    A = _A()
    h0 = torch.randn(2, 4)
    depth = RecurrentDepth(lambda: Linear(A), DepthSpec(steps=64, dt=None, integrator="rk4"))
    exact = h0 @ torch.linalg.matrix_exp(A - torch.eye(4)).T
    with torch.no_grad():
        assert torch.allclose(depth(h0), exact, atol=1e-9)


# ----------------------------------------------------------------------------- sharing


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_shared_params_constant_and_stacked_linear_in_steps(steps):
    block_params = _count(nn.Linear(16, 16))
    shared = RecurrentDepth(lambda: nn.Linear(16, 16), DepthSpec(share=True, steps=steps))
    stacked = RecurrentDepth(lambda: nn.Linear(16, 16), DepthSpec(share=False, steps=steps))
    assert _count(shared) == block_params
    assert _count(stacked) == steps * block_params
    assert len(stacked.blocks) == steps and len(shared.blocks) == 1


@pytest.mark.parametrize("name", ["euler", "heun", "rk4"])
@pytest.mark.parametrize("share", [True, False])
def test_gradients_reach_every_block(name, share):
    spec = DepthSpec(share=share, steps=4, dt=0.25, integrator=name)
    depth = RecurrentDepth(lambda: nn.Sequential(nn.Linear(6, 6), nn.Tanh()), spec)
    depth(torch.randn(5, 6)).pow(2).sum().backward()
    for block in depth.blocks:
        for p in block.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0


class CountingBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.calls = 0

    def forward(self, h, scale=1.0):
        self.calls += 1
        return scale * torch.tanh(self.lin(h))


@pytest.mark.parametrize("name", ["euler", "heun", "midpoint", "rk4"])
def test_nfe_counts_and_stacked_stages_use_their_own_block(name):
    spec = DepthSpec(share=False, steps=3, dt=0.3, integrator=name)
    depth = RecurrentDepth(CountingBlock, spec)
    depth(torch.randn(2, 3))
    per_step = get_integrator(name).evals_per_step
    assert [b.calls for b in depth.blocks] == [per_step] * 3
    assert depth.nfe == 3 * per_step == sum(b.calls for b in depth.blocks)


def test_ctx_is_passed_to_every_block_call():
    depth = RecurrentDepth(CountingBlock, DepthSpec(share=True, steps=2, dt=1.0, update="none"))
    h = torch.randn(2, 3)
    block = depth.blocks[0]
    assert torch.allclose(depth(h, scale=0.0), torch.zeros(2, 3))
    assert torch.allclose(depth(h, scale=2.0), block(block(h, scale=2.0), scale=2.0))


def test_discretised_rediscretises_a_shared_depth():
    A = _A()
    h0 = torch.randn(2, 4)
    depth = RecurrentDepth(lambda: Linear(A), DepthSpec(share=True, steps=4, dt=None))
    ref = RecurrentDepth(
        lambda: Linear(A), DepthSpec(share=True, steps=16, dt=None, integrator="rk4")
    )
    with torch.no_grad():
        with depth.discretised(steps=16, integrator="rk4") as d:
            assert (d.steps, d.dts, d.integrator, d.nfe) == (16, [1 / 16] * 16, "rk4", 64)
            assert depth.nfe == 64 and torch.allclose(depth(h0), ref(h0))
        assert depth.nfe == 4 and depth.dts() == [0.25] * 4  # restored on exit
        with depth.discretised(steps=2, dt=0.5):
            a = depth(h0)
        with depth.discretised(steps=2):  # keep_horizon: T = 1
            assert torch.equal(depth(h0), a)
    stacked = RecurrentDepth(lambda: Linear(A), DepthSpec(share=False, steps=4))
    with pytest.raises(ValueError, match="cannot run 8 steps"):
        stacked.discretised(steps=8)


def test_discretised_keeps_the_horizon_or_the_dt():
    depth = RecurrentDepth(nn.Identity, DepthSpec(steps=4, dt=0.5))  # T = 2
    with depth.discretised(steps=8) as d:
        assert d.dts == [0.25] * 8
    with depth.discretised(steps=8, keep_horizon=False) as d:
        assert d.dts == [0.5] * 8
    with depth.discretised(dt=0.1, integrator="heun") as d:
        assert d.dts == [0.1] * 4 and d.nfe == 8


@pytest.mark.parametrize(
    "spec, kwargs, match",
    [
        ({}, {"steps": 0}, "steps must be an integer >= 1"),
        ({}, {"dt": 0.0}, "dt must be > 0"),
        ({}, {"dt": -1}, "dt must be > 0"),
        ({}, {"integrator": "rk45"}, "valid integrators"),
        ({}, {"adaptive_eps": 0}, "adaptive_eps must be > 0"),
        ({"share": False}, {"steps": 8}, "needs share=true"),
        ({"connect": "ancre"}, {"steps": 8}, "runs exactly 4 steps"),
        ({"update": "none", "dt": None}, {"integrator": "rk4"}, "only the 'euler'"),
    ],
)
def test_discretised_refuses_what_the_depth_cannot_run(spec, kwargs, match):
    depth = RecurrentDepth(nn.Identity, DepthSpec(**spec))
    with pytest.raises(ValueError, match=match):
        depth.discretised(**kwargs)  # checked before the with block
    assert depth.discretisation.steps == 4  # nothing changed


def test_activation_checkpointing_matches_plain_forward_and_backward():
    torch.manual_seed(0)
    base = DepthSpec(share=True, steps=4, dt=0.5, integrator="heun")
    plain = RecurrentDepth(lambda: nn.Sequential(nn.Linear(6, 6), nn.GELU()), base)
    ckpt = RecurrentDepth(
        lambda: nn.Sequential(nn.Linear(6, 6), nn.GELU()),
        DepthSpec(**{**base.to_dict(), "checkpoint": True}),
    )
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 6)
    out_a, out_b = plain(x), ckpt(x)
    out_a.sum().backward()
    out_b.sum().backward()
    assert torch.allclose(out_a, out_b)
    for pa, pb in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad)


def test_extra_repr_and_reset_parameters():
    depth = RecurrentDepth(
        lambda: nn.Linear(4, 4), DepthSpec(share=False, steps=2, integrator="rk4")
    )
    text = repr(depth)
    assert "share=False" in text and "integrator='rk4'" in text and "nfe=8" in text
    before = depth.blocks[0].weight.detach().clone()
    torch.manual_seed(123)
    depth.reset_parameters()
    assert not torch.equal(before, depth.blocks[0].weight)
