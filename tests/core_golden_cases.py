"""The cases of the core's golden test (``tests/test_core_golden.py``), shared with its generator.

Each case builds a :class:`RecurrentDepth` in float64 from seeded blocks, runs it (train-mode
forward + backward, an evaluation-time re-discretisation, adaptive halting, growth stages, the
trace) and returns named tensors. ``tests/data/core_golden.json`` holds what the ORIGINAL core
(commit 92c1f43, before the core was split into parts) returned for every case; the test asserts
that today's core returns the same tensors to float64 rounding (float64 default dtype; the steps
used exactly; see the test for why not bit for bit). The only thing that differs between the
two APIs is how an evaluation re-discretises the depth, so that is the ``rediscretise`` argument.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from score_exp.core import DepthSpec, RecurrentDepth

D, B = 4, 3  # state width, batch


class Block(nn.Module):
    """``F(h) = scale * tanh(h A^T + b)`` with parameters drawn from a seeded generator."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(0.6 * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, h: Tensor, scale: float = 1.0) -> Tensor:
        return scale * torch.tanh(h @ self.A.T + self.b)


def _factory():
    count = iter(range(1000))
    return lambda: Block(next(count))


def _h0(seed: int = 7) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=torch.float64)


def _spec_cases() -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    for share in (True, False):
        for update in ("contractive", "residual", "none"):
            for integ in ("euler", "heun", "midpoint", "rk4"):
                if update == "none" and integ != "euler":
                    continue
                name = f"{'share' if share else 'stacked'}_{update}_{integ}"
                dt = None if update == "none" else (0.5 if update == "contractive" else 0.3)
                cases[name] = {"share": share, "steps": 3, "dt": dt, "update": update,
                               "integrator": integ}  # fmt: skip
    cases["share_dt_null"] = {"steps": 5, "dt": None}
    cases["checkpoint_heun"] = {"steps": 3, "dt": 0.5, "integrator": "heun", "checkpoint": True}
    cases["checkpoint_stacked"] = {"share": False, "steps": 3, "dt": 0.5, "checkpoint": True}
    cases["ancre_default"] = {"steps": 4, "dt": 0.5, "connect": "ancre"}
    cases["ancre_random"] = {"steps": 4, "dt": 0.4, "connect": "ancre", "ancre_tau": 0.7,
                             "_random_logits": True}  # fmt: skip
    cases["ancre_stacked_rk4"] = {"share": False, "steps": 3, "dt": 0.5, "connect": "ancre",
                                  "ancre_init": 0.8, "integrator": "rk4"}  # fmt: skip
    cases["learn_dt_global"] = {"steps": 3, "dt": 0.3, "learn_dt": "global"}
    cases["learn_dt_per_step"] = {"steps": 3, "dt": None, "learn_dt": "per_step",
                                  "_random_dt": True}  # fmt: skip
    cases["learn_dt_stacked_heun"] = {"share": False, "steps": 3, "dt": 0.4,
                                      "learn_dt": "per_step", "integrator": "heun"}  # fmt: skip
    return cases


# Re-discretisations at evaluation: (case, {steps, dt, integrator, keep_horizon}).
REDISCRETISE = [
    ("share_contractive_euler", {"steps": 6}),
    ("share_contractive_euler", {"steps": 6, "keep_horizon": False}),
    ("share_contractive_euler", {"steps": 6, "integrator": "rk4"}),
    ("share_contractive_euler", {"integrator": "heun"}),
    ("share_contractive_euler", {"dt": 0.25}),
    ("share_contractive_euler", {"steps": 2, "dt": 0.7}),
    ("share_residual_heun", {"steps": 5}),
    ("share_none_euler", {"steps": 5}),
    ("share_dt_null", {"steps": 3}),
    ("share_dt_null", {"steps": 3, "keep_horizon": False}),
    ("stacked_contractive_euler", {"integrator": "midpoint"}),
    ("stacked_residual_euler", {"dt": 0.2}),
    ("learn_dt_per_step", {"steps": 5}),
    ("learn_dt_per_step", {"steps": 5, "keep_horizon": False}),
    ("learn_dt_global", {"steps": 3, "integrator": "rk4"}),
    ("learn_dt_global", {"dt": 0.1}),
    ("ancre_random", {"integrator": "rk4"}),
]


def build(kwargs: dict[str, Any]) -> RecurrentDepth:
    kwargs = dict(kwargs)
    random_logits = kwargs.pop("_random_logits", False)
    random_dt = kwargs.pop("_random_dt", False)
    depth = RecurrentDepth(_factory(), DepthSpec(**kwargs))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        if random_logits:
            depth.mixing.logits.copy_(torch.randn(depth.mixing.logits.shape, generator=g))
        if random_dt:
            depth.step_size.logit.copy_(torch.randn(depth.step_size.logit.shape, generator=g))
    return depth


# The reference file names parameters as the original core did, before the parts owned them.
ORIGINAL_NAMES = {"mixing.logits": "connect_logits", "step_size.logit": "dt_logit"}


def _grads(depth: RecurrentDepth, prefix: str, out: dict[str, Tensor]) -> None:
    for name, p in depth.named_parameters():
        out[f"{prefix}grad.{ORIGINAL_NAMES.get(name, name)}"] = p.grad.detach().clone()


Rediscretise = Callable[[RecurrentDepth, Tensor, dict[str, Any]], Tensor]


