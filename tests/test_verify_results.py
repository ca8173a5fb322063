"""make verify-results: a portable snapshot re-trained here gives the same bits (exit 0); a changed
recorded number is caught (exit 1); a snapshot of default-mode runs is refused, naming them (2)."""

from __future__ import annotations

import json

import pytest
from conftest import QUIET, cli_env, run_cli

from score_exp.report.snapshot import RECORD, snapshot
from score_exp.runs.verify import sample, verify


@pytest.fixture(scope="module")
def portable_snapshot(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    sweep = root / "sweep"
    # Launched with a hostile environment: the portable mode must win over it.
    env = cli_env(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AUTO", OMP_NUM_THREADS="2")
    proc = run_cli("-m", "numerics=portable", "depth=score,stacked", "seed=0", "task.max_epochs=2",
                   f"hydra.sweep.dir={sweep}", *QUIET, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = root / "results"
    snapshot(out, [sweep], [], "make results", None)
    return out


@pytest.mark.slow
def test_a_portable_snapshot_verifies_and_a_changed_number_does_not(
    portable_snapshot, tmp_path, capsys
):
    assert verify(portable_snapshot, per_task=2, budget_s=1e9, jobs=2) == 0
    out = capsys.readouterr().out
    assert "2/2 runs bit-identical; largest difference 0" in out
    bad = tmp_path / "bad"
    bad.mkdir()
    rec = json.loads((portable_snapshot / RECORD).read_text())
    for r in rec["runs"]:
        r["results"]["test"]["rmse"] += 1e-7  # a rounding-level change is a difference
    (bad / RECORD).write_text(json.dumps(rec))
    assert verify(bad, per_task=1, budget_s=1e9, jobs=1) == 1
    assert "0/1 runs bit-identical; largest difference 1e-07" in capsys.readouterr().out


def test_a_default_mode_snapshot_is_refused_naming_its_runs(tmp_path, capsys):
    runs = [{"path": f"multirun/x/seed={s}", "config": {"experiment_name": "e"},
             "results": {"status": "ok", "task": "esol_mlp", "overrides": [f"seed={s}"],
                         "wall_time_s": 1.0, **({"numerics": {"mode": "portable"}} if s else {})}}
            for s in range(3)]  # fmt: skip
    (tmp_path / RECORD).write_text(json.dumps({"paths": [], "runs": runs}))
    assert verify(tmp_path, per_task=3, budget_s=100, jobs=1) == 2
    err = capsys.readouterr().err
    assert "1 of the 3 sampled runs were not trained with numerics=portable" in err
    assert "multirun/x/seed=0" in err and "seed=1" not in err


def test_the_sample_takes_the_quickest_runs_of_every_task_within_the_budget():
    runs = [{"path": f"{t}/{s}", "config": {"experiment_name": "e"},
             "results": {"status": "ok", "task": t, "overrides": [], "wall_time_s": w}}
            for t, ws in (("a", [5, 1, 3]), ("b", [100, 2])) for s, w in enumerate(ws)]  # fmt: skip
    picked = [r["path"] for r in sample({"runs": runs}, per_task=2, budget_s=10)]
    assert picked == ["a/1", "b/1", "a/2"]  # b's second (100 s) is over the budget
