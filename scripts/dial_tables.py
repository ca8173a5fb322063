"""Tables of ``scripts/measure_depth_dial.sh``'s runs: mean +- std over seeds per scheme.

    python scripts/dial_tables.py [multirun/dial]

Reads only run folders (results.json through RunRecord, eval.csv) and bench JSON
(outputs/dial/*.json).
"""

from __future__ import annotations

import csv
import json
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

from score_exp.runs.record import RunRecord


def _ms(xs: list[float]) -> str:
    return f"{st.mean(xs):.4f} ± {st.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"


def runs(root: Path) -> None:
    """Test metric, epochs, wall time and evaluations per scheme (one folder per scheme)."""
    print(f"{'scheme':<28}{'n':>3}{'test metric':>22}{'epochs':>8}{'wall s':>8}{'nfe spent':>11}")
    for scheme in sorted(p for p in root.glob("*/*") if p.is_dir()):
        rows = [RunRecord.load(f) for f in scheme.glob("*/results.json")]
        rows = [r for r in rows if r.ok]
        if not rows:
            continue
        # The headline: RMSE for ESOL, loss for the language model.
        metric = [r.test.get("rmse", r.test["loss"]) for r in rows]
        spent = []
        for f in scheme.glob("*/eval.csv"):
            first = next(csv.DictReader(f.open()), None)  # the run's own setting comes first
            if first and first.get("nfe_spent"):
                spent.append(float(first["nfe_spent"]))
        print(
            f"{str(scheme.relative_to(root)):<28}{len(rows):>3}{_ms(metric):>22}"
            f"{st.mean(r.epochs_timed or 0 for r in rows):>8.1f}"
            f"{st.mean(r.wall_time_s for r in rows):>8.0f}"
            f"{(f'{st.mean(spent):.2f}' if spent else '-'):>11}"
        )


def dial(root: Path) -> None:
    """Metric at 1x, 2x, 4x the trained steps (dt fixed) per training scheme."""
    for scheme in sorted(p for p in root.glob("*/*") if p.is_dir()):
        by_steps: dict[int, list[float]] = defaultdict(list)
        for f in scheme.glob("*/eval.csv"):
            for r in csv.DictReader(f.open()):
                if r["keep_horizon"] == "False" and not r["adaptive_eps"]:
                    metric = "test/rmse" if "test/rmse" in r else "test/loss"
                    by_steps[int(r["steps"])].append(float(r[metric]))
        if len(by_steps) > 1:
            cells = "  ".join(
                f"{k} steps: {_ms(v)} (n={len(v)})" for k, v in sorted(by_steps.items())
            )
            print(f"{str(scheme.relative_to(root)):<28}{cells}")


def halting(root: Path) -> None:
    """Halting rows of eval.csv against the same run's full evaluation at the same bound:
    evaluations of F spent, metric and wall time, mean over the runs that have both."""
    print(f"{'scheme':<22}{'bound':>6}{'halt':>6}{'eps':>7}{'n':>3}{'nfe spent':>11}{'fewer':>7}"
          f"{'metric':>9}{'full':>9}{'worse':>8}{'s':>7}{'full s':>8}")  # fmt: skip
    for scheme in sorted(p for p in root.glob("*/*") if p.is_dir()):
        rows: dict[tuple, list[tuple[float, ...]]] = defaultdict(list)
        for f in scheme.glob("*/eval.csv"):
            full: dict[int, tuple[float, float]] = {}
            halted: dict[tuple, tuple[float, float, float]] = {}
            for r in csv.DictReader(f.open()):
                if r["keep_horizon"] != "False":
                    continue
                metric, secs = float(r.get("test/rmse") or r["test/loss"]), float(r["seconds"])
                steps = int(r["steps"])
                if r["adaptive_eps"]:  # the first row of each setting
                    key = (steps, r.get("halt") or "state", float(r["adaptive_eps"]))
                    halted.setdefault(key, (float(r["nfe_spent"]), metric, secs))
                else:
                    full.setdefault(steps, (metric, secs))
            for key, v in halted.items():
                if key[0] in full:
                    rows[key].append((*v, *full[key[0]]))
        for (steps, halt, eps), v in sorted(rows.items()):
            nfe, m, s, fm, fs = (st.mean(x[i] for x in v) for i in range(5))
            print(f"{str(scheme.relative_to(root)):<22}{steps:>6}{halt:>6}{eps:>7.3g}{len(v):>3}"
                  f"{nfe:>11.2f}{1 - nfe / steps:>7.0%}{m:>9.4f}{fm:>9.4f}{m / fm - 1:>+8.2%}"
                  f"{s:>7.2f}{fs:>8.2f}")  # fmt: skip


def paired(root: Path, part: str, a: str, b: str) -> None:
    """Per-seed difference b - a of the headline test metric (same seed = same split), 95% t CI."""
    from scipy import stats

    def by_seed(scheme: str) -> dict[int, float]:
        out = {}
        for f in (root / part / scheme).glob("*/results.json"):
            r = RunRecord.load(f)
            if r.ok:
                out[r.seed] = r.test.get("rmse", r.test.get("loss"))
        return out

    xa, xb = by_seed(a), by_seed(b)
    d = [xb[k] - xa[k] for k in sorted(set(xa) & set(xb))]
    if len(d) < 2:
        return
    m, se = st.mean(d), st.stdev(d) / len(d) ** 0.5
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=m, scale=se) if se > 0 else (m, m)
    p = stats.ttest_1samp(d, 0.0).pvalue if se > 0 else float("nan")
    print(
        f"{part}: {b} - {a} = {m:+.4f} [{lo:+.4f}, {hi:+.4f}] (paired t p = {p:.3g}, n = {len(d)})"
    )


def bench(path: Path) -> None:
    if not path.exists():
        return
    data = json.loads(path.read_text())
    print(f"\n{path}:")
    for v in data["variants"]:
        inter = v.get("interleaved", {}).get("step_s_median")
        print(
            f"  {v['label']:<30} train MB {v['train_mem_mb'] or 0:8.1f}  step ms "
            f"{1e3 * v['step_s_median']:8.2f}  interleaved ms {1e3 * inter if inter else 0:8.2f}"
        )
    for q in data["ratios"]:
        print(f"  {q['name']:<18} {q['of']:<30} step time {q['step_time']:.3f}")


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "multirun/dial")
    runs(root)
    print()
    dial(root)
    print()
    paired(root, "equal_time", "fixed", "random")
    paired(root, "fixed_point", "gnn_unroll4", "gnn_fp")
    paired(root, "fixed_point", "gnn_unroll8", "gnn_fp")
    paired(root, "fixed_point", "gnn_fp", "gnn_fp_implicit")
    paired(root, "fixed_point", "gnn_unroll4", "gnn_deep")
    paired(root, "gpt_equal_time", "fixed", "random")
    paired(root, "gpt", "fixed", "random")
    paired(root, "gpt", "fixed", "deep")
    paired(root, "gpt", "random", "deep")
    paired(root, "gpt", "fixed", "fixed_point")
    paired(root, "gpt", "fixed_point", "fixed_point_implicit")
    print()
    halting(root)
    for name in ("ancre", "fp_memory"):
        bench(Path("outputs/dial") / f"{name}.json")
