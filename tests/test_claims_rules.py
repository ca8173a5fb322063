"""The verdict rules of claims.md on synthetic runs whose right answer is known: Holm over each
claim's rows, censored convergence (sign test), non-inferiority with a declared margin, each
configuration counted once, the dataset rule; including the cases where the old rule (per-row t
interval, censored runs counted at their last epoch, "nothing significantly better" = supported)
said "supported" and the new one does not."""

from __future__ import annotations

import pytest
import yaml
from scipy import stats
from test_report import write_run

from score_exp.report.build import build_report
from score_exp.report.claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    MIXED,
    SUPPORTED,
    dataset_verdict,
)
from score_exp.report.stats import holm, noninferiority_p, sign_test


def _claims(root, name: str):
    return [c for c in build_report([root], root / "out").claims if c.claim == name]


def _experiment(run, name: str) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["experiment_name"] = name
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


# ----------------------------------------------------------------------------- the tests' maths


def test_holm_matches_the_step_down_definition():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert holm([None, 0.5, 0.9]) == [None, pytest.approx(1.0), pytest.approx(1.0)]
    # the case: p = 0.025 in a family of 12 is no longer significant
    assert holm([0.025] + [0.5] * 11)[0] == pytest.approx(0.3)


def test_sign_test_and_non_inferiority_match_scipy():
    assert sign_test(5, 0) == pytest.approx(0.0625)  # 5 pairs can never reach 0.05
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(0, 0) is None
    d = [0.01, -0.02, 0.005, 0.0, 0.015]
    t = (sum(d) / 5 - 0.05) / (stats.tstd(d) / 5**0.5)
    assert noninferiority_p(d, 0.05) == pytest.approx(stats.t.cdf(t, 4))
    assert noninferiority_p(d, 0.05) < 0.05 < noninferiority_p(d, 0.005)


# ----------------------------------------------------------------------------- convergence


def _convergence_sweep(root, score_curves: dict[int, list[float]]):
    for s, curve in score_curves.items():
        write_run(root, f"st{s}", preset="stacked", share=False, seed=s, params=400, rmse=0.6,
                  curve=[1.0, 0.9, 0.8, 0.7, 0.6, 0.6])  # fmt: skip
        write_run(root, f"sc{s}", seed=s, params=100, rmse=0.6, curve=curve)


def test_a_run_that_never_reaches_the_target_is_not_fast(tmp_path):
    """Stacked reaches its best (0.6) at epoch 5. SCORE reaches it at epoch 2 in 5 seeds and stops
    early without reaching it in 2: the old rule counted those at their last epoch (2 and 3: 'fast')
    and called the row supported (t interval below 0); censored, they are 2 slower pairs."""
    fast = [1.0, 0.6, 0.6]
    curves = {s: fast for s in range(5)} | {5: [1.0, 0.9], 6: [1.0, 0.9, 0.8]}
    _convergence_sweep(tmp_path, curves)
    (row,) = _claims(tmp_path, "faster convergence")
    assert "reached stacked's best in 5/7; faster in 5, slower in 2 (2 never reached)" in row.effect
    assert row.p == [pytest.approx(sign_test(5, 2))] and row.verdict == INCONCLUSIVE


def test_faster_convergence_is_supported_with_enough_pairs_and_contradicted_the_other_way(tmp_path):
    _convergence_sweep(tmp_path / "a", {s: [1.0, 0.6, 0.6] for s in range(7)})
    (row,) = _claims(tmp_path / "a", "faster convergence")
    assert row.verdict == SUPPORTED and row.p_holm[0] == pytest.approx(2 / 128)
    # every SCORE run stops without reaching stacked's best: contradicted (not "a lower bound")
    _convergence_sweep(tmp_path / "b", {s: [1.0, 0.9] for s in range(7)})
    (row,) = _claims(tmp_path / "b", "faster convergence")
    assert row.verdict == CONTRADICTED and "0/7" in row.effect and row.ci == "n/a"


def test_holm_is_taken_over_every_row_of_a_claim(tmp_path):
    """Two experiments, 6 pairs each: one row alone has p = 2/64 = 0.031 (supported on its own);
    a second, null row (3 faster, 3 slower: p = 1) makes a family of two, and Holm gives 0.0625:
    the row is no longer supported."""
    for exp, n, fast in (("e1", 6, True), ("e2", 6, False)):
        for s in range(n):
            st = write_run(tmp_path, f"{exp}/st{s}", preset="stacked", share=False, seed=s,
                           params=400, rmse=0.6, curve=[1.0, 0.8, 0.6])  # fmt: skip
            # e2: faster in half the seeds, slower in the other half (p = 1)
            curve = [1.0, 0.6] if fast or s % 2 else [1.0, 0.8, 0.7, 0.6]
            sc = write_run(tmp_path, f"{exp}/sc{s}", seed=s, params=100, rmse=0.6, curve=curve,
                           steps=4 if fast else 5)  # fmt: skip
            for r in (st, sc):
                _experiment(r, exp)
    rows = {c.experiment.split(" / ")[0]: c for c in _claims(tmp_path, "faster convergence")}
    assert rows["e1"].p == [pytest.approx(2 / 64)]  # 6 of 6 faster: alone, supported
    assert rows["e1"].p_holm == [pytest.approx(min(1.0, 2 * 2 / 64))]
    assert rows["e1"].verdict == INCONCLUSIVE


