"""State dicts of depths as the core before its parts became child modules saved them.

``tests/data/legacy_depth_states.json`` holds, for each depth variant whose parameter names moved
when the core's parts became child modules (learned dt, ANCRe mixing, growth, injection, the
PonderNet halting head), the spec, the state dict (key -> shape and float64 values) and the
output of a forward. It was written by this file at commit 24d7fbb (main before the move):
``PYTHONPATH=$PWD .venv/bin/python tests/legacy_depth_states.py``. ``tests/test_core_parts.py``
loads each state dict into today's :class:`RecurrentDepth` and checks the same output. The
generator uses only what both APIs share: the constructor, ``named_parameters``,
``state_dict``, ``set_steps``/``refine`` and the forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from score_exp.core import DepthSpec, RecurrentDepth

PATH = Path(__file__).parent / "data" / "legacy_depth_states.json"
D, B = 3, 2  # state width, batch

# name -> (DepthSpec kwargs, growth calls before saving: ("set_steps", n) or ("refine",))
VARIANTS: dict[str, tuple[dict[str, Any], list[tuple]]] = {
    "learn_dt_global": ({"steps": 3, "dt": 0.3, "learn_dt": "global"}, []),
    "learn_dt_per_step": ({"steps": 3, "dt": 0.4, "learn_dt": "per_step"}, []),
    "ancre_softmax": ({"steps": 3, "dt": 0.5, "connect": "ancre", "ancre_init": 0.8}, []),
    "ancre_residual": ({"steps": 3, "dt": 0.5, "connect": "ancre", "ancre_param": "residual"}, []),
    "growth_shared": (
        {"steps": 4, "dt": 0.25, "growth": [[0, 1], [2, 2], [4, 4]]},
        [("set_steps", 2)],
    ),
    "growth_stacked": (
        {
            "share": False,
            "steps": 4,
            "dt": 0.5,
            "update": "residual",
            "growth": [[0, 1], [2, 2], [4, 4]],
        },  # fmt: skip
        [("refine",)],
    ),
    "inject_concat": ({"steps": 3, "dt": 0.5, "inject": "concat"}, []),
    "inject_add_zeros": ({"steps": 3, "dt": 0.5, "inject": "add", "init_state": "zeros"}, []),
    "ponder": ({"steps": 3, "dt": 0.5, "halt": "ponder"}, []),
    "ponder_halting": ({"steps": 4, "dt": 0.5, "halt": "ponder", "adaptive_eps": 0.6}, []),
}


class Block(nn.Module):
    """``F(h) = tanh(h A^T + b)``."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.zeros(D, D, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(D, dtype=torch.float64))

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(h @ self.A.T + self.b)


def make(name: str) -> RecurrentDepth:
    """The variant's depth, its growth calls applied (its parameters as constructed)."""
    kwargs, calls = VARIANTS[name]
    depth = RecurrentDepth(Block, DepthSpec(**kwargs), width=D).double()
    for call in calls:
        getattr(depth, call[0])(*call[1:])
    return depth


def h0() -> Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(B, D, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [3.0]])


def _generate() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, name in enumerate(VARIANTS):
        depth = make(name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # every parameter away from its initial value
            for p in depth.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        depth.eval()
        with torch.no_grad():
            y = depth(h0())
        state = {
            k: {
                "shape": list(v.shape),
                "dtype": str(v.dtype),
                "values": v.double().reshape(-1).tolist(),
            }
            for k, v in depth.state_dict().items()
        }
        out[name] = {"spec": VARIANTS[name][0], "calls": VARIANTS[name][1], "state_dict": state,
                     "out": y.reshape(-1).tolist(), "out_shape": list(y.shape),
                     "steps_used": None if depth.last_steps_used is None
                     else depth.last_steps_used.tolist()}  # fmt: skip
    return out


def load() -> dict[str, Any]:
    return json.loads(PATH.read_text())


def state_dict(entry: dict[str, Any]) -> dict[str, Tensor]:
    """The stored state dict as tensors of their saved dtype."""
    return {
        k: torch.tensor(v["values"], dtype=getattr(torch, v["dtype"].split(".")[-1])).reshape(
            v["shape"]
        )
        for k, v in entry["state_dict"].items()
    }


if __name__ == "__main__":
    PATH.write_text(json.dumps(_generate(), indent=None) + "\n")
