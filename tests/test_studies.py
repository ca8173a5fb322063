"""Verdicts across tuning studies (study seeds): the pooled rule on known numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_report import write_run

from score_exp.cli.tune import retrain_commands
from score_exp.report.build import build_report
from score_exp.report.studies import (
    CONTRADICTED,
    INCONCLUSIVE,
    MIXED,
    SUPPORTED,
    paired_verdict,
    pooled_verdict,
    split_study,
    study_experiment,
)


@pytest.mark.parametrize(
    ("verdicts", "expected"),
    [
        ([SUPPORTED, SUPPORTED, SUPPORTED], SUPPORTED),
        ([CONTRADICTED, CONTRADICTED, CONTRADICTED], CONTRADICTED),
        ([CONTRADICTED, INCONCLUSIVE, CONTRADICTED], INCONCLUSIVE),  # the other CPU
        ([SUPPORTED, CONTRADICTED, INCONCLUSIVE], MIXED),
        ([SUPPORTED], INCONCLUSIVE),  # one study is no verdict across studies
        ([], INCONCLUSIVE),
    ],
)
def test_pooled_verdict_holds_only_when_every_study_agrees(verdicts, expected):
    assert pooled_verdict(verdicts) == expected


def test_paired_verdict_reads_the_ci_in_the_metric_direction():
    assert paired_verdict(0.001, 0.059, higher_is_better=False) == CONTRADICTED  # worse RMSE
    assert paired_verdict(-0.047, 0.086, higher_is_better=False) == INCONCLUSIVE
    assert paired_verdict(-0.3, -0.1, higher_is_better=False) == SUPPORTED
    assert paired_verdict(-0.3, -0.1, higher_is_better=True) == CONTRADICTED
    assert paired_verdict(None, None, higher_is_better=False) == INCONCLUSIVE


def test_study_names_round_trip():
    assert study_experiment("tuned_esol_mlp_cpu", 2) == "tuned_esol_mlp_cpu_study2"
    assert study_experiment("tuned_esol_mlp_cpu", None) == "tuned_esol_mlp_cpu"
    assert split_study("tuned_x_study12 / esol_mlp") == ("tuned_x / esol_mlp", 12)
    assert split_study("paper_x / esol_mlp") == ("paper_x / esol_mlp", None)


def test_retrain_names_the_runs_after_their_study_seed(tmp_path):
    best = {"db": str(tmp_path / "study1" / "score" / "optuna.db"),
            "overrides": ["experiment=tune_esol_mlp_cpu", "depth=score", "task.module.lr=0.01"]}  # fmt: skip
    (cmd,) = retrain_commands(best, [3], tmp_path / "retrain" / "study1", [], study_seed=1)
    assert "experiment_name=tuned_esol_mlp_cpu_study1" in cmd and "seed=3" in cmd
    (cmd,) = retrain_commands(best, [3], tmp_path, [])
    assert "experiment_name=tuned_esol_mlp_cpu" in cmd


def test_retrain_puts_the_peers_study_in_the_variants_experiment_when_named(tmp_path):
    """The peer (its own tune_* experiment) is compared with the depth variants only when its
    runs share their experiment name: --name gives every study's runs that one name."""
    peer = {"db": str(tmp_path / "study0" / "attentivefp" / "optuna.db"),
            "overrides": ["experiment=tune_esol_attentivefp_cpu", "task.module.lr=0.003"]}  # fmt: skip
    (cmd,) = retrain_commands(peer, [0], tmp_path, [], study_seed=0)
    assert "experiment_name=tuned_esol_attentivefp_cpu_study0" in cmd  # apart, by default
    (cmd,) = retrain_commands(peer, [0], tmp_path, [], study_seed=0, name="tuned_esol_gnn_cpu")
    assert "experiment_name=tuned_esol_gnn_cpu_study0" in cmd
    assert "experiment=tune_esol_attentivefp_cpu" in cmd  # still the peer's own configuration


