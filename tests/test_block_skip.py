"""``task.model.block_skip``: the paper author's block ``h + F(h)`` under every update, in closed form."""

from __future__ import annotations

import pytest
import torch

from score_exp.core import DepthSpec, RecurrentDepth
from score_exp.models.mlp import MLPBlock, RecurrentMLP
from score_exp.models.mol_gnn import GraphBlock, MolGNN


def _pair(make):
    """The same weights as a plain block and as a skip block."""
    torch.manual_seed(0)
    plain, skip = make(False), make(True)
    skip.load_state_dict(plain.state_dict())
    return plain.eval(), skip.eval()


@pytest.mark.parametrize("dt", [0.25, 0.5])
def test_mlp_block_skip_makes_the_contractive_euler_step_h_plus_dt_f(dt):
    plain, skip = _pair(lambda s: MLPBlock(8, dropout=0.0, skip=s))
    h = torch.randn(5, 8)
    f = plain(h)
    assert torch.allclose(skip(h), h + f)
    # Two contractive Euler steps through the depth: h1 = h + dt F(h), h2 = h1 + dt F(h1).
    spec = DepthSpec(share=True, steps=2, dt=dt, update="contractive", integrator="euler")
    depth = RecurrentDepth(lambda: skip, spec)
    h1 = h + dt * plain(h)
    h2 = h1 + dt * plain(h1)
    assert torch.allclose(depth(h), h2, atol=1e-6)
    # block_skip=false keeps the proposal form: (1 - dt) h + dt F(h).
    depth_plain = RecurrentDepth(
        lambda: plain, DepthSpec(share=True, steps=1, dt=dt, update="contractive")
    )
    assert torch.allclose(depth_plain(h), (1 - dt) * h + dt * f, atol=1e-6)


def test_graph_block_skip_makes_the_contractive_euler_step_h_plus_dt_f():
    plain, skip = _pair(lambda s: GraphBlock("mpnn", 8, edge_dim=3, dropout=0.0, skip=s))
    h = torch.randn(4, 8)
    edge_index = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
    edge_attr = torch.eye(3)[[0, 0, 1, 1, 2, 2]]
    f = plain(h, edge_index, edge_attr)
    assert torch.allclose(skip(h, edge_index, edge_attr), h + f)
    spec = DepthSpec(share=True, steps=1, dt=0.25, update="contractive", integrator="euler")
    depth = RecurrentDepth(lambda: skip, spec)
    out = depth(h, edge_index=edge_index, edge_attr=edge_attr)
    assert torch.allclose(out, h + 0.25 * f, atol=1e-6)


def test_models_pass_block_skip_to_every_block():
    spec = DepthSpec(share=False, steps=3, dt=1.0, update="residual")
    mlp = RecurrentMLP(6, spec, hidden=8, block_skip=True)
    gnn = MolGNN(5, 3, spec, hidden=8, block_skip=True)
    for model in (mlp, gnn):
        blocks = [m for m in model.modules() if isinstance(m, (MLPBlock, GraphBlock))]
        assert len(blocks) == 3 and all(b.skip for b in blocks)
    assert not any(
        b.skip for b in RecurrentMLP(6, spec, hidden=8).modules() if isinstance(b, MLPBlock)
    )
