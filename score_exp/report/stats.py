"""Paired statistics: each depth variant against the ``stacked`` baseline, matched by seed.

Runs with the same seed share a data split (and the seed's initialisation stream), so the
difference of two variants at one seed removes the split-to-split variance that dominates
mean ± std over seeds. For each pair of variants: the seeds both finished, the mean of the
per-seed differences (metric units), its 95% confidence interval (Student t), and two-sided
p-values of the paired t test and the Wilcoxon signed-rank test (scipy).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from score_exp.report.runs import Run
from score_exp.report.tables import Table
from score_exp.report.variants import Variant

BASELINE = "stacked"


@dataclass
class PairedDiff:
    """``a - b`` over matched seeds."""

    n: int
    mean: float | None
    ci_low: float | None
    ci_high: float | None
    p_t: float | None
    p_wilcoxon: float | None

    def ci(self, digits: int = 4) -> str:
        if self.ci_low is None:
            return "n/a"
        return f"[{self.ci_low:+.{digits}f}, {self.ci_high:+.{digits}f}]"


def paired_diff(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> PairedDiff:
    """Mean difference ``a[s] - b[s]`` over the seeds ``s`` in both, with a t CI and p-values.

    Fewer than two pairs give the mean (or nothing) and no interval; p-values are ``None`` when
    undefined (all differences equal: zero variance; Wilcoxon with every difference zero).
    """
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    return one_sample(d, level)


def one_sample(d: list[float], level: float = 0.95) -> PairedDiff:
    """Mean of ``d`` with a Student-t CI and the p-values of ``mean = 0`` (t and Wilcoxon)."""
    from scipy import stats

    n = len(d)
    if n == 0:
        return PairedDiff(0, None, None, None, None, None)
    mean = statistics.fmean(d)
    if n < 2:
        return PairedDiff(n, mean, None, None, None, None)
    sd = statistics.stdev(d)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    p_t = float(stats.ttest_1samp(d, 0.0).pvalue) if sd > 0 else None
    p_w = None
    if any(x != 0 for x in d):
        p_w = float(stats.wilcoxon(d).pvalue)
    return PairedDiff(n, mean, mean - half, mean + half, _finite(p_t), _finite(p_w))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def by_seed(runs: list[Run], value) -> dict[int, float]:
    """``{seed: value(run)}`` over ok runs whose value is a finite number."""
    out = {}
    for r in runs:
        v = value(r) if r.ok else None
        if isinstance(v, (int, float)) and math.isfinite(v) and r.get("seed") is not None:
            out[int(r.get("seed"))] = float(v)
    return out


def _baselines(vs: list[Variant]) -> list[Variant]:
    return [b for b in vs if b.get("depth_preset") == BASELINE and not b.reference]


def context_keys(vs: list[Variant]) -> list[str]:
    """Varied keys on which the ``stacked`` variants differ among themselves (e.g. ``depth.steps``).

    A variant is compared with the baseline that has its values of these keys; keys that only
    other variants vary (``task.model.block_skip``, ``depth.dt`` ...) are part of the variant.
    """
    base = _baselines(vs)
    keys = [k for k, _ in (base[0].key if base else ())]
    return [k for k in keys if k != "depth_preset" and len({repr(b.get(k)) for b in base}) > 1]


def baseline_for(v: Variant, vs: list[Variant]) -> Variant | None:
    """The ``stacked`` variant to compare ``v`` with: the one with ``v``'s context-key values."""
    keys = context_keys(vs)
    same = [b for b in _baselines(vs) if all(repr(b.get(k)) == repr(v.get(k)) for k in keys)]
    return same[0] if len(same) == 1 else None


def paired_table(task: str, vs: list[Variant]) -> Table | None:
    """Every variant minus its ``stacked`` baseline, matched by seed (test headline metric)."""
    if not _baselines(vs) or len(vs) < 2:
        return None
    pairs = [(v, base) for v in vs if (base := baseline_for(v, vs)) is not None and base is not v]
    return _paired(task, pairs, f"paired differences against {BASELINE}")


def reference_table(task: str, vs: list[Variant]) -> Table | None:
    """Every depth variant minus each reference model (a field-standard peer), matched by seed."""
    refs = [v for v in vs if v.reference]
    pairs = [(v, ref) for ref in refs for v in vs if not v.reference]
    return _paired(task, pairs, "paired differences against the reference") if pairs else None


def _paired(task: str, pairs: list[tuple[Variant, Variant]], title: str) -> Table | None:
    """One row per ``(variant, baseline)``: ``variant − baseline`` over the seeds both finished."""
    if not pairs:
        return None
    runs = [r for v, b in pairs for r in v.runs + b.runs]
    headline = runs[0].headline
    better = "higher" if runs[0].higher_is_better else "lower"
    rows, records = [], []
    for v, base in pairs:
        d = paired_diff(by_seed(v.runs, Run.test_metric), by_seed(base.runs, Run.test_metric))
        rows.append([v.label, base.label, str(d.n), _f(d.mean, "{:+.4f}"), d.ci(),
                     _f(d.p_t, "{:.3g}"), _f(d.p_wilcoxon, "{:.3g}")])  # fmt: skip
        records.append({"task": task, "variant": v.label, "baseline": base.label,
                        "metric": f"test/{headline}", **asdict(d)})  # fmt: skip
    header = ["variant", "baseline", "n pairs", f"mean diff test {headline}", "95% CI (t)",
              "p (paired t)", "p (Wilcoxon)"]  # fmt: skip
    note = (
        f"Per-seed difference variant − baseline in test {headline} ({better} is better), over "
        "the seeds where both runs finished ok (same seed = same split). CI: Student t with n−1 "
        "degrees of freedom; p: two-sided, paired t test and Wilcoxon signed-rank (scipy); n/a "
        "below 2 pairs or with zero variance."
    )
    return Table(f"{task}: {title}", header, rows, note, records)


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else fmt.format(x)


# ----------------------------------------------------------------------------- claims' tests


def holm(ps: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (family-wise error rate).

    ``None`` (no test) is not part of the family and stays ``None``. Adjusted p-values are
    monotone in the raw ones and never above 1; rejecting where the adjusted p < alpha controls
    the probability of any false rejection in the family at alpha, whatever the dependence.
    """
    order = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out: list[float | None] = [None] * len(ps)
    running, m = 0.0, len(order)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def sign_test(wins: int, losses: int) -> float | None:
    """Two-sided exact sign test (binomial, p = 1/2) of ``wins`` against ``losses`` (ties out).

    With n pairs the smallest possible p is 2 / 2**n: 0.0625 at 5 pairs, 0.002 at 10.
    """
    from scipy import stats

    n = wins + losses
    return float(stats.binomtest(wins, n, 0.5).pvalue) if n else None


def noninferiority_p(d: list[float], margin: float) -> float | None:
    """One-sided paired t test of non-inferiority: p of H0 ``mean(d) >= margin`` against H1
    ``mean(d) < margin``, where ``d`` is how much WORSE the candidate is per pair (metric units,
    worse = positive) and ``margin`` > 0 the largest loss still called "no worse".

    A small p supports "no worse than the comparator by ``margin`` or more"; a large one is no
    evidence either way (absence of a difference is not shown by a non-significant test). None
    below 2 pairs; with zero spread, 0 when every difference is below the margin, else 1.
    """
    from scipy import stats

    n = len(d)
    if n < 2:
        return None
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0:
        return 0.0 if mean < margin else 1.0
    t = (mean - margin) / (sd / math.sqrt(n))
    return float(stats.t.cdf(t, n - 1))
