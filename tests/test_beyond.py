"""Beyond SCORE: ANCRe connectivity, learned dt, adaptive depth, growth and diagnostics."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cli_env, load_results, train_cli
from torch import nn

from score_exp.core import DepthSpec, RecurrentDepth, halting

# Convergence orders and exact comparisons need float64 (the conftest fixture restores it).
pytestmark = pytest.mark.usefixtures("float64")


class Linear(nn.Module):
    """F(h) = h @ A^T + b."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor | None = None):
        super().__init__()
        self.A = nn.Parameter(A.clone())
        self.b = nn.Parameter(torch.zeros(len(A)) if b is None else b.clone())

    def forward(self, h):
        return h @ self.A.T + self.b


def _A(d: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)


def _tanh_block():
    return nn.Sequential(nn.Linear(5, 5), nn.Tanh())


def _euler_contractive(block, h, dts):
    for dt in dts:
        h = (1 - dt) * h + dt * block(h)
    return h


# ----------------------------------------------------------------------------- defaults


def test_defaults_keep_the_plain_chain_and_its_state_dict():
    spec = DepthSpec()
    assert (spec.connect, spec.learn_dt, spec.adaptive_eps, spec.growth) == (
        "chain",
        "none",
        None,
        None,
    )
    depth = RecurrentDepth(_tanh_block, DepthSpec(steps=3, dt=0.3))
    assert all(k.startswith("blocks.") for k in depth.state_dict())
    h = torch.randn(4, 5)
    ref = h
    for _ in range(3):  # the euler integrator's own arithmetic: h + dt * (F(h) - h)
        ref = ref + 0.3 * (depth.blocks[0](ref) - ref)
    assert torch.equal(depth(h), ref)  # bit for bit: the same operations in one process
    assert depth.last_steps_used is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"connect": "dense"}, "valid connects: chain, ancre"),
        ({"connect": "ancre", "ancre_tau": 0}, "ancre_tau must be > 0"),
        ({"learn_dt": "layer"}, "valid learn_dt: none, global, per_step"),
        ({"learn_dt": "global", "dt": 1.0}, "strictly inside"),
        ({"learn_dt": "global", "dt": None, "steps": 1}, "strictly inside"),
        ({"learn_dt": "global", "update": "none", "dt": None}, "update='none'"),
        ({"adaptive_eps": 0.0}, "adaptive_eps must be > 0"),
        ({"adaptive_eps": "small"}, "adaptive_eps must be > 0"),
        ({"growth": []}, "non-empty list"),
        ({"growth": [[1, 4]]}, "start at 0"),
        ({"growth": [[0, 2], [0, 4]]}, "start at 0 and increase"),
        ({"growth": [[0, 2], [5, 3]]}, "must end at steps=4"),
        ({"growth": [[0, 0], [5, 4]]}, "steps must be >= 1"),
        ({"growth": [[0, 4], [5, 2], [9, 4]]}, "must not decrease, got \\[4, 2, 4\\]"),
        ({"growth": [[0, 1.5], [5, 4]]}, "integer pairs"),
        ({"growth": [[0, 1], [5, 4]], "share": False}, "double"),
        ({"growth": [[0, 2], [5, 4]], "connect": "ancre"}, "cannot be combined"),
    ],
)
def test_beyond_fields_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthSpec(**kwargs)


# ----------------------------------------------------------------------------- ANCRe


