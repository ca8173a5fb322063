"""A newcomer's first commands (issue 29): each mistake is ONE line with a "did you mean", before
Hydra makes any folder; what a run reports is what it did.

- a config group's option, a key of the config, an argument the task's model / data module /
  LightningModule does not take: one line, ``did you mean``, the choices without the ``_`` bases
  and ``_schema``; no run folder, no sweep folder, no ``failed_jobs.jsonl`` line;
- the output-folder check runs for a single run too (the default folder reads Hydra's state);
- ``score-eval`` prints its metric as the report does (4 decimals);
- a W&B run logged offline says how to upload it (``wandb sync <dir>``);
- a fixed-point run's ``nfe`` is what its solves spent per forward;
- with gradient accumulation, ``task.val_check_interval`` counts optimiser steps.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import QUIET, cli_env, load_results, run_cli, train_cli
from test_bad_input import one_error_line

ONE_EPOCH_NARROW = ["trainer.max_epochs=1", "task.model.hidden=16"]


def _refused(tmp_path, *args, multirun: bool = False) -> str:
    """``score-train args`` refused in one line; neither its run folder nor the sweep's exists."""
    run_dir, sweep_dir = tmp_path / "run", tmp_path / "sweep"
    out = run_cli(
        *(["-m"] if multirun else []),
        f"hydra.run.dir={run_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        *QUIET,
        *args,
    )
    line = one_error_line(out)
    assert not run_dir.exists() and not sweep_dir.exists()  # no folder, no failed_jobs.jsonl
    choices = line.partition("; choices: ")[2]
    assert not [c for c in choices.split(", ") if c.startswith("_")], line  # no bases, _schema
    return line.removeprefix("score-train: error: ")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["depth=scor"],
            "unknown depth 'scor' (did you mean 'score'?); choices: ponder, score, score025, "
            "shared_plain, shared_residual, skip05, stacked, stacked_plain",
        ),
        (
            ["task=esol_mpl"],
            "unknown task 'esol_mpl' (did you mean 'esol_mlp'?); choices: esol_gnn, esol_mlp, "
            "freesolv_gnn, freesolv_mlp, lipo_gnn, lipo_mlp, shakespeare_char, "
            "shakespeare_char_cpu, shakespeare_gpt2",
        ),
        (
            ["task=esol_gnn", "task/model=mol_gn"],
            "unknown task/model 'mol_gn' (did you mean 'mol_gnn'?); choices: attentivefp, mol_gnn",
        ),
        (["trainer=cpuu"], "unknown trainer 'cpuu' (did you mean 'cpu'?); choices: cpu, ddp, "),
        (["logger=tensorbord"], "unknown logger 'tensorbord' (did you mean 'tensorboard'?)"),
        (["callbacks=defualt"], "unknown callbacks 'defualt' (did you mean 'default'?)"),
        (["hydra/launcher=jobli"], "unknown hydra/launcher 'jobli' (did you mean 'joblib'?)"),
        (["depth=_schema"], "unknown depth '_schema'; choices: ponder, score, "),
        (["task=_base"], "unknown task '_base'; choices: esol_gnn, "),
        (["task.model.hiden=32"], "unknown key 'task.model.hiden' (did you mean 'hidden'?)"),
        (
            ["+task.model.hiden=32"],
            "RecurrentMLP (task.model) takes no argument 'hiden' (did you mean 'hidden'?)",
        ),
        (
            ["task=esol_gnn", "+task.model.hiden=32"],
            "MolGNN (task.model) takes no argument 'hiden' (did you mean 'hidden'?)",
        ),
        (
            ["task.data.batch_sise=8"],
            "unknown key 'task.data.batch_sise' (did you mean 'batch_size'?)",
        ),
        (
            ["+task.data.batch_sise=8"],
            "DescriptorDataModule (task.data) takes no argument 'batch_sise' (did you mean "
            "'batch_size'?)",
        ),
        (
            ["+task.module.lrr=0.1"],
            "RegressionModule (task.module) takes no argument 'lrr' (did you mean 'lr'?)",
        ),
        (["trainer.max_epoch=3"], "unknown key 'trainer.max_epoch' (did you mean 'max_epochs'?)"),
        (["sed=1"], "unknown key 'sed' (did you mean 'seed'?)"),
        # Values no constructor has seen yet, checked before the folder exists.
        (["task.module.lr=-1"], "task.module.lr must be a number > 0, got -1"),
        (["depth.dt=-1"], "invalid depth config: dt must be > 0 (or null for 1/steps), got -1.0"),
    ],
)
def test_a_mistake_is_one_line_with_a_did_you_mean_and_leaves_no_folder(tmp_path, args, message):
    assert _refused(tmp_path, *args).startswith(message)


def test_a_key_another_group_left_on_a_model_is_one_line_and_leaves_no_folder(tmp_path):
    """An experiment sets task.model.hidden (MolGNN's); task/model=attentivefp then keeps it, and
    AttentiveFP takes no such argument: one line before the folder, not a TypeError after it."""
    line = _refused(tmp_path, "experiment=claims_moleculenet_gnn_cpu", "task/model=attentivefp")
    assert line.startswith("AttentiveFPReference (task.model) takes no argument 'hidden'")
    assert "~task.model.hidden" in line and "hidden_channels" in line