def test_zero_spread_renders_as_such_not_as_a_zero_width_interval(tmp_path):
    _convergence_sweep(tmp_path, {s: [1.0, 0.9, 0.8, 0.7, 0.6] for s in range(3)})  # all tie
    (row,) = _claims(tmp_path, "faster convergence")
    assert "[+0.0, +0.0]" not in row.ci and row.ci == "n/a (every pair +0.0)"
    assert "ties 3" in row.effect and row.verdict == INCONCLUSIVE


# ----------------------------------------------------------------------------- non-inferiority


def _integrators(root, heun: list[float], rk4: list[float], euler: list[float]):
    for integ, values, t in (("euler", euler, 0.01), ("heun", heun, 0.02), ("rk4", rk4, 0.04)):
        for s, v in enumerate(values):
            write_run(root, f"{integ}{s}", integrator=integ, seed=s, rmse=v, curve=[v],
                      time_per_step=t)  # fmt: skip


def test_absence_of_a_difference_is_not_support_for_euler(tmp_path):
    """Heun and RK4 are better on average (-0.02, -0.04) but noisy (5 seeds): nothing is
    significantly better, which the old rule scored as 'supported'; Euler within 5% of them is not
    shown either (the interval reaches beyond the margin): inconclusive."""
    euler = [1.0, 1.2, 0.9, 1.1, 1.0]
    noise = [0.15, -0.2, 0.1, -0.1, 0.2]
    _integrators(tmp_path, [e - 0.02 + n for e, n in zip(euler, noise, strict=True)],
                 [e - 0.04 - n for e, n in zip(euler, noise, strict=True)], euler)  # fmt: skip
    rows = _claims(tmp_path, "Euler the best cost/quality trade-off")
    assert len(rows) == 2 and all(c.verdict == INCONCLUSIVE for c in rows)


def test_euler_no_worse_within_the_margin_is_supported_and_a_better_rival_contradicts(tmp_path):
    euler = [1.0, 1.2, 0.9, 1.1, 1.0]
    tiny = [0.002, -0.001, 0.001, -0.002, 0.0]
    _integrators(tmp_path / "a", [e + n for e, n in zip(euler, tiny, strict=True)],
                 [e - n for e, n in zip(euler, tiny, strict=True)], euler)  # fmt: skip
    rows = _claims(tmp_path / "a", "Euler the best cost/quality trade-off")
    assert [c.verdict for c in rows] == [SUPPORTED, SUPPORTED]
    assert all("margin 0.05" in c.effect for c in rows)  # 5% of the rival's mean RMSE (1.04)
    # RK4 better by 0.2 on every seed (a little spread): contradicted; Heun the same as Euler
    _integrators(tmp_path / "b", [e + n for e, n in zip(euler, tiny, strict=True)],
                 [e - 0.2 + n for e, n in zip(euler, tiny, strict=True)], euler)  # fmt: skip
    by = {c.effect.split(" ")[0]: c for c in _claims(tmp_path / "b", "Euler the best cost/quality trade-off")}  # fmt: skip
    assert by["rk4"].verdict == CONTRADICTED and by["heun"].verdict == SUPPORTED


# ----------------------------------------------------------------------------- counted once


def test_one_configuration_in_two_experiments_is_one_row(tmp_path):
    for exp in ("claims_a", "claims_b"):
        for s in range(3):
            for preset, share, params in (("stacked", False, 400), ("score", True, 100)):
                run = write_run(tmp_path, f"{exp}/{preset}{s}", preset=preset, share=share,
                                seed=s, params=params, rmse=0.6, curve=[1.0, 0.6])  # fmt: skip
                _experiment(run, exp)
    rows = _claims(tmp_path, "fewer parameters")
    assert len(rows) == 1 and rows[0].experiment == "claims_a / toy (= claims_b)"
    assert len(_claims(tmp_path, "faster convergence")) == 1


# ----------------------------------------------------------------------------- rows -> dataset


def test_the_dataset_rule():
    assert dataset_verdict({SUPPORTED}) == SUPPORTED
    assert dataset_verdict({SUPPORTED, INCONCLUSIVE}) == INCONCLUSIVE  # old rule: "mixed"
    assert dataset_verdict({SUPPORTED, CONTRADICTED}) == MIXED
    assert dataset_verdict({CONTRADICTED, INCONCLUSIVE}) == CONTRADICTED
    assert dataset_verdict({INCONCLUSIVE}) == INCONCLUSIVE


def test_claims_md_states_its_rules_and_the_runs_at_their_cap(tmp_path):
    _convergence_sweep(tmp_path, {s: [1.0, 0.6] for s in range(3)})
    build_report([tmp_path], tmp_path / "out")
    md = (tmp_path / "out" / "claims.md").read_text()
    assert "Holm's step-down method" in md and "censored" in md and "non-inferiority" in md
    assert "From rows to a dataset" in md
    # write_run: max_epochs 10, no epochs_timed -> no cap table; add it and it is counted
    for run in tmp_path.glob("st*"):
        import json

        res = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(json.dumps({**res, "epochs_timed": 10}))
    build_report([tmp_path], tmp_path / "out2")
    md = (tmp_path / "out2" / "claims.md").read_text()
    assert "3 of 3 ok runs (100%) trained to `trainer.max_epochs`" in md