def test_ancre_starts_as_the_chain():
    torch.manual_seed(0)
    chain = RecurrentDepth(_tanh_block, DepthSpec(steps=6, dt=0.5))
    ancre = RecurrentDepth(_tanh_block, DepthSpec(steps=6, dt=0.5, connect="ancre"))
    ancre.load_state_dict(chain.state_dict(), strict=False)
    w = ancre.connection_weights()
    assert w.shape == (6, 7)
    assert torch.allclose(w.sum(1), torch.ones(6))
    assert torch.equal(w.triu(1), torch.zeros(6, 7))
    assert (w.diagonal() >= 0.9999 - 1e-12).all()
    h = torch.randn(8, 5)
    a, c = ancre(h), chain(h)
    assert ((a - c).norm() / c.norm()).item() < 1e-3
    assert not torch.equal(a, c)  # the mixture is really applied


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_ancre_init_sets_the_weight_of_the_current_state(p):
    depth = RecurrentDepth(_tanh_block, DepthSpec(steps=4, dt=0.5, connect="ancre", ancre_init=p))
    w = depth.connection_weights()
    assert torch.allclose(w.diagonal()[1:], torch.full((3,), p), atol=1e-6)
    # The rest of each row is shared equally by the earlier states.
    for j in range(1, 4):
        assert torch.allclose(w[j, :j], torch.full((j,), (1 - p) / j), atol=1e-6)
    with pytest.raises(ValueError, match="ancre_init"):
        DepthSpec(connect="ancre", ancre_init=1.0)


def test_ancre_matches_a_hand_written_mixture_and_learns_its_coefficients():
    torch.manual_seed(1)
    steps, tau = 4, 0.7
    depth = RecurrentDepth(
        _tanh_block, DepthSpec(steps=steps, dt=0.4, connect="ancre", ancre_tau=tau)
    )
    with torch.no_grad():
        depth.mixing.logits.copy_(torch.randn(steps, steps))
    c = depth.mixing.logits.detach()
    block = depth.blocks[0]
    h0 = torch.randn(3, 5)
    states = [h0]
    for j in range(steps):
        w = torch.softmax(c[j, : j + 1] / tau, dim=0)
        m = sum(w[i] * states[i] for i in range(j + 1))
        states.append((1 - 0.4) * m + 0.4 * block(m))
    out = depth(h0)
    assert torch.allclose(out, states[-1], atol=1e-12)
    out.pow(2).sum().backward()
    g = depth.mixing.logits.grad
    assert torch.equal(g.triu(1), torch.zeros(steps, steps))  # masked entries get nothing
    assert (g.tril(-1)[1:].abs().sum(1) > 0).all()  # every row with a choice learns
    trainable = int(depth.mixing.mask.sum())
    assert trainable == steps * (steps + 1) // 2


def test_ancre_refuses_a_step_override_and_reports_in_repr():
    depth = RecurrentDepth(_tanh_block, DepthSpec(steps=3, connect="ancre"))
    with pytest.raises(ValueError, match="runs exactly 3 steps"):
        depth.discretised(steps=6)
    assert "connect='ancre'" in repr(depth)
    with depth.discretised(integrator="rk4"):  # other overrides still work
        depth(torch.randn(2, 5))


# ----------------------------------------------------------------------------- learned dt


@pytest.mark.parametrize("mode", ["global", "per_step"])
def test_learned_dt_starts_at_the_configured_dt_and_gets_gradients(mode):
    torch.manual_seed(2)
    fixed = RecurrentDepth(_tanh_block, DepthSpec(steps=3, dt=0.3))
    learned = RecurrentDepth(_tanh_block, DepthSpec(steps=3, dt=0.3, learn_dt=mode))
    learned.load_state_dict(fixed.state_dict(), strict=False)
    assert torch.allclose(torch.stack(learned.dts()), torch.full((3,), 0.3), atol=1e-12)
    h = torch.randn(4, 5)
    out = learned(h)
    assert torch.allclose(out, fixed(h), atol=1e-12)
    out.sum().backward()
    assert learned.step_size.logit.grad.shape == ((1,) if mode == "global" else (3,))
    assert (learned.step_size.logit.grad.abs() > 0).all()
    assert f"learn_dt='{mode}'" in repr(learned)