def run_all(rediscretise: Rediscretise) -> dict[str, Tensor]:
    """Every case's tensors, keyed ``<case>/<what>``."""
    out: dict[str, Tensor] = {}
    specs = _spec_cases()
    for name, kwargs in specs.items():
        depth = build(kwargs).train()
        h = _h0().requires_grad_(True)
        y = depth(h, scale=0.9)
        (y.pow(2).sum() + y.sum()).backward()
        out[f"{name}/out"] = y.detach().clone()
        out[f"{name}/grad.h0"] = h.grad.detach().clone()
        _grads(depth, f"{name}/", out)
        trace = depth.trace(_h0(8))
        out[f"{name}/trace.rel_change"] = trace["rel_change"]
        out[f"{name}/trace.contraction"] = trace["contraction"]
    for i, (name, over) in enumerate(REDISCRETISE):
        depth = build(specs[name]).eval()
        with torch.no_grad():
            out[f"rediscretise{i}_{name}/out"] = rediscretise(depth, _h0(), over).clone()
    # Adaptive halting: rows of very different scale stop at different steps.
    for name, kwargs in {
        "adaptive_contractive": {"steps": 12, "dt": 0.5, "adaptive_eps": 0.3},
        "adaptive_rk4": {"steps": 10, "dt": 0.5, "integrator": "rk4", "adaptive_eps": 0.3},
        "adaptive_stacked": {"share": False, "steps": 6, "dt": 0.5, "adaptive_eps": 0.5},
    }.items():
        depth = build(kwargs).eval()
        h = _h0() * torch.tensor([[0.01], [1.0], [30.0]], dtype=torch.float64)
        with torch.no_grad():
            out[f"{name}/out"] = depth(h)
        out[f"{name}/steps_used"] = depth.last_steps_used.clone()
    # Growth: a shared depth changes its step count, a stacked one doubles its blocks.
    depth = build({"steps": 4, "dt": 0.25, "growth": [[0, 1], [3, 2], [6, 4]]})
    h = _h0()
    out["growth_shared/stage0"] = depth(h).detach()
    depth.set_steps(2)
    out["growth_shared/stage1"] = depth(h).detach()
    depth.set_steps(3, keep_horizon=False)
    out["growth_shared/stage_free"] = depth(h).detach()
    depth.set_steps(4, keep_horizon=True)
    y = depth(h)
    y.pow(2).sum().backward()
    out["growth_shared/stage2"] = y.detach()
    _grads(depth, "growth_shared/", out)
    depth = build({"share": False, "steps": 4, "dt": 1.0, "update": "residual",
                   "growth": [[0, 1], [2, 2], [4, 4]]})  # fmt: skip
    out["growth_stacked/stage0"] = depth(h).detach()
    depth.refine()
    out["growth_stacked/stage1"] = depth(h).detach()
    with torch.no_grad():
        depth.blocks[1].b.add_(0.1)
    depth.refine()
    y = depth(h)
    y.pow(2).sum().backward()
    out["growth_stacked/stage2"] = y.detach()
    _grads(depth, "growth_stacked/", out)
    return out


def pack(tensors: dict[str, Tensor]) -> dict[str, Any]:
    """One flat float64 tensor plus keys and shapes: a few kB instead of one file per tensor."""
    keys = sorted(tensors)
    flat = torch.cat([tensors[k].detach().double().reshape(-1) for k in keys])
    return {"keys": keys, "shapes": [list(tensors[k].shape) for k in keys], "flat": flat}


def load_packed(path: Path) -> dict[str, Any]:
    """The packed reference from its JSON file (Python's float repr round-trips float64 exactly)."""
    packed = json.loads(path.read_text())
    return {**packed, "flat": torch.tensor(packed["flat"], dtype=torch.float64)}


def unpack(packed: dict[str, Any]) -> dict[str, Tensor]:
    out, i = {}, 0
    for key, shape in zip(packed["keys"], packed["shapes"], strict=True):
        n = int(torch.Size(shape).numel())
        out[key] = packed["flat"][i : i + n].reshape(shape)
        i += n
    return out


def original_rediscretise(depth: RecurrentDepth, h: Tensor, over: dict[str, Any]) -> Tensor:
    """How the original ``score-eval`` re-discretised (its rules, then forward overrides).

    Used only to generate the reference at commit 92c1f43 (whose forward took ``steps``, ``dt``
    and ``integrator``): ``git checkout 92c1f43 -- score_exp/core && PYTHONPATH=$PWD
    python tests/core_golden_cases.py``.
    """
    spec = depth.spec
    steps = over.get("steps") or depth.steps
    dt = over.get("dt")
    if (
        dt is None
        and over.get("keep_horizon", True)
        and spec.learn_dt == "none"
        and spec.update != "none"
    ):
        dt = depth.steps * depth.step_size / steps  # the trained horizon T = steps * dt
    kw: dict[str, Any] = {"integrator": over.get("integrator") or spec.integrator}
    if steps != depth.steps:
        kw["steps"] = steps
    if dt is not None:
        kw["dt"] = float(dt)
    return depth(h, **kw)


if __name__ == "__main__":
    torch.set_default_dtype(torch.float64)  # as the test's float64 fixture
    path = Path(__file__).parent / "data" / "core_golden.json"
    packed = pack(run_all(original_rediscretise))
    path.write_text(json.dumps({**packed, "flat": packed["flat"].tolist()}))
    print(f"wrote {path} ({path.stat().st_size} bytes)")
