"""The core's house rules: parts that own their state, one loop, runners by name, the step
context, and checkpoints of the core before the parts still loading."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from legacy_depth_states import Block, D, h0, load, state_dict
from torch import Tensor, nn

from score_exp.core import DepthSpec, RecurrentDepth, StepContext
from score_exp.core.runners import RUNNERS

CORE = Path(__file__).resolve().parents[1] / "score_exp" / "core"
LEGACY = load()


# ----------------------------------------------------------------------------- old checkpoints


def _fresh(entry: dict) -> RecurrentDepth:
    """A depth as a new run of the variant builds it: its first growth stage, no calls."""
    return RecurrentDepth(Block, DepthSpec(**entry["spec"]), width=D).double()


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_a_state_dict_of_the_core_before_the_parts_loads_and_runs_the_same(name):
    entry = LEGACY[name]
    depth = _fresh(entry)
    depth.load_state_dict(state_dict(entry))  # strict: every old key lands somewhere
    depth.eval()
    with torch.no_grad():
        y = depth(h0())
    ref = torch.tensor(entry["out"], dtype=torch.float64).reshape(entry["out_shape"])
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    if entry["steps_used"] is not None:
        assert depth.last_steps_used.tolist() == entry["steps_used"]
    # The grown stage came back with the checkpoint (a stacked depth: its blocks too).
    assert depth.steps == len(depth.blocks) or depth.spec.share
    assert "active_steps" not in depth.state_dict()


def test_old_keys_load_under_a_prefix_and_the_oldest_injection_name_too():
    entry = LEGACY["inject_concat"]
    old = {f"model.depth.{k}": v for k, v in state_dict(entry).items()}
    old["model.depth.inject_weight"] = old.pop("model.depth.injection.weight")  # before the part
    model = nn.Module()
    model.model = nn.Module()
    model.model.depth = _fresh(entry)
    model.load_state_dict(old)
    with torch.no_grad():
        y = model.model.depth.eval()(h0())
    torch.testing.assert_close(y.reshape(-1), torch.tensor(entry["out"], dtype=torch.float64))


def test_the_parts_own_their_parameters_under_their_own_names():
    keys = {
        name: set(_fresh(entry).state_dict()) - {k for k in _fresh(entry).state_dict() if k.startswith("blocks.")}
        for name, entry in LEGACY.items()
    }  # fmt: skip
    assert keys["learn_dt_global"] == {"step_size.logit"}
    assert keys["ancre_softmax"] == {"mixing.logits"}  # the mask is not persisted
    assert keys["ancre_residual"] == {"mixing.residual"}
    assert keys["growth_shared"] == {"growth.active_steps"}
    assert keys["inject_concat"] == {"injection.weight"}
    assert keys["ponder"] == {"halting.head.linear.weight", "halting.head.linear.bias"}
    assert keys["inject_add_zeros"] == set()


def test_every_part_is_always_present_and_holds_nothing_when_off():
    depth = RecurrentDepth(Block, DepthSpec(steps=3))
    parts = {name for name, _ in depth.named_children()}
    assert parts == {
        "blocks",
        "growth",
        "step_size",
        "mixing",
        "injection",
        "halting",
        "step_count",
    }
    assert all(k.startswith("blocks.") for k in depth.state_dict())
    assert depth.step_size.logit is None and depth.growth.active_steps is None


# ----------------------------------------------------------------------------- runners


@pytest.mark.parametrize(
    ("kwargs", "runner", "train_runner"),
    [
        ({}, "unroll", "unroll"),
        ({"adaptive_eps": 0.1}, "halting", "unroll"),
        ({"halt": "ponder"}, "unroll", "record"),
        ({"halt": "ponder", "adaptive_eps": 0.5}, "halting", "record"),
        ({"solver": "fixed_point", "inject": "add"}, "fixed_point", "fixed_point"),
    ],
)
def test_the_discretisation_names_its_runners_once(kwargs, runner, train_runner):
    depth = RecurrentDepth(Block, DepthSpec(steps=3, **kwargs), width=D)
    d = depth.discretisation
    assert (d.runner, d.train_runner) == (runner, train_runner)
    assert {runner, train_runner} <= set(RUNNERS)
    with depth.discretised(adaptive_eps=0.2) as e:
        assert e.runner == ("fixed_point" if runner == "fixed_point" else "halting")


class Recording(nn.Module):
    """``F(h) = tanh(h A^T + 1)``, recording every call's step context and whether it builds a graph."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = nn.Parameter(0.5 * torch.randn(D, D, generator=g, dtype=torch.float64))
        self.calls: list[tuple[int, int, list[int] | None, bool]] = []

    def forward(self, h: Tensor, *, step: StepContext) -> Tensor:
        rows = None if step.rows is None else step.rows.tolist()
        self.calls.append((step.index, step.stage, rows, torch.is_grad_enabled()))
        return torch.tanh(h @ self.A.T + 1.0)


