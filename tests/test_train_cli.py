"""The real ``score-train`` CLI on the real configs: runs, records, bad input, divergence."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from conftest import CONFIG_DIR, TINY, cli_env, load_results, run_cli, train_cli

from score_exp.config import depth_spec
from score_exp.core import DepthSpec

PRESETS = ["score", "stacked", "stacked_plain", "skip05", "shared_residual", "shared_plain"]


# ----------------------------------------------------------------------------- composition


@pytest.mark.parametrize("preset", PRESETS)
def test_every_depth_preset_composes_to_a_valid_spec(compose, preset):
    cfg = compose("task=esol_mlp", f"depth={preset}")
    spec = depth_spec(cfg)
    assert isinstance(spec, DepthSpec) and spec.steps == cfg.task.steps == 4
    expected = {
        "score": (True, "contractive", 0.5),
        "stacked": (False, "residual", 1.0),  # the MLP task's conventional skip
        "stacked_plain": (False, "none", None),
        "skip05": (False, "contractive", 0.5),
        "shared_residual": (True, "residual", 1.0),
        "shared_plain": (True, "none", None),
    }[preset]
    assert (spec.share, spec.update, spec.dt) == expected


def test_depth_fields_override_from_the_command_line(compose):
    cfg = compose("depth=score", "depth.dt=0.25", "depth.steps=8", "depth.integrator=rk4")
    assert depth_spec(cfg) == DepthSpec(share=True, steps=8, dt=0.25, integrator="rk4")


def test_help_lists_groups_and_examples():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("score-train", "depth:", "task:", "esol_mlp", "-m depth="):
        assert word in out.stdout, word
    # Every preset on disk is listed in its group's line, so new presets can never go missing from --help.
    depth_line = next(line for line in out.stdout.splitlines() if line.startswith("depth:"))
    listed = {name.strip() for name in depth_line.split(":", 1)[1].split(",")}
    on_disk = {p.stem for p in (CONFIG_DIR / "depth").glob("*.yaml")}
    assert on_disk <= listed, on_disk - listed


# ----------------------------------------------------------------------------- a real run


@pytest.fixture
def mlp_run(tiny_run):
    """The suite's TINY run by the real score-train (conftest.tiny_run): read, never changed."""
    return tiny_run


def test_run_writes_the_documented_record(mlp_run):
    run_dir, out = mlp_run
    r = load_results(run_dir)
    assert r["task"] == "esol_mlp" and r["status"] == "ok" and r["seed"] == 0
    assert r["depth"] == {
        "share": True, "update": "contractive", "steps": 4, "dt": 0.5, "integrator": "euler"
    }  # fmt: skip
    assert r["depth_preset"] == "score"
    assert r["nfe"] == 4
    n_features = len(json.loads((run_dir / "splits.json").read_text())["train_idx"])
    assert n_features > 0
    # encoder (F*32+32) + one shared block (LayerNorm 64 + Linear 32*32+32) + head (33)
    in_features = (r["params"] - 64 - 32 * 32 - 32 - 33 - 32) // 32
    assert r["params"] == in_features * 32 + 32 + 64 + 32 * 32 + 32 + 33
    best = r["best_val"]
    assert best["metric"] == "val/rmse" and best["epoch"] in (0, 1) and best["step"] > 0
    assert math.isclose(best["value"], r["val"]["rmse"], rel_tol=1e-5)
    assert set(r["test"]) >= {"rmse", "mae", "r2"} and 0 < r["test"]["rmse"] < 5
    assert r["wall_time_s"] > 0 and r["time_per_epoch_s"] > 0
    assert r["versions"]["torch"].startswith("2.13.0") and "lightning" in r["versions"]
    assert "git" in r
    assert f"results: {run_dir / 'results.json'}" in out.stdout
    assert "test/rmse =" in out.stdout


def test_run_folder_holds_config_metrics_checkpoints_and_splits(mlp_run):
    run_dir, _ = mlp_run
    assert "share: true" in (run_dir / "config.yaml").read_text()
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert any(row.get("val/rmse") for row in rows) and any(row.get("train/loss") for row in rows)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / load_results(run_dir)["best_checkpoint"]).exists()
    splits = json.loads((run_dir / "splits.json").read_text())
    idx = [set(splits[f"{k}_idx"]) for k in ("train", "val", "test")]
    assert sum(map(len, idx)) == 1128 and not (
        idx[0] & idx[1] or idx[0] & idx[2] or idx[1] & idx[2]
    )
    assert splits["split"] == "random" and splits["data"]["n_invalid"] == 0