def _studies(root: Path, diffs: dict[int, list[float]]) -> None:
    """Per study seed k: score and stacked runs over seeds 0..n-1, score - stacked = diffs[k]."""
    for k, ds in diffs.items():
        for seed, d in enumerate(ds):
            for preset, rmse, share, params in (("stacked", 1.0 + seed, False, 300),
                                                ("score", 1.0 + seed + d, True, 100)):  # fmt: skip
                run = write_run(root, f"study{k}/{preset}/seed={seed}", preset=preset, seed=seed,
                                share=share, rmse=rmse, params=params)  # fmt: skip
                cfg = yaml.safe_load((run / "config.yaml").read_text())
                cfg["experiment_name"] = f"tuned_toy_study{k}"
                (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def test_report_pools_each_comparison_over_the_study_seeds(tmp_path):
    # Study 0 and 1: score clearly worse (CI above 0); study 2: inconclusive -> inconclusive.
    _studies(tmp_path, {0: [0.10, 0.11, 0.12], 1: [0.20, 0.21, 0.22], 2: [-0.1, 0.2, 0.0]})
    report = build_report([tmp_path], tmp_path / "report")
    (table,) = [t for t in report.tables if t.title == "verdicts across study seeds"]
    rows = {r["comparison"]: r for r in table.records}
    paired = rows["score − stacked (test/rmse)"]
    assert paired["experiment"] == "tuned_toy / toy"
    assert [s["verdict"] for s in paired["studies"]] == [CONTRADICTED, CONTRADICTED, INCONCLUSIVE]
    assert [s["effect"] for s in paired["studies"]] == pytest.approx([0.11, 0.21, 0.1 / 3])
    assert paired["spread"] == pytest.approx((0.1 / 3, 0.21))
    assert paired["pooled"] == pytest.approx((0.11 + 0.21 + 0.1 / 3) / 3)
    assert paired["verdict"] == INCONCLUSIVE
    assert rows["fewer parameters"]["verdict"] == SUPPORTED  # exact in every study
    claims_md = (tmp_path / "report" / "claims.md").read_text()
    assert "## Across study seeds" in claims_md and "| score − stacked (test/rmse) |" in claims_md
    assert "study 0: +0.1100 [" in claims_md


def test_every_study_worse_is_contradicted(tmp_path):
    _studies(tmp_path, {0: [0.10, 0.11, 0.12], 1: [0.20, 0.21, 0.22], 2: [0.05, 0.06, 0.07]})
    report = build_report([tmp_path], tmp_path / "report")
    (table,) = [t for t in report.tables if t.title == "verdicts across study seeds"]
    rows = {r["comparison"]: r for r in table.records}
    assert rows["score − stacked (test/rmse)"]["verdict"] == CONTRADICTED


def test_one_study_has_no_across_studies_table(tmp_path):
    _studies(tmp_path, {0: [0.10, 0.11, 0.12]})
    report = build_report([tmp_path], tmp_path / "report")
    assert not [t for t in report.tables if t.title == "verdicts across study seeds"]


@pytest.mark.parametrize(
    ("target", "task"), [("tune-cpu", "esol_mlp"), ("tune-gnn-cpu", "esol_gnn")]
)
def test_tune_targets_repeat_every_study_for_three_study_seeds(target, task):
    """`make -n`: each study once per study seed (the sampler's), each retrained apart, one report."""
    import subprocess
    import sys

    from conftest import REPO

    venv = str(Path(sys.executable).parent.parent)
    out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "for k in 0 1 2; do" in text
    assert f"score-tune study experiment=tune_{task}_cpu depth=$v" in text and "--seed $k" in text
    assert f"--dir multirun/tune_cpu/{task}/study$k/$v" in text and "--jobs 2" in text
    assert f"--out multirun/tune_cpu/{task}/retrain/study$k" in text and "--study-seed $k" in text
    assert f"score-report multirun/tune_cpu/{task}/retrain " in text
    assert f"--name tuned_{task}_cpu" in text  # the peer, if any, compared in the same experiment
    if task == "esol_gnn":  # the peer, tuned with the same budget in every study seed
        assert "for p in attentivefp; do" in text
        assert "score-tune study experiment=tune_esol_${p}_cpu" in text
        assert f"--dir multirun/tune_cpu/{task}/study$k/$p" in text
    else:
        assert "for p in ; do" in text