def test_per_step_dt_is_a_sigmoid_of_each_logit():
    depth = RecurrentDepth(_tanh_block, DepthSpec(steps=3, dt=None, learn_dt="per_step"))
    assert torch.allclose(torch.stack(depth.dts()), torch.full((3,), 1 / 3))
    with torch.no_grad():
        depth.step_size.logit.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    dts = [1 / (1 + math.exp(1.0)), 0.5, 1 / (1 + math.exp(-2.0))]
    assert torch.allclose(torch.stack(depth.dts()), torch.tensor(dts))
    h = torch.randn(2, 5)
    assert torch.allclose(depth(h), _euler_contractive(depth.blocks[0], h, dts), atol=1e-12)
    # A step override keeps the learned horizon: T / n per step; a dt override wins.
    T = sum(dts)
    with depth.discretised(steps=5):
        assert torch.allclose(depth(h), _euler_contractive(depth.blocks[0], h, [T / 5] * 5))
    with depth.discretised(dt=0.1):
        assert torch.allclose(depth(h), _euler_contractive(depth.blocks[0], h, [0.1] * 3))


# ----------------------------------------------------------------------------- adaptive depth


class Target(nn.Module):
    """F(h) = c: the contractive update moves h towards c by a factor (1 - dt) per step."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = nn.Parameter(c.clone())

    def forward(self, h):
        return self.c.expand_as(h)


def test_adaptive_depth_stops_each_sample_at_the_analytic_step():
    c = torch.ones(3)
    spec = DepthSpec(steps=20, dt=0.5, adaptive_eps=1e-3)
    depth = RecurrentDepth(lambda: Target(c), spec).eval()
    # Sample 0 starts at the fixed point; sample 1 at 0.5 c (h_t = c - 0.5^(t+1) c);
    # sample 2 at 0 (h_t = c - 0.5^t c).
    h0 = torch.stack([c, 0.5 * c, 0 * c])

    def rel(h):  # ||h_{t+1} - h_t|| / ||h_t|| for one sample
        return (0.5 * (c - h)).norm() / h.norm()

    expected = []
    for x in h0:
        n, h = 0, x.clone()
        while n < 20:
            r = rel(h) if h.norm() > 0 else math.inf
            n, h = n + 1, 0.5 * h + 0.5 * c
            if r < 1e-3:
                break
        expected.append(n)
    assert expected[0] == 1 and expected[1] < expected[2] < 20
    with torch.no_grad():
        out = depth(h0)
    assert depth.last_steps_used.tolist() == expected
    for i, n in enumerate(expected):  # a stopped sample keeps the state it stopped at
        with torch.no_grad():
            ref = RecurrentDepth(lambda: Target(c), DepthSpec(steps=n, dt=0.5))(h0[i : i + 1])
        assert torch.allclose(out[i], ref[0], atol=1e-12)


def test_adaptive_depth_is_off_while_training_and_works_on_3d_states():
    depth = RecurrentDepth(_tanh_block, DepthSpec(steps=6, dt=0.5, adaptive_eps=10.0))
    h = torch.randn(2, 7, 5)  # (B, T, C): norms over (T, C)
    depth.train()
    full = depth(h)
    assert depth.last_steps_used is None
    depth.eval()
    with torch.no_grad():
        out = depth(h)
    assert depth.last_steps_used.tolist() == [1, 1]  # eps = 10: every sample stops at once
    with depth.discretised(steps=1, keep_horizon=False):
        assert torch.allclose(out, depth(h).detach()) and not torch.allclose(out, full)


# ----------------------------------------------------------------------------- growth


def test_steps_at_follows_the_schedule():
    spec = DepthSpec(steps=4, dt=0.25, growth=[[0, 1], [10, 2], [20, 4]])
    assert [spec.steps_at(e) for e in (0, 9, 10, 19, 20, 100)] == [1, 1, 2, 2, 4, 4]
    assert DepthSpec(steps=3).steps_at(7) == 3


def test_shared_growth_keeps_the_horizon():
    A = _A()
    h0 = torch.randn(2, 4)
    spec = DepthSpec(steps=4, dt=0.25, growth=[[0, 1], [3, 2], [6, 4]])
    depth = RecurrentDepth(lambda: Linear(A), spec)
    assert depth.steps == 1 and depth.nfe == 1 and "steps=1" in repr(depth)
    assert depth.dts() == [1.0]

    def ref(n, dt):
        return RecurrentDepth(lambda: Linear(A), DepthSpec(steps=n, dt=dt))(h0)

    with torch.no_grad():
        assert torch.allclose(depth(h0), ref(1, 1.0))
        depth.set_steps(2)
        assert torch.allclose(depth(h0), ref(2, 0.5))
        depth.set_steps(2, keep_horizon=False)
        assert torch.allclose(depth(h0), ref(2, 0.25))
        depth.set_steps(4, keep_horizon=True)
        assert depth.nfe == 4 and torch.equal(depth(h0), ref(4, 0.25))
    # The active stage travels with the state dict.
    fresh = RecurrentDepth(lambda: Linear(A), spec)
    fresh.load_state_dict(depth.state_dict())
    assert fresh.steps == 4
    with pytest.raises(ValueError, match="steps must be >= 1"):
        depth.set_steps(0)
    with pytest.raises(ValueError, match="refine is for stacked"):
        depth.refine()


def test_growth_warns_when_the_first_contractive_stage_has_dt_above_one():
    with pytest.warns(UserWarning, match="dt=2 > 1"):
        DepthSpec(steps=4, dt=0.5, growth=[[0, 1], [5, 4]])


def test_stacked_refine_duplicates_blocks_and_halves_dt():
    torch.manual_seed(3)
    spec = DepthSpec(
        share=False, steps=4, dt=1.0, update="residual", growth=[[0, 1], [2, 2], [4, 4]]
    )
    depth = RecurrentDepth(lambda: Linear(torch.zeros(4, 4), torch.randn(4)), spec)
    assert len(depth.blocks) == 1 and depth.dts()[0] == 4.0
    h0 = torch.randn(3, 4)
    before = depth(h0).detach()
    depth.refine()
    assert len(depth.blocks) == 2 and depth.dts()[0] == 2.0 and depth.nfe == 2
    assert depth.blocks[0].b is not depth.blocks[1].b
    assert torch.equal(depth.blocks[0].b, depth.blocks[1].b)
    # A constant field integrates exactly: the refined depth gives the same output.
    assert torch.allclose(depth(h0), before, atol=1e-12)
    depth.refine()
    assert len(depth.blocks) == 4 and depth.dts()[0] == 1.0
    with torch.no_grad():
        depth.blocks[3].b.add_(1.0)  # copies are independent parameters
    assert not torch.equal(depth.blocks[2].b, depth.blocks[3].b)
    # A checkpoint taken at the last stage loads into a freshly built (first-stage) depth.
    fresh = RecurrentDepth(lambda: Linear(torch.zeros(4, 4), torch.zeros(4)), spec)
    fresh.load_state_dict(depth.state_dict())
    assert len(fresh.blocks) == 4 and fresh.steps == 4
    assert torch.equal(fresh(h0), depth(h0))
    with pytest.raises(ValueError, match="set_steps is for shared"):
        depth.set_steps(8)


# ----------------------------------------------------------------------------- diagnostics


def test_trace_matches_the_closed_form_of_a_scaled_identity():
    # F(h) = a h: h_{t+1} - h_t = dt (a - 1) h_t, so rel change = dt |a - 1| and the
    # contraction ratio is |1 - dt + dt a| at every step.
    a, dt = 0.3, 0.5
    depth = RecurrentDepth(lambda: Linear(a * torch.eye(4)), DepthSpec(steps=5, dt=dt))
    out = depth.trace(torch.randn(6, 4))
    assert out["rel_change"].shape == (5,) and out["contraction"].shape == (5,)
    assert torch.allclose(out["rel_change"], torch.full((5,), dt * (1 - a)))
    assert math.isnan(out["contraction"][0])
    assert torch.allclose(out["contraction"][1:], torch.full((4,), 1 - dt + dt * a))
    assert torch.is_grad_enabled()


def test_forward_computes_no_diagnostics_unless_asked(monkeypatch):
    def boom(*args):
        raise AssertionError("norm computed in a plain forward")

    monkeypatch.setattr(halting, "sample_norm", boom)
    depth = RecurrentDepth(_tanh_block, DepthSpec(steps=3, connect="ancre", learn_dt="global"))
    depth(torch.randn(2, 5))
    with pytest.raises(AssertionError, match="norm computed"):
        depth.trace(torch.randn(2, 5))


# ----------------------------------------------------------------------------- callbacks


class _ToyModule:
    """A LightningModule around ``model.depth``, built lazily (Lightning imports are slow)."""

    @staticmethod
    def make(spec: DepthSpec, decay: bool = False):
        import lightning as L

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                self.depth = RecurrentDepth(_tanh_block, spec)
                self.head = nn.Linear(5, 1)

            def forward(self, x):
                return self.head(self.depth(x))

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = Model()

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.mse_loss(self.model(x), y)

            def validation_step(self, batch, batch_idx):
                x, y = batch
                self.log("val/loss", nn.functional.mse_loss(self.model(x), y))

            def configure_optimizers(self):
                opt = torch.optim.SGD(self.parameters(), lr=0.1)
                if not decay:
                    return opt
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        return Module()


def _fit(spec: DepthSpec, callbacks, epochs: int = 3, decay: bool = False):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(32, 5), torch.randn(32, 1))
    module = _ToyModule.make(spec, decay)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=16))
    return trainer, module


def test_depth_growth_refines_and_the_optimiser_trains_the_new_blocks():
    from score_exp.tasks.callbacks import DepthGrowth, find_depth

    spec = DepthSpec(
        share=False, steps=4, dt=1.0, update="residual", growth=[[0, 1], [1, 2], [2, 4]]
    )
    seen = []

    class Spy(DepthGrowth):
        def on_train_epoch_start(self, trainer, pl_module):
            super().on_train_epoch_start(trainer, pl_module)
            depth = find_depth(pl_module)
            seen.append((depth.steps, [b[0].weight.detach().clone() for b in depth.blocks]))

    trainer, module = _fit(spec, [Spy()])
    depth = module.model.depth
    assert [n for n, _ in seen] == [1, 2, 4] and len(depth.blocks) == 4
    in_optimiser = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert {id(p) for p in module.parameters()} == in_optimiser
    # Every block created at the last refine moved during the last epoch.
    for block, start in zip(depth.blocks, seen[-1][1], strict=True):
        assert not torch.equal(block[0].weight, start)


def test_depth_growth_in_optimiser_steps_replays_the_lr_schedule():
    from score_exp.tasks.callbacks import DepthGrowth

    spec = DepthSpec(share=False, steps=2, dt=1.0, update="residual", growth=[[0, 1], [6, 2]])
    trainer, module = _fit(spec, [DepthGrowth(unit="step")], epochs=2, decay=True)
    assert trainer.global_step == 8 and len(module.model.depth.blocks) == 2
    # Re-created at step 6, the schedule continued from there instead of restarting.
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 / (1 + 8))
    with pytest.raises(ValueError, match="valid units: auto, epoch, step"):
        DepthGrowth(unit="iteration")


def test_depth_diagnostics_logs_per_step_values():
    from score_exp.tasks.callbacks import DepthDiagnostics

    spec = DepthSpec(steps=3, dt=0.5, learn_dt="global", adaptive_eps=1e-6)
    trainer, _ = _fit(spec, [DepthDiagnostics()], epochs=1)
    logged = trainer.callback_metrics
    for t in range(3):
        assert f"diag/rel_change_step{t}" in logged and f"depth/dt_step{t}" in logged
    assert "diag/contraction_step0" not in logged and "diag/contraction_step2" in logged
    assert 0 < float(logged["depth/dt_step0"]) < 1 and float(logged["depth/steps_used"]) >= 1


# ----------------------------------------------------------------------------- the real CLI


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["depth.connect=ancre"],
        ["depth.learn_dt=global"],
        ["depth.growth=[[0,1],[1,2]]"],
        ["depth=stacked", "depth.growth=[[0,1],[1,2]]"],
    ],
    ids=["ancre", "learn_dt", "growth_shared", "growth_stacked"],
)
def test_cli_trains_with_beyond_fields_and_logs_diagnostics(tmp_path, overrides):
    import csv

    tiny = ["trainer.max_epochs=2", "task.model.hidden=32", "depth.steps=2"]
    out = train_cli(tmp_path / "run", *tiny, *overrides, env=cli_env(OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = load_results(tmp_path / "run")
    assert r["status"] == "ok" and r["nfe"] == 2
    with open(tmp_path / "run" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"diag/rel_change_step0", "diag/rel_change_step1", "diag/contraction_step1"} <= set(
        header
    )
    if "depth.connect=ancre" in overrides:
        assert r["depth"]["connect"] == "ancre" and len(r["connection_weights"]) == 2
    if "depth.learn_dt=global" in overrides:
        assert {"depth/dt_step0", "depth/dt_step1"} <= set(header) and len(r["learned_dt"]) == 2
    if any(o.startswith("depth.growth") for o in overrides):
        assert r["depth"]["growth"] == [[0, 1], [1, 2]] and r["final_steps"] == 2


# ----------------------------------------------------------------------------- score-eval


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    tiny = ["trainer.max_epochs=2", "task.model.hidden=32", "depth.steps=2"]
    out = train_cli(run_dir, *tiny, env=cli_env(OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_score_eval_rediscretises_a_trained_run(trained_run):
    import csv

    from conftest import run_cli

    out = run_cli(
        f"run_dir={trained_run}",
        "depth.steps=1,2",
        "depth.integrator=euler,rk4",
        module="score_exp.cli.eval",
        env=cli_env(OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(trained_run / "eval.csv", newline="") as f:
        rows = {(int(r["steps"]), r["integrator"]): r for r in csv.DictReader(f)}
    assert set(rows) == {(1, "euler"), (1, "rk4"), (2, "euler"), (2, "rk4")}
    assert {k: int(r["nfe"]) for k, r in rows.items()} == {
        (1, "euler"): 1,
        (1, "rk4"): 4,
        (2, "euler"): 2,
        (2, "rk4"): 8,
    }
    # keep_horizon: T = 2 * 0.5 = 1, so dt = 1 / steps.
    assert float(rows[(1, "rk4")]["dt"]) == 1.0 and float(rows[(2, "euler")]["dt"]) == 0.5
    # The trained discretisation reproduces the run's own test metric.
    trained = load_results(trained_run)["test"]["rmse"]
    assert float(rows[(2, "euler")]["test/rmse"]) == pytest.approx(trained, rel=1e-6)
    assert float(rows[(1, "euler")]["test/rmse"]) != pytest.approx(trained, rel=1e-3)
    assert "test/rmse" in out.stdout and "integrator" in out.stdout
    assert (trained_run / "multirun.yaml").is_file()  # the sweep's record stays in the run


@pytest.mark.slow
def test_score_eval_takes_a_run_dir_relative_to_the_working_directory(trained_run):
    from conftest import run_cli

    # cwd is the run's parent, so run_dir=run is relative (PYTHONPATH from cli_env finds the code).
    out = run_cli(
        "run_dir=run",
        "depth.steps=1",
        module="score_exp.cli.eval",
        env=cli_env(OMP_NUM_THREADS="1"),
        cwd=trained_run.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert ",checkpoints/" in (trained_run / "eval.csv").read_text()


def test_score_eval_reports_bad_input_in_one_line(tmp_path):
    from conftest import run_cli

    out = run_cli(f"run_dir={tmp_path / 'nope'}", module="score_exp.cli.eval")
    assert out.returncode == 2
    assert "score-eval: error:" in out.stderr and "does not exist" in out.stderr
