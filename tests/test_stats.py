"""Paired statistics in score-report, against values computed here with scipy on synthetic runs."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import yaml
from scipy import stats
from test_report import write_run

from score_exp.report.build import build_report
from score_exp.report.stats import one_sample, paired_diff

# Per-seed test RMSE: the split moves every variant together (big seed-to-seed spread), the
# variants differ by a small, known amount per seed.
SPLIT = [0.9, 0.6, 1.2, 0.7, 1.0]
SCORE_GAIN = [-0.05, -0.03, -0.06, -0.02, -0.04]  # score - stacked
SKIP_GAIN = [0.01, -0.02, 0.03, 0.00, -0.01]  # skip05 - stacked


def _sweep(root, drop_seed=None):
    for s, base in enumerate(SPLIT):
        write_run(root, f"st{s}", preset="stacked", share=False, seed=s, rmse=base, curve=[base])
        if s != drop_seed:
            write_run(
                root, f"sc{s}", preset="score", seed=s, rmse=base + SCORE_GAIN[s], curve=[base]
            )
        write_run(root, f"sk{s}", preset="skip05", share=False, seed=s, rmse=base + SKIP_GAIN[s],
                  curve=[base])  # fmt: skip


def _expected(diffs):
    d = np.asarray(diffs)
    n = len(d)
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return {"n": n, "mean": d.mean(), "ci_low": d.mean() - half, "ci_high": d.mean() + half,
            "p_t": stats.ttest_rel(d, np.zeros(n)).pvalue, "p_wilcoxon": stats.wilcoxon(d).pvalue}  # fmt: skip


def test_paired_table_matches_scipy_on_known_differences(tmp_path):
    _sweep(tmp_path / "runs", drop_seed=3)  # score's seed 3 is missing: 4 pairs
    rep = build_report([tmp_path / "runs"], tmp_path / "out")
    table = next(t for t in rep.tables if "paired" in t.title)
    rows = {r["variant"]: r for r in table.records}
    assert set(rows) == {"score", "skip05"} and rows["score"]["baseline"] == "stacked"
    for name, gains, seeds in (
        ("score", SCORE_GAIN, [0, 1, 2, 4]),
        ("skip05", SKIP_GAIN, range(5)),
    ):
        a = [SPLIT[s] + gains[s] for s in seeds]
        b = [SPLIT[s] for s in seeds]
        want = _expected([x - y for x, y in zip(a, b, strict=True)])
        assert want["p_t"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
        for k, v in want.items():
            assert rows[name][k] == pytest.approx(v, rel=1e-9), (name, k)
    # Paired: score's gain is significant although its spread over seeds is ~10x the gain.
    assert rows["score"]["ci_high"] < 0 and rows["score"]["p_t"] < 0.01
    assert rows["skip05"]["ci_low"] < 0 < rows["skip05"]["ci_high"]
    # The same numbers in report.md, tables.tex and paired.csv.
    md = (tmp_path / "out" / "report.md").read_text()
    assert "paired differences against stacked" in md and f"{rows['score']['mean']:+.4f}" in md
    assert f"{rows['score']['p_t']:.3g}" in md
    assert "paired differences against stacked" in (tmp_path / "out" / "tables.tex").read_text()
    with open(tmp_path / "out" / "paired.csv", newline="") as f:
        csv_rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(csv_rows["score"]["mean"]) == pytest.approx(rows["score"]["mean"])
    assert float(csv_rows["skip05"]["p_wilcoxon"]) == pytest.approx(rows["skip05"]["p_wilcoxon"])
    assert csv_rows["score"]["n"] == "4" and csv_rows["score"]["metric"] == "test/rmse"


def test_small_and_degenerate_samples():
    assert paired_diff({0: 1.0}, {1: 2.0}).n == 0
    one = paired_diff({0: 1.5, 1: 2.0}, {0: 1.0})
    assert one.n == 1 and one.mean == 0.5 and one.ci_low is None and one.p_t is None
    same = one_sample([0.1, 0.1, 0.1])  # zero variance: the interval is the point, no p-value
    assert same.ci_low == pytest.approx(0.1) and same.ci_high == pytest.approx(0.1)
    assert same.p_t is None and same.p_wilcoxon is not None
    zero = one_sample([0.0, 0.0])
    assert zero.p_wilcoxon is None


def test_baseline_is_matched_within_the_same_depth_context(tmp_path):
    # Two depth settings (steps 4 and 8): each variant is compared with stacked at its own steps.
    for steps, gap in ((4, -0.1), (8, 0.2)):
        for s in range(3):
            write_run(tmp_path, f"st{steps}-{s}", preset="stacked", share=False, steps=steps, seed=s,
                      rmse=1.0 + s, curve=[1.0])  # fmt: skip
            write_run(tmp_path, f"sc{steps}-{s}", preset="score", steps=steps, seed=s,
                      rmse=1.0 + s + gap + 0.01 * s, curve=[1.0])  # fmt: skip
    rep = build_report([tmp_path], tmp_path / "out")
    table = next(t for t in rep.tables if "paired" in t.title)
    by = {r["variant"]: r for r in table.records}
    assert by["score depth.steps=4"]["baseline"] == "stacked depth.steps=4"
    assert by["score depth.steps=4"]["mean"] == pytest.approx(-0.1 + 0.01)
    assert by["score depth.steps=8"]["mean"] == pytest.approx(0.2 + 0.01)


def test_claims_report_supported_and_contradicted_with_the_rule(tmp_path):
    # Fewer parameters: score 100 vs stacked 400 -> supported. Convergence: stacked reaches its
    # best (0.6) after 3 epochs; score needs 5, 6, 5, 7 epochs -> slower in 4 of 4, but the exact
    # sign test of 4 pairs cannot go below p = 0.125: inconclusive (the t interval said
    # "contradicted" under the old rule).
    score_curves = {0: [1.0, 0.9, 0.8, 0.7, 0.6], 1: [1.0, 0.9, 0.8, 0.7, 0.65, 0.6],
                    2: [1.0, 0.9, 0.8, 0.7, 0.55], 3: [1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.6]}  # fmt: skip
    for s in range(4):
        write_run(tmp_path / "runs", f"st{s}", preset="stacked", share=False, seed=s, params=400,
                  rmse=0.7, curve=[1.0, 0.8, 0.6, 0.7])  # fmt: skip
        write_run(tmp_path / "runs", f"sc{s}", preset="score", seed=s, params=100, rmse=0.7,
                  curve=score_curves[s])  # fmt: skip
    rep = build_report([tmp_path / "runs"], tmp_path / "out")
    by = {c.claim: c for c in rep.claims}
    assert (
        by["fewer parameters"].verdict == "supported" and "0.250" in by["fewer parameters"].effect
    )
    conv = by["faster convergence"]
    diffs = [5 - 3, 6 - 3, 5 - 3, 7 - 3]
    want = _expected(diffs)
    assert conv.n == 4 and conv.verdict == "inconclusive" and conv.p_holm == [0.125]
    assert "faster in 0, slower in 4 (0 never reached)" in conv.effect
    assert f"{want['mean']:+.1f} epochs" in conv.effect
    assert conv.ci == f"[{want['ci_low']:+.1f}, {want['ci_high']:+.1f}]"
    text = (tmp_path / "out" / "claims.md").read_text()
    assert "Verdict rule" in text and "Holm" in text and "| supported |" in text
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Claims of the paper" in md and "faster convergence" in md


def test_claims_integrators_dt_grid_and_deep_stability(tmp_path):
    # Euler vs rk4: rk4 is better by 0.1 +- small at 4x the time -> contradicted; heun is not
    # better (noise around 0) at 2x -> supported. dt 0.5 is best at steps 2 and 4 -> supported.
    noise = [0.01, -0.02, 0.015, -0.01]
    for s in range(4):
        base = 1.0 + 0.3 * s
        write_run(tmp_path / "integ", f"e{s}", integrator="euler", seed=s, rmse=base, time_per_step=0.01, curve=[1.0])  # fmt: skip
        write_run(tmp_path / "integ", f"h{s}", integrator="heun", seed=s, rmse=base + noise[s], time_per_step=0.02, curve=[1.0])  # fmt: skip
        write_run(tmp_path / "integ", f"r{s}", integrator="rk4", seed=s, rmse=base - 0.1 + noise[s] / 10, time_per_step=0.04, curve=[1.0])  # fmt: skip
        for steps in (2, 4):
            for dt, gap in ((0.25, 0.05), (0.5, 0.0), (1.0, 0.2)):
                write_run(tmp_path / "dt", f"d{steps}-{dt}-{s}", dt=dt, steps=steps, seed=s,
                          rmse=base + gap + noise[s] / 5, curve=[1.0])  # fmt: skip
    rep = build_report([tmp_path / "integ"], tmp_path / "o1")
    euler = {c.effect.split(" ")[0]: c for c in rep.claims if c.claim.startswith("Euler")}
    assert euler["rk4"].verdict == "contradicted" and "4.00x" in euler["rk4"].effect
    assert euler["heun"].verdict == "supported" and euler["heun"].n == 4
    rep = build_report([tmp_path / "dt"], tmp_path / "o2")
    (dt,) = [c for c in rep.claims if c.claim == "dt 0.5 often best"]
    assert dt.verdict == "supported" and "best (mean) in 2/2" in dt.effect


def test_claims_deep_stability_pairs_each_depth_with_its_stacked_baseline(tmp_path):
    # Stacking degrades by ~0.3 from 4 to 16 steps, SCORE by ~0.0 -> supported; both block_skip
    # values of SCORE are compared with the same stacked runs (stacked does not vary block_skip).
    noise = [0.01, -0.02, 0.015, -0.01]
    for s in range(4):
        base = 1.0 + 0.2 * s
        for steps, deg in ((4, 0.0), (16, 0.3)):
            st = write_run(tmp_path, f"st{steps}-{s}", preset="stacked", share=False, steps=steps,
                           seed=s, rmse=base + deg + noise[s], curve=[1.0])  # fmt: skip
            _block_skip(st, False)
            for skip in (False, True):
                run = write_run(tmp_path, f"sc{steps}-{skip}-{s}", preset="score025", steps=steps,
                                seed=s, rmse=base + noise[(s + steps) % 4] / 2, curve=[1.0])  # fmt: skip
                _block_skip(run, skip)
    rep = build_report([tmp_path], tmp_path / "out")
    deep = [c for c in rep.claims if c.claim.startswith("shared contractive")]
    assert len(deep) == 2 and all(c.verdict == "supported" and c.n == 4 for c in deep)
    assert all("4 -> 16 steps" in c.effect for c in deep)
    want = _expected([
        (noise[(s + 16) % 4] / 2 - noise[(s + 4) % 4] / 2) - 0.3 for s in range(4)
    ])  # fmt: skip
    # (s + 16) % 4 == (s + 4) % 4: every pair differs by exactly -0.3, shown as such (the t test
    # of zero spread is infinite: p 0), not as the zero-width interval [-0.3000, -0.3000]
    assert deep[0].ci == f"n/a (every pair {want['mean']:+.4f})" and deep[0].p == [0.0]
    paired = next(t for t in rep.tables if "paired" in t.title)
    assert {r["baseline"] for r in paired.records} == {
        "stacked depth.steps=4 block_skip=False", "stacked depth.steps=16 block_skip=False"
    }  # fmt: skip


def _block_skip(run, value: bool) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["task"]["model"] = {"block_skip": value}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