@pytest.mark.slow
def test_same_seed_same_numbers_on_cpu(mlp_run, tmp_path):
    run_dir, _ = mlp_run
    again = tmp_path / "again"
    assert train_cli(again, *TINY).returncode == 0
    a, b = load_results(run_dir), load_results(again)
    # Exact: two runs of the same code on this machine (a property of the code, determinism;
    # another CPU's kernels would give other, equally repeatable bits).
    assert a["test"] == b["test"] and a["best_val"] == b["best_val"]
    other = tmp_path / "seed1"
    assert train_cli(other, *TINY, "seed=1").returncode == 0
    assert load_results(other)["test"] != a["test"]


def test_rerun_into_a_finished_folder_skips_it(mlp_run):
    run_dir, _ = mlp_run
    before = (run_dir / "results.json").read_text()
    out = train_cli(run_dir, *TINY)
    assert out.returncode == 0 and "already finished" in out.stderr + out.stdout
    assert (run_dir / "results.json").read_text() == before


@pytest.mark.slow
def test_mlp_learns_well_below_the_mean_predictor(tmp_path):
    run_dir = tmp_path / "learn"
    out = train_cli(run_dir, "trainer.max_epochs=25", "callbacks.early_stopping=null")
    assert out.returncode == 0, out.stderr[-2000:]
    r = load_results(run_dir)
    # the mean predictor's test RMSE, from the run's own split, in the same units
    from score_exp.data import fetch
    from score_exp.data.molecules import ESOL_SMILES_COLUMN, ESOL_TARGET_COLUMN, read_molecule_csv

    y = read_molecule_csv(fetch("esol"), ESOL_SMILES_COLUMN, ESOL_TARGET_COLUMN).y
    splits = json.loads((run_dir / "splits.json").read_text())
    mean_rmse = float(
        np.sqrt(np.mean((y[splits["test_idx"]] - y[splits["train_idx"]].mean()) ** 2))
    )
    assert mean_rmse > 1.5
    assert r["test"]["rmse"] < 0.5 * mean_rmse, (r["test"], mean_rmse)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["depth.integrator=dopri5"], "valid integrators: euler, heun, midpoint, rk4"),
        (["depth.steps=0"], "steps must be >= 1"),
        (["depth.dt=-1"], "dt must be > 0"),
        (["depth.update=additive"], "valid updates"),
        (["depth=stacked_plain", "depth.integrator=rk4"], "must be 'euler'"),
    ],
)
def test_bad_depth_is_one_clear_error_and_no_result(tmp_path, overrides, message):
    run_dir = tmp_path / "bad"
    out = train_cli(run_dir, *overrides)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (run_dir / "results.json").exists()


def test_unknown_preset_is_one_line_with_the_choices(tmp_path):
    out = train_cli(tmp_path / "bad", "depth=bogus")
    assert out.returncode == 2
    assert "score-train: error: unknown depth 'bogus'; choices: ponder, score, " in out.stderr
    assert not (tmp_path / "bad").exists()  # refused before Hydra made the folder


def test_csv_without_the_target_column(tmp_path):
    data = tmp_path / "mine.csv"
    data.write_text("smi,logP\nCCO,1.0\nCCC,2.0\n")
    out = train_cli(
        tmp_path / "bad", f"task.data.path={data}", "task.data.smiles_column=smi",
        "task.data.target_column=solubility",
    )  # fmt: skip
    assert out.returncode == 2
    assert "['solubility'] not found" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "bad" / "results.json").exists()


def test_wrong_checksum_in_the_mirror(tmp_path):
    mirror = tmp_path / "mirror" / "esol"
    mirror.mkdir(parents=True)
    (mirror / "delaney-processed.csv").write_text(
        "smiles,measured log solubility in mols per litre\n"
    )
    env = cli_env(
        SCORE_DATA_MIRROR=str(tmp_path / "mirror"), SCORE_DATA_DIR=str(tmp_path / "cache"),
        SCORE_DATA_OFFLINE="1",
    )  # fmt: skip
    out = train_cli(tmp_path / "bad", env=env)
    assert out.returncode == 2
    assert "checksum mismatch for esol/delaney-processed.csv" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "bad" / "results.json").exists()


