"""The portable numerics mode's cost: training steps of the real MLP and GNN (random data of the
ESOL shapes), timed in fresh processes, default vs portable interleaved (this VM drifts); the
default mode with one thread, as the claims targets run it (JOBS runs of 1 thread each), so the
ratio is the kernels' cost alone. Prints the median time per step of each and the ratio.

    .venv/bin/python scripts/numerics_cost.py [--reps 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time
from score_exp import numerics
mode, steps = sys.argv[1], int(sys.argv[2])
numerics.enter([f"numerics={mode}"])
import torch
from torch_geometric.data import Data
from score_exp.core import DepthSpec
from score_exp.models.mlp import RecurrentMLP
from score_exp.models.mol_gnn import MolGNN
numerics.apply({"mode": mode, "threads": 1})
torch.manual_seed(0)
def bench(model, inputs, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    def step():
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(inputs).view(-1), y).backward()
        opt.step()
    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps
mlp = RecurrentMLP(200, DepthSpec(share=True, steps=4, dt=0.5), hidden=256)
x = torch.randn(64, 200)
n, e, g = 1700, 3600, 64  # an ESOL batch of 64 molecules: ~26 atoms, ~28 bonds each
src = torch.randint(0, n, (e // 2,)); dst = (src + torch.randint(1, 5, (e // 2,))) % n
ei = torch.stack([torch.stack([src, dst], 1).flatten(), torch.stack([dst, src], 1).flatten()])
ea = torch.nn.functional.one_hot(torch.randint(0, 4, (e // 2,)), 10).float().repeat_interleave(2, 0)
graph = Data(x=torch.randn(n, 39), edge_index=ei, edge_attr=ea, batch=torch.arange(n) * g // n)
graph.num_graphs = g
gnn = MolGNN(39, 10, DepthSpec(share=True, steps=4, dt=0.25), hidden=64)
print(bench(mlp, x, torch.randn(64)), bench(gnn, graph, torch.randn(g)))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
    base.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    times: dict[str, list[tuple[float, float]]] = {"default": [], "portable": []}
    for i in range(args.reps):
        for mode in ("default", "portable") if i % 2 == 0 else ("portable", "default"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.steps)], env=base,
                                 capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
            times[mode].append((float(out[0]), float(out[1])))
            print(f"rep {i} {mode}: mlp {float(out[0]) * 1e3:.2f} ms/step, gnn {float(out[1]) * 1e3:.2f} ms/step", flush=True)  # fmt: skip
    for j, name in enumerate(
        ("MLP (ESOL descriptors, batch 64)", "MolGNN (ESOL-sized batch of 64)")
    ):
        d = statistics.median(t[j] for t in times["default"])
        q = statistics.median(t[j] for t in times["portable"])
        print(
            f"{name}: default {d * 1e3:.2f} ms/step, portable {q * 1e3:.2f} ms/step, "
            f"portable / default {q / d:.2f}x (median of {args.reps} interleaved runs, 1 thread)"
        )


if __name__ == "__main__":
    main()
