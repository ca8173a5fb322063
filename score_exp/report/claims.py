"""The paper's claims, each with the experiment it came from, n, effect, 95% CI and a verdict.

Every row is computed from run folders (the experiments that can test it are found by what
they vary); the verdict rule is :data:`VERDICT_RULE`, printed with the table.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from score_exp.report.runs import Run
from score_exp.report.stats import (
    BASELINE,
    PairedDiff,
    baseline_for,
    by_seed,
    context_keys,
    holm,
    noninferiority_p,
    one_sample,
    paired_diff,
    sign_test,
)
from score_exp.report.tables import Table, iteration_based
from score_exp.report.variants import Variant, by_task, variants
from score_exp.report.verdicts import (  # noqa: F401  (the rules are imported from here, too)
    ACROSS_RULE,
    ALPHA,
    CONTRADICTED,
    INCONCLUSIVE,
    MARGIN,
    MIXED,
    SUPPORTED,
    VERDICT_RULE,
    across_datasets,
    across_table,
    at_cap,
    cap_markdown,
    dataset_and_model,
    dataset_verdict,
    once,
    run_key,
    run_keys,
)


@dataclass
class Claim:
    claim: str
    experiment: str
    n: int
    effect: str
    ci: str
    verdict: str
    dataset: str = ""  # the experiment's data (registry key or CSV file name), for the summary
    model: str = ""  # the model class of its runs (RecurrentMLP, MolGNN ...)
    p: list = field(default_factory=list)  # the row's raw p-values (members of the family)
    p_holm: list = field(default_factory=list)  # the same, Holm-adjusted over the family
    runs: frozenset = field(default_factory=frozenset, repr=False)  # configurations it reads
    decide: Callable | None = field(default=None, repr=False)  # adjusted p-values -> verdict

    def row(self) -> list[str]:
        return [self.claim, self.experiment, str(self.n), self.effect, self.ci, self.p_text(),
                self.verdict]  # fmt: skip

    def p_text(self) -> str:
        ps = [p for p in self.p_holm if p is not None]
        if not ps:
            return "exact" if self.ci == "exact" else "n/a"
        return " / ".join(f"{p:.3g}" for p in ps)

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("runs", "decide")}


def _is_shared_contractive(v: Variant) -> bool:
    return not v.reference and bool(v.get("depth.share")) and v.get("depth.update") == "contractive"


def _sign(runs: list[Run]) -> int:
    """+1 when lower is better: a positive difference is then 'worse'."""
    return -1 if runs[0].higher_is_better else 1


def _side(d: PairedDiff) -> int:
    """-1: CI below 0; +1: CI above 0; 0: includes 0 or undefined."""
    if d.ci_low is None:
        return 0
    return -1 if d.ci_high < 0 else 1 if d.ci_low > 0 else 0


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:+.{digits}f}"


def _pairs(vs: list[Variant]) -> list[tuple[Variant, Variant]]:
    """(shared contractive variant, its stacked baseline) pairs."""
    out = []
    for v in vs:
        if _is_shared_contractive(v) and (b := baseline_for(v, vs)) is not None:
            out.append((v, b))
    return out


def fewer_parameters(name: str, vs: list[Variant]) -> list[Claim]:
    ratios = []
    for v, b in _pairs(vs):
        pv, pb = v.mean_of("params"), b.mean_of("params")
        if pv and pb:
            ratios.append((pv / pb, min(len(v.ok_runs), len(b.ok_runs))))
    if not ratios:
        return []
    rs = [r for r, _ in ratios]
    n = min(k for _, k in ratios)
    span = (
        f"{min(rs):.3f}" if len(rs) == 1 else f"{min(rs):.3f}-{max(rs):.3f} over {len(rs)} settings"
    )
    verdict = SUPPORTED if all(r < 1 for r in rs) else CONTRADICTED
    runs = [r for v, b in _pairs(vs) for r in v.runs + b.runs]
    return [Claim("fewer parameters", name, n, f"params shared / stacked = {span}", "exact",
                  verdict, runs=run_keys(runs))]  # fmt: skip


def _runs_by_seed(runs: list[Run]) -> dict[int, Run]:
    return {int(r.get("seed")): r for r in runs if r.ok and r.get("seed") is not None}


def _epochs_to(run: Run, target: float, hib: bool, by_step: bool) -> tuple[int, bool]:
    """First epoch (or step) whose val value reaches ``target``; else the last one (censored)."""
    last = 0
    for row in run.curve:
        x = row["step"] if by_step or row["epoch"] is None else row["epoch"] + 1
        last = x
        if (row["value"] >= target) if hib else (row["value"] <= target):
            return x, False
    return last, True


def faster_convergence(name: str, vs: list[Variant]) -> list[Claim]:
    out = []
    for v, b in _pairs(vs):
        runs = v.runs + b.runs
        hib, by_step = runs[0].higher_is_better, iteration_based(runs)
        a_by, b_by = _runs_by_seed(v.runs), _runs_by_seed(b.runs)
        diffs, faster, slower, ties, censored = [], 0, 0, 0, 0
        for seed in sorted(set(a_by) & set(b_by)):
            sv, sb = a_by[seed], b_by[seed]
            target = sb.record.best_value
            if target is None or not sb.curve:
                continue
            eb, _ = _epochs_to(sb, target, hib, by_step)
            ea, cens = _epochs_to(sv, target, hib, by_step)
            if cens:  # never reached the stacked run's best: not fast, however early it stopped
                censored += 1
                slower += 1
                continue
            diffs.append(ea - eb)
            faster += ea < eb
            slower += ea > eb
            ties += ea == eb
        n = faster + slower + ties
        if not n:
            continue
        unit = "steps" if by_step else "epochs"
        d = one_sample([float(x) for x in diffs])
        effect = (f"{v.label} − {b.label}: reached stacked's best in {n - censored}/{n}; faster in "
                  f"{faster}, slower in {slower} ({censored} never reached), ties {ties}")  # fmt: skip
        if d.mean is not None:
            effect += f"; {_fmt(d.mean, 1)} {unit} among those that reached it"
        ci = _ci(d, 1) if d.n >= 2 else "n/a"

        def decide(ps, faster=faster, slower=slower) -> str:
            if ps[0] is None or ps[0] >= ALPHA or faster == slower:
                return INCONCLUSIVE
            return SUPPORTED if faster > slower else CONTRADICTED

        out.append(Claim("faster convergence", name, n, effect, ci, INCONCLUSIVE,
                         p=[sign_test(faster, slower)], runs=run_keys(v.runs + b.runs),
                         decide=decide))  # fmt: skip
    return out


def _p(d: PairedDiff) -> float | None:
    """The two-sided paired t p-value; 0 for a nonzero mean with zero spread (t is infinite)."""
    if d.p_t is None and d.n >= 2 and d.ci_low == d.ci_high and d.mean:
        return 0.0
    return d.p_t


def _ci(d: PairedDiff, digits: int = 4) -> str:
    """The t interval, or why there is none (zero spread: every difference the same)."""
    if d.ci_low is not None and d.ci_low == d.ci_high:
        return f"n/a (every pair {_fmt(d.mean, digits)})"
    return d.ci(digits)


def _by_keys(runs: list[Run], key: str) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(repr(r.get(key)), []).append(r)
    return out


def _worse(a: dict[int, float], b: dict[int, float], sign: int) -> list[float]:
    """Per common seed, how much worse ``a`` is than ``b`` (positive = worse)."""
    return [sign * (a[s] - b[s]) for s in sorted(set(a) & set(b))]


def euler_tradeoff(name: str, runs: list[Run]) -> list[Claim]:
    groups = _by_keys([r for r in runs if r.ok], "depth.integrator")
    if "'euler'" not in groups or len(groups) < 2:
        return []
    sign = _sign(runs)
    euler = groups.pop("'euler'")
    t_euler = statistics.fmean(
        [t for r in euler if isinstance(t := r.get("time_per_step_s"), (int, float))] or [0.0]
    )
    e = by_seed(euler, Run.test_metric)
    out = []
    for key, rs in sorted(groups.items()):
        o = by_seed(rs, Run.test_metric)
        d = paired_diff(o, e)
        times = [t for r in rs if isinstance(t := r.get("time_per_step_s"), (int, float))]
        ratio = statistics.fmean(times) / t_euler if times and t_euler else None
        margin = MARGIN * abs(statistics.fmean(o.values())) if o else 0.0
        p_ni = noninferiority_p(_worse(e, o, sign), margin)  # Euler no worse than the other
        other_better = d.mean is not None and sign * d.mean < 0

        def decide(ps, ratio=ratio, other_better=other_better) -> str:
            p_ni, p_sup = ps
            if p_sup is not None and p_sup < ALPHA and other_better:
                return CONTRADICTED
            if p_ni is not None and p_ni < ALPHA and ratio is not None and ratio > 1:
                return SUPPORTED
            return INCONCLUSIVE

        metric = f"test {rs[0].headline}"
        cost = f", {ratio:.2f}x time/step" if ratio else ""
        effect = (f"{key.strip(chr(39))} − euler: {_fmt(d.mean)} {metric}{cost}; margin "
                  f"{margin:.4f} (p non-inferiority / p difference)")  # fmt: skip
        out.append(Claim("Euler the best cost/quality trade-off", name, d.n, effect, _ci(d),
                         INCONCLUSIVE, p=[p_ni, _p(d)], runs=run_keys(rs + euler),
                         decide=decide))  # fmt: skip
    return out


def dt_often_best(name: str, runs: list[Run]) -> list[Claim]:
    ok = [r for r in runs if r.ok and r.get("depth.share")]
    dts = {r.get("depth.dt") for r in ok}
    if 0.5 not in dts or len(dts) < 2:
        return []
    sign = _sign(runs)
    settings = _by_keys(ok, "depth.steps")
    best_count, tested, pooled, ps, n = 0, 0, [], [], None
    for rs in settings.values():
        cells = {
            dt: by_seed([r for r in rs if r.get("depth.dt") == dt], Run.test_metric) for dt in dts
        }
        cells = {dt: c for dt, c in cells.items() if c}
        if 0.5 not in cells or len(cells) < 2:
            continue
        best = min(cells, key=lambda dt: sign * statistics.fmean(cells[dt].values()))
        if best == 0.5:
            best_count += 1
            n = len(cells[0.5]) if n is None else min(n, len(cells[0.5]))
            continue
        tested += 1
        d = paired_diff(cells[0.5], cells[best])
        n = d.n if n is None else min(n, d.n)
        pooled += [cells[0.5][s] - cells[best][s] for s in set(cells[0.5]) & set(cells[best])]
        margin = MARGIN * abs(statistics.fmean(cells[best].values()))
        worse = d.mean is not None and sign * d.mean > 0
        # per setting: non-inferiority of 0.5, then the two-sided test (None unless 0.5 is worse)
        ps += [noninferiority_p(_worse(cells[0.5], cells[best], sign), margin),
               _p(d) if worse else None]  # fmt: skip
    total = best_count + tested
    if not total:
        return []

    def decide(adj, best_count=best_count, total=total) -> str:
        ni = sum(p is not None and p < ALPHA for p in adj[0::2])
        sig_worse = sum(p is not None and p < ALPHA for p in adj[1::2])
        if sig_worse * 2 >= total:
            return CONTRADICTED
        if (best_count + ni) * 2 >= total and sig_worse == 0:
            return SUPPORTED
        return INCONCLUSIVE

    d = one_sample(pooled) if pooled else None
    effect = f"dt 0.5 best (mean) in {best_count}/{total} steps settings"
    if d is not None and d.mean is not None:
        effect += f"; 0.5 − best dt: {_fmt(d.mean)} test {runs[0].headline} (pooled)"
    ci = _ci(d) if d is not None else "n/a (0.5 best everywhere)"
    return [Claim("dt 0.5 often best", name, n or 0, effect, ci, INCONCLUSIVE, p=ps,
                  runs=run_keys(ok), decide=decide)]  # fmt: skip


def deep_stability(name: str, vs: list[Variant]) -> list[Claim]:
    if "depth.steps" not in context_keys(vs):
        return []
    runs = [r for v in vs for r in v.runs]
    sign = _sign(runs)
    pairs = _pairs(vs)
    out = []
    # Group the pairs by every other variant key (block_skip ...): one depth series each.
    series: dict[str, list[tuple[Variant, Variant]]] = {}
    for v, b in pairs:
        rest = tuple((k, val) for k, val in v.key if k not in ("depth.steps", "depth_preset"))
        series.setdefault(repr(rest), []).append((v, b))
    for items in series.values():
        items.sort(key=lambda p: p[0].get("depth.steps"))
        (v0, b0), deeper = items[0], items[1:]
        s0 = v0.get("depth.steps")
        m = lambda v: by_seed(v.runs, Run.test_metric)  # noqa: E731
        for v, b in deeper:
            av, a0, bv, bb0 = m(v), m(v0), m(b), m(b0)
            seeds = sorted(set(av) & set(a0) & set(bv) & set(bb0))
            diffs = [(av[s] - a0[s]) - (bv[s] - bb0[s]) for s in seeds]
            stacked_deg = one_sample([bv[s] - bb0[s] for s in seeds])
            d = one_sample(diffs)
            side = -1 if (d.mean or 0) < 0 else 1 if (d.mean or 0) > 0 else 0

            def decide(ps, side=side) -> str:
                if ps[0] is None or ps[0] >= ALPHA or side == 0:
                    return INCONCLUSIVE
                return SUPPORTED if side == -sign else CONTRADICTED

            effect = (
                f"{v.label} vs {b.label}, {s0} -> {v.get('depth.steps')} steps: change of shared "
                f"minus change of stacked {_fmt(d.mean)} test {runs[0].headline} (stacked changed "
                f"{_fmt(stacked_deg.mean)} {stacked_deg.ci()})"
            )
            out.append(Claim("shared contractive stable where stacking degrades", name, d.n,
                             effect, _ci(d), INCONCLUSIVE, p=[_p(d)],
                             runs=run_keys(v.runs + v0.runs + b.runs + b0.runs),
                             decide=decide))  # fmt: skip
    return out


ORDER = ["fewer parameters", "faster convergence", "Euler the best cost/quality trade-off",
         "dt 0.5 often best", "shared contractive stable where stacking degrades"]  # fmt: skip


def claims(runs: list[Run]) -> list[Claim]:
    """Every claim row the given runs can test, each configuration counted once, with verdicts
    after Holm's adjustment over each claim's rows (:data:`VERDICT_RULE`)."""
    out: list[Claim] = []
    runs = [r for r in runs if not r.reference]  # a reference model is no depth variant
    for name, task_runs in sorted(by_task(runs).items()):
        vs = variants(task_runs)
        has_base = any(v.get("depth_preset") == BASELINE for v in vs)
        rows: list[Claim] = []
        if has_base:
            rows += fewer_parameters(name, vs)
            rows += faster_convergence(name, vs)
            rows += deep_stability(name, vs)
        rows += euler_tradeoff(name, task_runs)
        rows += dt_often_best(name, task_runs)
        dataset, model = dataset_and_model(task_runs[0])
        for c in rows:
            c.dataset, c.model = dataset, model
        out += rows
    out = once(sorted(out, key=lambda c: (ORDER.index(c.claim), c.experiment)))
    for claim in ORDER:
        family = [c for c in out if c.claim == claim and c.decide is not None]
        flat = holm([p for c in family for p in c.p])
        i = 0
        for c in family:
            c.p_holm, i = flat[i : i + len(c.p)], i + len(c.p)
            c.verdict = c.decide(c.p_holm)
    return out


def claims_table(rows: list[Claim]) -> Table:
    header = ["claim", "experiment", "n", "effect", "95% CI", "p (Holm)", "verdict"]
    note = VERDICT_RULE
    records = [c.record() for c in rows]
    return Table("claims of the paper", header, [c.row() for c in rows], note, records)


def claims_markdown(rows: list[Claim], runs: list[Run] | None = None) -> str:
    """``claims.md``: the claims table, the verdict rules and (given the runs) the share of runs
    that hit their epoch cap."""
    if not rows:
        body = "No experiment under these folders tests a claim (no stacked baseline, integrator or dt grid).\n"
        return "# Claims of the paper\n\n" + body + "\n" + VERDICT_RULE + "\n"
    t = claims_table(rows)
    md = "# Claims of the paper\n\n" + t.markdown().split("\n", 2)[2]
    if summary := across_datasets(rows):
        md += "\n## Across datasets\n\n" + across_table(summary).markdown().split("\n", 2)[2]
    else:
        md += "\n" + ACROSS_RULE + "\n"
    if runs and (cap := cap_markdown(runs)):
        md += "\n" + cap
    return md