class Plain(Recording):
    def forward(self, h: Tensor) -> Tensor:  # no step keyword: no context
        return torch.tanh(h @ self.A.T + 1.0)


@pytest.mark.parametrize("integrator", ["euler", "heun", "rk4"])
def test_a_block_that_asks_gets_its_step_and_stage_and_the_numbers_do_not_change(integrator):
    spec = DepthSpec(steps=3, dt=0.5, integrator=integrator)
    ctx_depth = RecurrentDepth(Recording, spec).double()
    plain = RecurrentDepth(Plain, spec).double()
    h = h0()
    assert torch.equal(ctx_depth(h), plain(h))
    evals = spec.evals_per_step
    assert [c[:2] for c in ctx_depth.blocks[0].calls] == [
        (l, s) for l in range(3) for s in range(evals)
    ]
    assert all(c[2] is None for c in ctx_depth.blocks[0].calls)


def test_the_step_context_names_the_rows_still_running_when_halting():
    depth = RecurrentDepth(Recording, DepthSpec(steps=12, dt=0.5, adaptive_eps=0.01)).double()
    h = h0() * torch.tensor([[0.01], [30.0]], dtype=torch.float64)  # stop at different steps
    with torch.no_grad():
        depth.eval()(h)
    used = depth.last_steps_used.tolist()
    first, last = sorted(used)
    assert first < last, used
    rows = [c[2] for c in depth.blocks[0].calls]
    on = [used.index(last)]  # the row still running once the other stopped
    assert rows[:first] == [None] * first and rows[first:] == [on] * (last - first)
    assert [c[0] for c in depth.blocks[0].calls] == list(range(last))


def test_the_fixed_point_solver_numbers_its_evaluations():
    spec = DepthSpec(steps=3, dt=0.5, inject="add", solver="fixed_point", solver_max_iter=6)
    depth = RecurrentDepth(Recording, spec).double()
    with torch.no_grad():
        depth(h0())
    assert [c[0] for c in depth.blocks[0].calls] == list(range(depth.last_nfe))


@pytest.mark.parametrize(
    ("kwargs", "train"),
    [({}, True), ({"halt": "ponder"}, True), ({"adaptive_eps": 1e-300}, False)],
)
def test_backprop_steps_is_honoured_by_every_runner(kwargs, train):
    # unroll (training), record (PonderNet's training) and halting (an evaluation with a graph):
    # only the last 2 of 5 steps build a graph.
    spec = DepthSpec(steps=5, dt=0.5, backprop_steps=2, **kwargs)
    depth = RecurrentDepth(Recording, spec, width=D).double().train(train)
    depth(h0()).sum().backward()
    assert [c[3] for c in depth.blocks[0].calls] == [False] * 3 + [True] * 2
    assert depth.blocks[0].A.grad is not None


# ----------------------------------------------------------------------------- layering


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (in functions and TYPE_CHECKING too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_the_core_imports_only_itself_and_has_no_circle():
    graph = {}
    for path in sorted(CORE.glob("*.py")):
        mods = _imports(path)
        outside = {
            m for m in mods if m.startswith("score_exp") and not m.startswith("score_exp.core")
        }
        assert not outside, f"{path.name} imports {outside}"
        assert not {m.split(".")[0] for m in mods} & {"lightning", "hydra", "omegaconf"}, path.name
        name = path.stem
        graph[name] = {
            m.split(".")[2] for m in mods if m.startswith("score_exp.core.") and m.count(".") >= 2
        } - {name}
    graph.pop("__init__")  # the package's face imports its parts, none imports it back
    assert all("__init__" not in deps for deps in graph.values())
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in graph.get(n, ()):
            assert state.get(m) != 1, f"import circle: {' -> '.join([*path, m])}"
            if m not in state:
                visit(m, [*path, m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
