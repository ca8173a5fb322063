"""score-report on hand-written run folders whose numbers are known exactly."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import run_cli

from score_exp.report.build import build_report
from score_exp.report.runs import read_curve


def write_run(root: Path, name: str, *, preset="score", seed=0, share=True, steps=4, dt=0.5,
              integrator="euler", rmse=1.0, curve=(), status="ok", params=100, nfe=None,
              time_per_step=0.01) -> Path:  # fmt: skip
    """A run folder as score-train writes it (only the files the report reads)."""
    run = root / name
    run.mkdir(parents=True)
    depth = {
        "share": share,
        "update": "contractive",
        "steps": steps,
        "dt": dt,
        "integrator": integrator,
    }
    evals = {"euler": 1, "heun": 2, "rk4": 4}[integrator]
    config = {"task": {"name": "toy", "headline": "rmse", "monitor": "val/rmse", "monitor_mode": "min"},
              "depth": depth, "depth_preset": preset, "seed": seed, "experiment_name": "toy_sweep",
              "trainer": {"max_epochs": 10, "max_steps": -1}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"task": "toy", "status": status, "seed": seed, "depth": depth, "depth_preset": preset,
               "params": params, "nfe": nfe or steps * evals, "time_per_epoch_s": 10 * time_per_step,
               "time_per_step_s": time_per_step, "wall_time_s": 100 * time_per_step}  # fmt: skip
    if status == "ok":
        results["test"] = {"rmse": rmse}
        results["best_val"] = {"metric": "val/rmse", "value": min(curve) if curve else rmse}
    (run / "results.json").write_text(json.dumps(results))
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/rmse"])
        for e, v in enumerate(curve):
            w.writerow([e, 10 * e + 9, "", v])
            w.writerow([e, 10 * e + 9, 0.1, ""])
    return run


def test_convergence_column_counts_epochs_to_the_stacked_target(tmp_path):
    # stacked best vals 0.8 and 0.6 -> target 0.7: one stacked seed reaches it after 2 epochs,
    # the other never; score reaches it after 2 and 3 epochs.
    write_run(
        tmp_path, "st0", preset="stacked", share=False, seed=0, rmse=0.9, curve=[1.0, 0.9, 0.8]
    )
    write_run(
        tmp_path, "st1", preset="stacked", share=False, seed=1, rmse=0.7, curve=[1.0, 0.6, 0.6]
    )
    write_run(tmp_path, "sc0", seed=0, rmse=0.5, curve=[0.9, 0.7, 0.5])
    write_run(tmp_path, "sc1", seed=1, rmse=0.6, curve=[0.9, 0.8, 0.65])
    write_run(tmp_path, "slow", preset="shared_plain", rmse=2.0, curve=[3.0, 2.0])
    rep = build_report([tmp_path], tmp_path / "out")
    rows = {r["variant"]: r for r in rep.tables[0].records}
    assert rows["stacked"]["to_target"] == 2 and rows["stacked"]["reached"] == 1
    assert (
        rows["score"]["to_target"] == pytest.approx((2 + 3) / 2) and rows["score"]["reached"] == 2
    )
    assert rows["score"]["mean"] == pytest.approx(0.55) and rows["score"]["std"] == pytest.approx(
        statistics.stdev([0.5, 0.6])
    )
    assert rows["shared_plain"]["to_target"] is None
    md = (tmp_path / "out" / "report.md").read_text()
    assert "not reached" in md and "(1/2 reached)" in md and "0.7000" in md


def test_explicit_target_and_no_stacked_baseline(tmp_path):
    write_run(tmp_path, "a", curve=[0.9, 0.4])
    write_run(tmp_path, "b", seed=1, curve=[0.9, 0.8])
    rep = build_report([tmp_path], tmp_path / "out")
    assert "pass --target" in rep.tables[0].note and rep.tables[0].rows[0][-1] == "n/a"
    rep = build_report([tmp_path], tmp_path / "out2", target=0.85)
    assert rep.tables[0].records[0]["to_target"] == pytest.approx((2 + 2) / 2)


def test_integrator_table_ratios_and_dt_steps_grid(tmp_path):
    for i, (name, t) in enumerate([("euler", 0.01), ("heun", 0.021), ("rk4", 0.039)]):
        for seed in (0, 1):
            write_run(tmp_path, f"{name}{seed}", integrator=name, seed=seed, rmse=0.5 + i / 10 + seed / 100,
                      time_per_step=t, curve=[1.0])  # fmt: skip
    for dt in (0.25, None):
        for steps in (2, 8):
            write_run(tmp_path, f"g{dt}-{steps}", dt=dt, steps=steps, rmse=steps / 10, curve=[1.0])
    rep = build_report([tmp_path], tmp_path / "out")
    integ = next(t for t in rep.tables if "integrators" in t.title)
    by = {r["integrator"]: r for r in integ.records}
    assert list(by) == ["euler", "heun", "rk4"]
    assert by["heun"]["time_ratio"] == pytest.approx(2.1) and by["rk4"][
        "time_ratio"
    ] == pytest.approx(3.9)
    assert by["rk4"]["nfe"] == 16 and by["rk4"]["mean"] == pytest.approx(0.705)
    grid = next(t for t in rep.tables if "dt x steps" in t.title)
    cells = {(r["dt"], r["steps"]): r for r in grid.records}
    assert cells[(None, 8)]["mean"] == pytest.approx(0.8) and cells[(0.25, 2)]["n"] == 1
    assert grid.rows[0][0] == "1/steps"
    assert (tmp_path / "out" / "toy_sweep_toy_vs_dt.png").exists()


def write_eval(run: Path, rows: list[tuple]) -> None:
    """``<run>/eval.csv`` as score-eval writes it: (steps, adaptive_eps, halt, nfe_spent, rmse)."""
    with open(run / "eval.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["steps", "integrator", "dt", "keep_horizon", "adaptive_eps", "halt",
                    "steps_used", "nfe", "nfe_spent", "seconds", "checkpoint", "test/rmse"])  # fmt: skip
        for steps, eps, halt, spent, rmse in rows:
            w.writerow([steps, "euler", 0.5, False, eps, halt, spent, steps, spent, 0.1, "c", rmse])


def test_metric_against_inference_nfe_per_training_scheme(tmp_path):
    for seed in (0, 1):
        fixed = write_run(tmp_path, f"fixed{seed}", seed=seed, curve=[1.0])
        # The third row repeats the first setting: a run's first row per setting counts.
        write_eval(
            fixed,
            [(4, "", "", 4, 0.5 + seed / 10), (8, "", "", 8, 2.0 + seed / 10), (4, "", "", 4, 9.9)],
        )
        random = write_run(tmp_path, f"random{seed}", preset="score_random", seed=seed, curve=[1.0])
        write_eval(random, [(8, "", "", 8, 0.6), (8, 0.1, "kl", 4 + seed, 0.62 + seed / 100)])
    write_run(tmp_path, "no_eval", preset="stacked", share=False, curve=[1.0])  # no eval.csv
    rep = build_report([tmp_path], tmp_path / "out")
    table = next(t for t in rep.tables if "inference NFE" in t.title)
    by = {(r["variant"], r["setting"]): r for r in table.records}
    assert len(by) == 4 and not any(v == "stacked" for v, _ in by)
    assert by[("score", "4 x euler, dt 0.5")]["mean"] == pytest.approx(0.55)
    assert by[("score", "8 x euler, dt 0.5")]["n"] == 2
    halted = by[("score_random", "8 x euler, dt 0.5, halt kl < 0.1")]
    assert halted["nfe"] == pytest.approx(4.5) and halted["mean"] == pytest.approx(0.625)
    assert (tmp_path / "out" / "toy_sweep_toy_vs_inference_nfe.png").exists()
    assert "metric against inference NFE" in (tmp_path / "out" / "report.md").read_text()


def test_read_curve_drops_resumed_repeats_and_the_final_evaluation(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss,val/rmse\n"
        "0,9,,1.0\n0,9,0.5,\n1,19,,0.8\n"  # interrupted here, resumed from epoch 0's checkpoint
        "1,19,,0.8\n1,19,0.4,\n2,29,,0.7\n2,29,0.3,\n"
        "3,30,,0.7\n"  # final evaluation at the best checkpoint: no training in epoch 3
    )
    assert [(r["epoch"], r["value"]) for r in read_curve(path, "val/rmse")] == [
        (0, 1.0),
        (1, 0.8),
        (2, 0.7),
    ]


def test_cli_errors_are_one_line(tmp_path):
    # A sweep folder that does not exist yet, or holds no run yet: nothing to report (exit 1).
    out = run_cli(str(tmp_path / "nope"), module="score_exp.report")
    assert out.returncode == 1 and out.stderr.strip() == (
        f"score-report: nothing to report: no run folder under {tmp_path / 'nope'} "
        "(does not exist yet)"
    )
    assert not (tmp_path / "nope").exists()
    out = run_cli(str(tmp_path), module="score_exp.report")
    assert out.returncode == 1 and "nothing to report" in out.stderr
    out = run_cli(str(tmp_path), str(tmp_path), module="score_exp.report")
    assert out.returncode == 2 and "--out" in out.stderr


@pytest.mark.slow  # starts an offline W&B run (about 6 s)
def test_report_logs_to_an_offline_wandb_run(tmp_path):
    from conftest import cli_env

    write_run(tmp_path / "runs", "a", curve=[1.0, 0.5])
    env = cli_env(WANDB_MODE="offline", NETRC=str(tmp_path / "no-netrc"))
    env.pop("WANDB_API_KEY", None)
    out = run_cli(
        str(tmp_path / "runs"), "--wandb", module="score_exp.report", env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "runs" / "report" / "wandb").glob("offline-run-*"))


def test_ancre_heat_map_and_diagnostics_plots(tmp_path):
    run = write_run(tmp_path, "ancre", curve=[1.0, 0.5], steps=2)
    res = json.loads((run / "results.json").read_text())
    res["connection_weights"] = [[1.0, 0.0, 0.0], [0.2, 0.8, 0.0]]
    (run / "results.json").write_text(json.dumps(res))
    (run / "metrics.csv").write_text(
        "epoch,step,train/loss,val/rmse,diag/contraction_step1,diag/rel_change_step0,diag/rel_change_step1\n"
        "0,9,,1.0,0.9,0.3,0.2\n0,9,0.5,,,,\n1,19,,0.5,0.7,0.25,0.1\n1,19,0.4,,,,\n"
    )
    from score_exp.report.runs import last_values

    assert last_values(run / "metrics.csv", "diag/") == {
        "diag/contraction_step1": 0.7, "diag/rel_change_step0": 0.25, "diag/rel_change_step1": 0.1
    }  # fmt: skip
    rep = build_report([tmp_path], tmp_path / "out")
    names = {p.name for p in rep.figures}
    assert {"toy_sweep_toy_connections.png", "toy_sweep_toy_diagnostics.png"} <= names


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("results.json", '{"task": "toy", "status": "o', "results.json: JSONDecodeError"),
        ("results.json", "[]", "results.json: a JSON list, not an object"),
        ("results.json", '{"task": "toy", "status": "ok", "test": []}', "'test' is a list"),
        ("results.json", '{"status": "ok", "test": {"rmse": "low"}}', "test.rmse is 'low'"),
        ("config.yaml", "task: [unclosed", "config.yaml: ParserError"),
        ("config.yaml", "- a list", "config.yaml: a YAML list"),
        ("metrics.csv", "epoch,step,train/loss,val/rmse\n0,nine,,1.0\n0,9,0.5,\n", "metrics.csv: ValueError"),
        ("metrics.csv", b"\xff\xfe\x00garbage", "metrics.csv: UnicodeDecodeError"),
    ],
)  # fmt: skip
def test_one_unreadable_run_is_listed_and_the_report_still_builds(tmp_path, name, content, reason):
    write_run(tmp_path / "runs", "good0", curve=[1.0, 0.5], rmse=0.5)
    write_run(tmp_path / "runs", "good1", seed=1, curve=[1.0, 0.6], rmse=0.6)
    bad = write_run(tmp_path / "runs", "bad", seed=2, curve=[1.0, 0.4])
    path = bad / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    rep = build_report([tmp_path / "runs"], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    row = next(line for line in md.splitlines() if f"`{bad}`" in line)
    assert "unreadable" in row and reason in row, row
    # The readable runs are averaged in; the bad one is not.
    assert rep.tables[0].records[0]["n"] == 2 and rep.tables[0].records[0]["mean"] == pytest.approx(
        0.55
    )


def test_cli_lists_a_truncated_results_json_by_name_and_exits_0(tmp_path):
    write_run(tmp_path, "good", curve=[1.0, 0.5])
    bad = write_run(tmp_path, "bad", seed=1, curve=[1.0, 0.4])
    (bad / "results.json").write_text('{"task": "toy", "sta')
    out = run_cli(str(tmp_path), module="score_exp.report")
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(x for x in out.stdout.splitlines() if str(bad) in x)
    assert "unreadable" in line and "results.json: JSONDecodeError" in line
    assert (tmp_path / "report" / "report.md").exists()
