"""A few training steps of the project's MLP and GNN on fixed random data, in a fresh process, under
one numerics mode: prints ``<model> <sha256 of the trained parameters>`` per line.

    python tests/numerics_probe.py portable      # through score_exp.numerics.enter (may re-exec)
    python tests/numerics_probe.py default

The caller sets the environment (ATEN_CPU_CAPABILITY, MKL_CBWR ...) that the portable mode must
override. Real model classes, real kernels (Linear -> MKL sgemm, LayerNorm, scatter, attention
readout -> ATen's vectorised kernels); random data keeps it to a couple of seconds.
"""

from __future__ import annotations

import hashlib
import sys

from score_exp import numerics

MODE = sys.argv[1]
numerics.enter([f"numerics={MODE}"])  # before torch computes anything, as score-train does

import torch  # noqa: E402
from torch_geometric.data import Data  # noqa: E402

from score_exp.core import DepthSpec  # noqa: E402
from score_exp.models.mlp import RecurrentMLP  # noqa: E402
from score_exp.models.mol_gnn import MolGNN  # noqa: E402

kernels = numerics.apply({"mode": MODE, "threads": 1})


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fit(model: torch.nn.Module, inputs, y: torch.Tensor, steps: int = 5) -> str:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(inputs).view(-1), y)
        loss.backward()
        opt.step()
    return digest(model)


torch.manual_seed(0)
spec = DepthSpec(share=True, steps=4, dt=0.5)
mlp = RecurrentMLP(200, spec, hidden=256, dropout=0.0)
x = torch.randn(128, 200)
print("mlp", fit(mlp, x, torch.randn(128)))

torch.manual_seed(0)
n, e, g = 400, 800, 20  # nodes, edges (both directions), graphs
src = torch.randint(0, n, (e // 2,))
dst = (src + torch.randint(1, 5, (e // 2,))) % n
edge_index = torch.stack(
    [torch.stack([src, dst], 1).flatten(), torch.stack([dst, src], 1).flatten()]
)
edge_attr = (
    torch.nn.functional.one_hot(torch.randint(0, 4, (e // 2,)), 10).float().repeat_interleave(2, 0)
)
batch = torch.arange(n) * g // n
gnn = MolGNN(39, 10, DepthSpec(share=True, steps=4, dt=0.25), hidden=64, dropout=0.0)
graph = Data(x=torch.randn(n, 39), edge_index=edge_index, edge_attr=edge_attr, batch=batch)
graph.num_graphs = g
print("gnn", fit(gnn, graph, torch.randn(g), steps=3))
print("kernels", kernels["cpu_capability"], kernels["mkl_branch"], kernels["threads"])
