"""Learned halting (PonderNet, ``depth.halt=ponder``): the maths on tiny numbers, the depth's loss
channel, inference halting, and the real CLI on every task (``score-train``, ``score-eval``)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from conftest import cli_env, load_results, run_cli, train_cli
from torch import nn

from score_exp.config import depth_spec
from score_exp.core import DepthSpec, RecurrentDepth
from score_exp.core.ponder import (
    HaltingHead,
    geometric_prior,
    halting_distribution,
    kl_to_prior,
    sample_mean,
)

# ----------------------------------------------------------------------------- the maths


def test_halting_distribution_by_hand():
    # lambdas 0.5, 0.2, (last: unused) -> p = 0.5, 0.5 * 0.2 = 0.1, the rest 0.5 * 0.8 = 0.4
    lam = torch.tensor([[0.5, 1.0], [0.2, 0.3], [0.9, 0.9]], dtype=torch.float64)
    p = halting_distribution(lam)
    expected = torch.tensor([[0.5, 1.0], [0.1, 0.0], [0.4, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(p.sum(0), torch.ones(2, dtype=torch.float64))


def test_geometric_prior_is_truncated_with_the_rest_on_the_last_step():
    prior = geometric_prior(0.25, 4)
    expected = [0.25, 0.75 * 0.25, 0.75**2 * 0.25, 0.75**3]
    torch.testing.assert_close(prior, torch.tensor(expected, dtype=torch.float64))
    assert math.isclose(float(prior.sum()), 1.0)


def test_kl_to_the_prior_by_hand():
    p = torch.tensor([[0.5, 1.0], [0.1, 0.0], [0.4, 0.0]], dtype=torch.float64)
    prior = geometric_prior(0.5, 3)  # 0.5, 0.25, 0.25
    kl = kl_to_prior(p, prior)
    first = 0.5 * math.log(0.5 / 0.5) + 0.1 * math.log(0.1 / 0.25) + 0.4 * math.log(0.4 / 0.25)
    second = 1.0 * math.log(1.0 / 0.5)  # 0 log 0 = 0 for the other steps
    torch.testing.assert_close(kl, torch.tensor([first, second], dtype=torch.float64))
    assert float(kl_to_prior(prior[:, None], prior)) == pytest.approx(0.0, abs=1e-15)


def test_head_starts_at_the_prior_and_pools_each_sample():
    head = HaltingHead(3, 0.2)
    lam = head(torch.randn(4, 3))
    torch.testing.assert_close(lam, torch.full((4,), 0.2))
    h = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    group = torch.tensor([0, 0, 1])  # a molecule of two atoms, one of one atom
    torch.testing.assert_close(sample_mean(h, group, 2), torch.tensor([[2.0, 1.0], [5.0, 5.0]]))
    seq = torch.arange(12.0).reshape(2, 3, 2)  # (B, T, C): a sequence is one sample
    torch.testing.assert_close(sample_mean(seq, None, 2), seq.mean(1))


def test_spec_validates_the_ponder_fields():
    for kwargs, match in (
        ({"ponder_lambda_p": 0.0}, "ponder_lambda_p must lie in"),
        ({"ponder_lambda_p": 1.0}, "ponder_lambda_p must lie in"),
        ({"ponder_beta": -1.0}, "ponder_beta must be >= 0"),
        ({"halt": "ponder", "adaptive_eps": 1.0}, "adaptive_eps must lie in"),
        ({"halt": "pondr"}, "valid halt: state, kl, ponder"),
    ):
        with pytest.raises(ValueError, match=match):
            DepthSpec(**kwargs)
    with pytest.raises(ValueError, match="needs the state width"):
        RecurrentDepth(lambda: nn.Linear(3, 3), DepthSpec(halt="ponder"))


# ----------------------------------------------------------------------------- the depth


class Scale(nn.Module):
    """``F(h) = 0.5 h``: each contractive step with dt = 1 halves the state."""

    def forward(self, h):
        return 0.5 * h


def _ponder_depth(steps: int = 3, **kwargs) -> RecurrentDepth:
    spec = DepthSpec(steps=steps, dt=1.0, halt="ponder", **kwargs)
    return RecurrentDepth(Scale, spec, width=2).double()


def test_training_forward_offers_the_expected_loss_and_kl():
    depth = _ponder_depth(ponder_lambda_p=0.3, ponder_beta=0.5).train()
    with torch.no_grad():  # lambda_n = sigmoid(h_n . w + b) with known w, b
        depth.halting.head.linear.weight.copy_(torch.tensor([[1.0, 0.0]]))
        depth.halting.head.linear.bias.fill_(0.0)
    h0 = torch.tensor([[4.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    out = depth(h0)
    assert torch.equal(out.detach(), h0 / 8)
    terms = depth.loss_terms()
    lam = torch.sigmoid(torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    p = torch.stack([lam[0], (1 - lam[0]) * lam[1], (1 - lam[0]) * (1 - lam[1])])
    torch.testing.assert_close(terms.step_weights.detach(), p)
    prior = torch.tensor([0.3, 0.7 * 0.3, 0.7 * 0.7], dtype=torch.float64)
    kl = (p * (p / prior[:, None]).log()).sum(0).mean()
    torch.testing.assert_close(terms.aux.detach(), 0.5 * kl)
    for n, expected in enumerate((h0 / 2, h0 / 4)):  # replay: the state after step n
        with depth.replaying(n):
            assert torch.equal(depth(torch.zeros(2, 2)).detach(), expected)
    # Gradients reach the head through the weights and the KL.
    loss = (terms.step_weights * torch.tensor([[3.0], [2.0], [1.0]])).sum(0).mean() + terms.aux
    loss.backward()
    assert depth.halting.head.linear.weight.grad.abs().sum() > 0


def test_no_loss_terms_without_ponder_or_outside_training():
    plain = RecurrentDepth(Scale, DepthSpec(steps=3, dt=1.0), width=2).train()
    plain(torch.ones(2, 2))
    assert plain.loss_terms() is None
    depth = _ponder_depth().eval()
    with torch.no_grad():
        depth(torch.ones(2, 2, dtype=torch.float64))
    assert depth.loss_terms() is None
    with pytest.raises(RuntimeError, match="needs a training forward"), depth.replaying(0):
        pass


def test_inference_stops_when_the_cumulative_halting_probability_passes_the_threshold():
    # F keeps the second coordinate and the head reads it: sample 0 has lambda = sigmoid(2)
    # ~ 0.88 at every step, sample 1 sigmoid(-1) ~ 0.27. With eps = 0.5 (cumulative halting
    # probability past 0.5) sample 0 stops after step 1, sample 1 after step 3 (0.73^2 > 0.5 >
    # 0.73^3); with eps = 0.2 after steps 1 and 6.
    depth = _ponder_depth(steps=8, adaptive_eps=0.5).eval()
    depth.blocks[0] = Keep1()

    class Head(nn.Module):
        def forward(self, h, group=None, n=None):
            return torch.sigmoid(h[:, 1])

    depth.halting.head = Head()
    h0 = torch.tensor([[1.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
    lam = torch.sigmoid(h0[:, 1])
    for eps, steps in ((0.5, [1, 3]), (0.2, [1, 6])):
        expected = []
        for i in range(2):  # the rule by hand: run on while prod (1 - lambda) >= eps
            n, remaining = 1, 1 - lam[i]
            while remaining >= eps and n < 8:
                n, remaining = n + 1, remaining * (1 - lam[i])
            expected.append(n)
        assert expected == steps
        with torch.no_grad(), depth.discretised(adaptive_eps=eps):
            out = depth(h0)
        assert depth.last_steps_used.tolist() == expected
        assert depth.last_nfe == pytest.approx(sum(expected) / 2)
        torch.testing.assert_close(out[:, 0], 0.5 ** torch.tensor(expected, dtype=torch.float64))


class Keep1(nn.Module):
    """``F(h)``: halves the first coordinate, keeps the second (a fixed halting logit)."""

    def forward(self, h):
        return torch.stack([0.5 * h[:, 0], h[:, 1]], dim=1)


def test_ponder_halting_needs_a_trained_head():
    depth = RecurrentDepth(Scale, DepthSpec(steps=3), width=2)
    with pytest.raises(ValueError, match="ponder needs a depth trained with halt=ponder"):
        depth.discretised(adaptive_eps=0.5, halt="ponder")


def test_ponder_preset_composes(compose):
    spec = depth_spec(compose("task=esol_gnn", "depth=ponder"))
    assert (spec.halt, spec.adaptive_eps, spec.share) == ("ponder", 0.5, True)
    cfg = compose("task=esol_mlp", "depth.halt=ponder", "depth.ponder_beta=0.1")
    assert depth_spec(cfg).ponder_beta == 0.1


# ----------------------------------------------------------------------------- the real CLI

TASKS = {
    "esol_mlp": ["task=esol_mlp", "trainer.max_epochs=1", "task.model.hidden=32"],
    "esol_gnn": ["task=esol_gnn", "trainer.max_epochs=1", "task.model.hidden=32",
                 "task.data.batch_size=128"],
    "shakespeare": ["task=shakespeare_char_cpu", "task.max_steps=4", "task.val_check_interval=4",
                    "task.data.eval_iters=2"],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(TASKS))
def test_ponder_trains_and_evaluates_on_every_task(tmp_path, task):
    run = tmp_path / "run"
    out = train_cli(run, *TASKS[task], "depth=ponder", "depth.steps=3",
                    "trainer.log_every_n_steps=1", env=cli_env(OMP_NUM_THREADS="1"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = load_results(run)
    assert results["status"] == "ok" and results["depth"]["halt"] == "ponder"
    with open(run / "metrics.csv", newline="") as f:
        logged = {k for row in csv.DictReader(f) for k, v in row.items() if v}
    assert {"depth/aux_loss", "depth/ponder_kl", "depth/ponder_steps"} <= logged
    # score-eval: the learned exit at two thresholds beside the state exit and the full depth.
    for over in ("depth.adaptive_eps=0.1,0.9", "depth.halt=state depth.adaptive_eps=1e-3"):
        ev = run_cli(f"run_dir={run}", *over.split(), module="score_exp.cli.eval")
        assert ev.returncode == 0, ev.stderr[-3000:]
    with open(run / "eval.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["halt"] for r in rows] == ["ponder", "ponder", "state"]
    nfe = [float(r["nfe_spent"]) for r in rows]
    assert all(1 <= v <= 3 for v in nfe) and nfe[0] >= nfe[1]  # a lower eps runs longer


def test_report_shows_the_learned_exit_beside_the_other_exits(tmp_path):
    from test_report import write_eval, write_run

    from score_exp.report import build_report

    for seed in (0, 1):
        run = write_run(tmp_path, f"ponder{seed}", preset="ponder", seed=seed, curve=[1.0])
        write_eval(run, [(8, "", "", 8, 0.6), (8, 0.5, "ponder", 3 + seed, 0.7),
                         (8, 0.001, "state", 6, 0.61)])  # fmt: skip
    rep = build_report([tmp_path], tmp_path / "out")
    table = next(t for t in rep.tables if "inference NFE" in t.title)
    by = {r["setting"]: r for r in table.records if r["variant"] == "ponder"}
    assert set(by) == {"8 x euler, dt 0.5", "8 x euler, dt 0.5, ponder exit p > 0.5",
                       "8 x euler, dt 0.5, halt state < 0.001"}  # fmt: skip
    learned = by["8 x euler, dt 0.5, ponder exit p > 0.5"]
    assert learned["nfe"] == pytest.approx(3.5) and learned["mean"] == pytest.approx(0.7)


# ----------------------------------------------------------------------------- the parts


def test_choices_are_literals_and_the_config_schema_declares_them_str():
    import dataclasses
    import typing

    from score_exp.config import depth_schema
    from score_exp.core import spec as spec_module

    hints = typing.get_type_hints(DepthSpec)
    assert typing.get_args(hints["halt"]) == spec_module.HALTS == ("state", "kl", "ponder")
    assert typing.get_origin(hints["update"]) is typing.Literal
    schema = {f.name: f.type for f in dataclasses.fields(depth_schema())}
    assert schema["halt"] is str and schema["inject"] is str and schema["ponder_beta"] is float


class TanhLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, h):
        return torch.tanh(self.linear(h))


def test_ancre_halting_removes_whole_samples_through_the_one_halting_path():
    # Two molecules (rows 0-1 and 2-4) at different scales stop at different steps, each as a
    # whole (one count per molecule), and each output matches the full-depth iteration (every
    # state kept by the mixture) at the molecule's step.
    torch.manual_seed(0)
    spec = DepthSpec(steps=12, dt=0.5, connect="ancre", ancre_init=0.8, adaptive_eps=0.1)
    depth = RecurrentDepth(TanhLinear, spec).double().eval()
    h = torch.randn(5, 3, dtype=torch.float64)
    h[2:] *= 3.0
    with torch.no_grad():
        out = depth(h, group=torch.tensor([0, 0, 1, 1, 1]))
    used = depth.last_steps_used
    assert used.tolist() == [6, 9]
    mix, x, states = depth.mixing.start(h), h, []
    with torch.no_grad():
        for l in range(12):
            x = depth.step(l, mix.input(l, x), h, depth.dts()[l], "euler", {})
            mix.push(x)
            states.append(x)
    torch.testing.assert_close(out[:2], states[5][:2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[2:], states[8][2:], rtol=1e-12, atol=1e-12)


def test_regression_module_minimises_the_expected_loss_over_the_steps():
    import warnings

    from score_exp.models.mlp import RecurrentMLP
    from score_exp.tasks.regression import RegressionModule

    torch.manual_seed(0)
    spec = DepthSpec(steps=3, dt=0.5, halt="ponder", ponder_beta=0.5)
    model = RecurrentMLP(4, spec, hidden=8, dropout=0.0)
    with torch.no_grad():  # a head that depends on the state: lambdas differ per sample
        model.depth.halting.head.linear.weight.normal_()
    module = RegressionModule(model).train()
    x, y = torch.randn(5, 4), torch.randn(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        loss = module.training_step((x, y), 0)
    # By hand: every step's state through the head, p from the lambdas, the KL to the prior.
    h, states = model.encoder(x), []
    for _ in range(3):
        h = 0.5 * h + 0.5 * model.depth.blocks[0](h)
        states.append(h)
    lam = torch.stack(
        [torch.sigmoid(model.depth.halting.head.linear(s)).squeeze(-1) for s in states]
    )
    p = torch.stack([lam[0], (1 - lam[0]) * lam[1], (1 - lam[0]) * (1 - lam[1])])  # (3, 5)
    errors = torch.stack([(model.head(s).view(-1) - y).pow(2) for s in states])  # (3, 5)
    prior = torch.tensor([0.2, 0.8 * 0.2, 0.8 * 0.8])
    kl = (p * (p / prior[:, None]).log()).sum(0).mean()
    expected = (p * errors).sum(0).mean() + 0.5 * kl
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    plain = RegressionModule(RecurrentMLP(4, DepthSpec(steps=3, dt=0.5), hidden=8, dropout=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = plain.training_step((x, y), 0)
    assert torch.equal(base, nn.functional.mse_loss(plain((x, y))[0], y))  # untouched