@pytest.mark.slow
def test_user_csv_with_own_columns_trains(tmp_path):
    """Point the task at your own CSV: invalid SMILES are counted in splits.json."""
    from score_exp.data import fetch

    rows = list(csv.DictReader(fetch("esol").open()))[:200]
    data = tmp_path / "mine.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["smi", "logS"])
        w.writerows([(r["smiles"], r["measured log solubility in mols per litre"]) for r in rows])
        w.writerow(["this is not smiles", "1.0"])
    run_dir = tmp_path / "mine"
    out = train_cli(
        run_dir, *TINY, f"task.data.path={data}", "task.data.smiles_column=smi",
        "task.data.target_column=logS",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipped 1 of 201 rows" in out.stderr
    info = json.loads((run_dir / "splits.json").read_text())["data"]
    assert info["n_valid"] == 200 and info["n_invalid"] == 1
    assert load_results(run_dir)["status"] == "ok"


# ----------------------------------------------------------------------------- divergence


@pytest.mark.slow
def test_diverged_run_is_recorded_and_exits_zero_unless_asked(tmp_path):
    # dt = 1e30 on an additive update overflows the state: the loss becomes inf at once.
    bad = ["depth=shared_residual", "depth.dt=1e30", *TINY]
    out = train_cli(tmp_path / "div", *bad)
    assert out.returncode == 0, out.stderr[-2000:]
    r = load_results(tmp_path / "div")
    assert r["status"] == "diverged" and r["diverged_at"]["step"] >= 0
    assert (tmp_path / "div" / "metrics.csv").exists() and (
        tmp_path / "div" / "config.yaml"
    ).exists()
    out = train_cli(tmp_path / "div2", *bad, "fail_on_diverge=true")
    assert out.returncode == 3 and load_results(tmp_path / "div2")["status"] == "diverged"


@pytest.mark.slow
def test_wandb_logger_runs_offline_without_a_key(tmp_path):
    env = cli_env(WANDB_API_KEY="", WANDB_MODE="", NETRC=str(tmp_path / "no-netrc"))
    env.pop("WANDB_API_KEY")
    env.pop("WANDB_MODE")
    run_dir = tmp_path / "wb"
    out = train_cli(
        run_dir,
        "logger=wandb",
        "trainer.max_epochs=1",
        "task.model.hidden=16",
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert (run_dir / "metrics.csv").exists()  # CSV stays on for score-report


# ----------------------------------------------------------------------------- paper sweeps

PAPER = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("paper_*.yaml"))


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_sweep_files_compose_at_both_ends_of_their_grid(compose, experiment):
    """Every sweep file names its claim and composes into valid runs at its first and last point."""
    text = (CONFIG_DIR / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_") and ("claim" in text or "CPU-sized" in text)
    cfg = compose(f"experiment={experiment}", return_hydra_config=True)
    assert cfg.experiment_name == experiment
    params = dict(cfg.hydra.sweeper.params)
    assert params["seed"].split(",")[0] == "0"
    for pick in (0, -1):
        point = [f"{k}={str(v).split(',')[pick]}" for k, v in params.items()]
        run = compose(f"experiment={experiment}", *point)
        depth_spec(run)  # a valid DepthSpec (raises ConfigError otherwise)
        assert run.experiment_name == experiment


def test_cpu_sweeps_are_cpu_sized_versions_of_the_full_ones(compose):
    # A _cpu sweep runs on the CPU and sweeps a subset of its full sweep's variants (values of
    # each swept key); seeds may differ (every CPU grid runs 5 seeds for the paired statistics).
    for name in [p for p in PAPER if p.endswith("_cpu")]:
        full = compose(f"experiment={name.removesuffix('_cpu')}", return_hydra_config=True)
        cpu = compose(f"experiment={name}", return_hydra_config=True)
        full_params, cpu_params = full.hydra.sweeper.params, cpu.hydra.sweeper.params
        for key, values in cpu_params.items():
            if key != "seed" and key in full_params:
                assert set(str(values).split(",")) <= set(str(full_params[key]).split(",")), (
                    name,
                    key,
                )
        assert cpu.trainer.accelerator == "cpu", name


def test_slurm_launcher_takes_cluster_settings_from_the_cli(compose):
    cfg = compose(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=proj",
        "hydra.launcher.gpus_per_node=4",
        return_hydra_config=True,
    )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert (launcher.partition, launcher.account, launcher.gpus_per_node) == ("gpu", "proj", 4)