@pytest.mark.parametrize("kind", ["experiment", "task"])
def test_every_shipped_config_gives_its_constructors_only_their_arguments(kind):
    """The check above never refuses a config the project ships: every experiment, every task
    (GNN tasks with either model)."""
    from score_exp.config import CONFIG_DIR, check_arguments, compose

    names = sorted(p.stem for p in (Path(CONFIG_DIR) / kind).glob("*.yaml") if p.stem[0] != "_")
    assert names
    for name in names:
        models = ["mol_gnn", "attentivefp"] if kind == "task" and "gnn" in name else [None]
        for model in models:
            extra = [f"task/model={model}"] if model else []
            check_arguments(compose(f"{kind}={name}", *extra))


def test_every_value_of_a_sweep_is_checked_before_the_sweep_starts(tmp_path):
    line = _refused(tmp_path, "depth=score,scor", "seed=0,1", multirun=True)
    assert line.startswith("unknown depth 'scor' (did you mean 'score'?)")
    line = _refused(tmp_path, "+task.model.hiden=32", "seed=0,1", multirun=True)
    assert line.startswith("RecurrentMLP (task.model) takes no argument 'hiden'")


def test_the_default_run_folder_is_checked_for_a_single_run(tmp_path):
    """The default folder (outputs/<experiment>/<time>_<depth>_s<seed>) reads Hydra's choices:
    checked all the same; a file named ``outputs`` is one line, not a NotADirectoryError."""
    (tmp_path / "outputs").write_text("a file")
    out = run_cli(*QUIET, *ONE_EPOCH_NARROW, cwd=tmp_path)
    line = one_error_line(out)
    assert "HydraConfig was not set" not in out.stderr
    assert line.startswith(f"score-train: error: hydra.run.dir={tmp_path}/outputs/esol_mlp/")
    assert line.endswith(
        f"cannot be a folder: {tmp_path}/outputs is a file; choose another hydra.run.dir"
    )
    assert (tmp_path / "outputs").read_text() == "a file"


# ----------------------------------------------------------------------------- what runs report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("first_contact") / "run"
    out = train_cli(run_dir, *ONE_EPOCH_NARROW)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HydraConfig was not set" not in out.stderr  # the output check ran, quietly
    return run_dir


def test_score_eval_prints_its_metric_as_the_report_does(tiny_run):
    out = run_cli(f"run_dir={tiny_run}", module="score_exp.cli.eval")
    assert out.returncode == 0, out.stderr[-3000:]
    header, row = out.stdout.strip().splitlines()[-2:]
    assert header.split()[-1] == "test/rmse"  # the headline, last column
    cells = {"test/rmse": row.split()[-1]}
    with open(tiny_run / "eval.csv", newline="") as f:
        (full,) = list(csv.DictReader(f))
    assert cells["test/rmse"] == f"{float(full['test/rmse']):.4f}"  # eval.csv keeps every digit
    assert len(full["test/rmse"]) > len(cells["test/rmse"])


@pytest.mark.slow
def test_a_wandb_run_logged_offline_says_how_to_upload_it(tmp_path):
    env = cli_env(NETRC=str(tmp_path / "no-netrc"))
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(key, None)
    run_dir = tmp_path / "wb"
    out = train_cli(run_dir, "logger=wandb", *ONE_EPOCH_NARROW, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    assert f"upload it with `wandb sync {offline}`" in out.stderr


@pytest.mark.slow
def test_a_fixed_point_run_records_the_evaluations_it_spends(tmp_path):
    run_dir = tmp_path / "fp"
    out = train_cli(
        run_dir, *ONE_EPOCH_NARROW, "depth.solver=fixed_point", "depth.inject=add", timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = load_results(run_dir)
    spent = r["solver"]["test"]["nfe"]
    assert r["nfe"] == spent
    assert spent > r["depth"]["steps"]  # the solves iterate beyond the nominal steps
    assert 2 <= spent <= r["solver"]["max_iter"] + 1
    assert f"nfe {spent}" in out.stdout


@pytest.mark.slow
def test_val_check_interval_counts_optimiser_steps_with_gradient_accumulation(tmp_path):
    run_dir = tmp_path / "acc"
    args = ["task=shakespeare_char_cpu", "task.max_steps=8", "task.val_check_interval=4",
            "task.data.eval_iters=2", "+trainer.accumulate_grad_batches=2"]  # fmt: skip
    out = train_cli(run_dir, *args, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(run_dir / "metrics.csv", newline="") as f:
        val_rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    # Validation after optimiser steps 4 and 8 (Lightning logs a pass at the steps - 1).
    assert [int(r["step"]) for r in val_rows] == [3, 7]
    assert load_results(run_dir)["best_val"]["step"] in (4, 8)
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
