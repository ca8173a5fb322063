"""The paper's claims, each with the experiment it came from, n, effect, 95% CI and a verdict.

Every row is computed from run folders (the experiments that can test it are found by what
they vary); the verdict rule is :data:`VERDICT_RULE`, printed with the table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from score_exp.report.runs import Run
from score_exp.report.stats import (
    BASELINE,
    PairedDiff,
    baseline_for,
    by_seed,
    context_keys,
    one_sample,
    paired_diff,
)
from score_exp.report.tables import Table, iteration_based
from score_exp.report.variants import Variant, by_task, variants

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"

VERDICT_RULE = """\
Verdict rule (95% two-sided Student-t intervals over seeds, differences paired by seed):
- **fewer parameters**: supported when the shared variant has fewer trainable parameters than
  its stacked baseline in every setting of the experiment, contradicted otherwise (parameter
  counts are exact: no interval).
- **faster convergence**: per seed, epochs (or steps) until the shared variant's val metric
  reaches the stacked run's best val value, minus the epochs the stacked run took to reach it
  (a run that never reaches it counts its last epoch: a lower bound). Supported when the CI
  lies below 0, contradicted when it lies above 0, inconclusive otherwise.
- **Euler the best cost/quality trade-off**: per integrator, its test metric minus Euler's.
  Supported when every other integrator costs more time per step and none is better with a CI
  that excludes 0; contradicted when another integrator is better with a CI that excludes 0;
  inconclusive with fewer than 2 pairs.
- **dt 0.5 often best**: per steps setting, dt 0.5 against the dt with the best mean test
  metric. Supported when 0.5 has the best mean in at least half of the settings and is worse
  with a CI that excludes 0 in none; contradicted when it is worse with a CI that excludes 0
  in at least half; inconclusive otherwise. The CI column pools the per-seed differences
  (0.5 minus the best dt) over settings.
- **shared contractive stable where stacking degrades**: per deeper setting S against the
  fewest steps S0, (shared(S) - shared(S0)) - (stacked(S) - stacked(S0)) per seed, in the
  metric's "worse" direction. Supported when the CI lies on the side where shared degrades
  less, contradicted when on the other side, inconclusive otherwise.
A claim an experiment cannot test (n < 2 pairs) is inconclusive at this n."""

ACROSS_RULE = """\
Across datasets: per claim and model, each dataset's verdict is the verdict of its rows above (all
experiments and settings on that dataset; `mixed` when they disagree). The claim is supported
across datasets when it is supported on every dataset, contradicted when contradicted on every
dataset, inconclusive otherwise (the counts say how it splits)."""


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

    def row(self) -> list[str]:
        return [self.claim, self.experiment, str(self.n), self.effect, self.ci, self.verdict]


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
    return [
        Claim("fewer parameters", name, n, f"params shared / stacked = {span}", "exact", verdict)
    ]


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
        diffs, censored = [], 0
        for seed in sorted(set(a_by) & set(b_by)):
            sv, sb = a_by[seed], b_by[seed]
            target = sb.record.best_value
            if target is None or not sb.curve:
                continue
            eb, _ = _epochs_to(sb, target, hib, by_step)
            ea, cens = _epochs_to(sv, target, hib, by_step)
            censored += cens
            diffs.append(ea - eb)
        if not diffs:
            continue
        d = one_sample([float(x) for x in diffs])
        unit = "steps" if by_step else "epochs"
        side = _side(d)
        verdict = SUPPORTED if side < 0 else CONTRADICTED if side > 0 else INCONCLUSIVE
        effect = f"{v.label} − {b.label}: {_fmt(d.mean, 1)} {unit} to stacked's best"
        if censored:
            effect += f" ({censored} never reached: lower bound)"
        out.append(Claim("faster convergence", name, d.n, effect, d.ci(1), verdict))
    return out


def _by_keys(runs: list[Run], key: str) -> dict:
    out: dict = {}
    for r in runs:
        out.setdefault(repr(r.get(key)), []).append(r)
    return out


def euler_tradeoff(name: str, runs: list[Run]) -> list[Claim]:
    groups = _by_keys([r for r in runs if r.ok], "depth.integrator")
    if "'euler'" not in groups or len(groups) < 2:
        return []
    sign = _sign(runs)
    euler = groups.pop("'euler'")
    t_euler = statistics.fmean(
        [t for r in euler if isinstance(t := r.get("time_per_step_s"), (int, float))] or [0.0]
    )
    out = []
    for key, rs in sorted(groups.items()):
        d = paired_diff(by_seed(rs, Run.test_metric), by_seed(euler, Run.test_metric))
        times = [t for r in rs if isinstance(t := r.get("time_per_step_s"), (int, float))]
        ratio = statistics.fmean(times) / t_euler if times and t_euler else None
        better = _side(d) == -sign  # the other integrator is better, CI excluding 0
        if d.n < 2:
            verdict = INCONCLUSIVE
        elif better:
            verdict = CONTRADICTED
        else:
            verdict = SUPPORTED if ratio is not None and ratio > 1 else INCONCLUSIVE
        metric = f"test {rs[0].headline}"
        cost = f", {ratio:.2f}x time/step" if ratio else ""
        effect = f"{key.strip(chr(39))} − euler: {_fmt(d.mean)} {metric}{cost}"
        out.append(
            Claim("Euler the best cost/quality trade-off", name, d.n, effect, d.ci(), verdict)
        )
    return out


def dt_often_best(name: str, runs: list[Run]) -> list[Claim]:
    ok = [r for r in runs if r.ok and r.get("depth.share")]
    dts = {r.get("depth.dt") for r in ok}
    if 0.5 not in dts or len(dts) < 2:
        return []
    sign = _sign(runs)
    settings = _by_keys(ok, "depth.steps")
    best_count, worse_count, pooled, n = 0, 0, [], None
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
        d = paired_diff(cells[0.5], cells[best])
        n = d.n if n is None else min(n, d.n)
        pooled += [cells[0.5][s] - cells[best][s] for s in set(cells[0.5]) & set(cells[best])]
        worse_count += _side(d) == sign
    total = sum(
        1
        for rs in settings.values()
        if len({r.get("depth.dt") for r in rs}) >= 2 and any(r.get("depth.dt") == 0.5 for r in rs)
    )
    if not total:
        return []
    if best_count * 2 >= total and worse_count == 0:
        verdict = SUPPORTED
    elif worse_count * 2 >= total:
        verdict = CONTRADICTED
    else:
        verdict = INCONCLUSIVE
    d = one_sample(pooled) if pooled else None
    effect = (
        f"dt 0.5 best in {best_count}/{total} steps settings, significantly worse in "
        f"{worse_count}/{total}"
    )
    if d is not None and d.mean is not None:
        effect += f"; 0.5 − best dt: {_fmt(d.mean)} test {runs[0].headline} (pooled)"
    ci = d.ci() if d is not None else "n/a (0.5 best everywhere)"
    return [Claim("dt 0.5 often best", name, n or 0, effect, ci, verdict)]


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
            side = _side(d)
            verdict = SUPPORTED if side == -sign else CONTRADICTED if side == sign else INCONCLUSIVE
            effect = (
                f"{v.label} vs {b.label}, {s0} -> {v.get('depth.steps')} steps: change of shared "
                f"minus change of stacked {_fmt(d.mean)} test {runs[0].headline} (stacked changed "
                f"{_fmt(stacked_deg.mean)} {stacked_deg.ci()})"
            )
            out.append(Claim("shared contractive stable where stacking degrades", name, d.n,
                             effect, d.ci(), verdict))  # fmt: skip
    return out


def claims(runs: list[Run]) -> list[Claim]:
    """Every claim row the given runs can test, one per experiment (and setting)."""
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
        dataset, model = _dataset_and_model(task_runs[0])
        for c in rows:
            c.dataset, c.model = dataset, model
        out += rows
    order = ["fewer parameters", "faster convergence", "Euler the best cost/quality trade-off",
             "dt 0.5 often best", "shared contractive stable where stacking degrades"]  # fmt: skip
    return sorted(out, key=lambda c: (order.index(c.claim), c.experiment))


def _dataset_and_model(run: Run) -> tuple[str, str]:
    """A run's dataset (registry key, or its own CSV's file name) and model class name."""
    path = run.get("task.data.path")
    dataset = str(path).replace("\\", "/").rsplit("/", 1)[-1] if path else run.get("task.data.registry_key")  # fmt: skip
    model = str(run.get("task.model._target_") or "").rsplit(".", 1)[-1]
    return str(dataset or ""), model


MIXED = "mixed"


def across_datasets(rows: list[Claim]) -> list[dict]:
    """One summary per claim and model tested on at least two datasets (rule: :data:`ACROSS_RULE`).

    Each dict holds ``claim``, ``model``, ``datasets`` (how many), the count of datasets per
    verdict (``supported``, ``contradicted``, ``inconclusive``, ``mixed``), ``per_dataset``
    (``{dataset: verdict}``) and the ``verdict`` across them.
    """
    groups: dict[tuple[str, str], dict[str, set[str]]] = {}
    for c in rows:
        if c.dataset:
            groups.setdefault((c.claim, c.model), {}).setdefault(c.dataset, set()).add(c.verdict)
    out = []
    for (claim, model), by_dataset in groups.items():
        if len(by_dataset) < 2:
            continue
        per = {d: next(iter(vs)) if len(vs) == 1 else MIXED for d, vs in sorted(by_dataset.items())}
        counts = {k: sum(v == k for v in per.values()) for k in (SUPPORTED, CONTRADICTED, INCONCLUSIVE, MIXED)}  # fmt: skip
        verdict = next(
            (k for k in (SUPPORTED, CONTRADICTED) if counts[k] == len(per)), INCONCLUSIVE
        )
        out.append({"claim": claim, "model": model, "datasets": len(per), **counts,
                    "per_dataset": per, "verdict": verdict})  # fmt: skip
    return out


def across_table(summary: list[dict]) -> Table:
    header = ["claim", "model", "datasets", "supported", "contradicted", "inconclusive", "mixed",
              "per dataset", "verdict"]  # fmt: skip
    rows = [[s["claim"], s["model"] or "?", str(s["datasets"]),
             *(str(s[k]) for k in (SUPPORTED, CONTRADICTED, INCONCLUSIVE, MIXED)),
             "; ".join(f"{d}: {v}" for d, v in s["per_dataset"].items()), s["verdict"]]
            for s in summary]  # fmt: skip
    return Table("claims across datasets", header, rows, ACROSS_RULE, summary)


def claims_table(rows: list[Claim]) -> Table:
    header = ["claim", "experiment", "n", "effect", "95% CI", "verdict"]
    note = VERDICT_RULE
    records = [dict(c.__dict__) for c in rows]
    return Table("claims of the paper", header, [c.row() for c in rows], note, records)


def claims_markdown(rows: list[Claim]) -> str:
    """``claims.md``: the claims table and the verdict rule."""
    if not rows:
        body = "No experiment under these folders tests a claim (no stacked baseline, integrator or dt grid).\n"
        return "# Claims of the paper\n\n" + body + "\n" + VERDICT_RULE + "\n"
    t = claims_table(rows)
    md = "# Claims of the paper\n\n" + t.markdown().split("\n", 2)[2]
    if summary := across_datasets(rows):
        md += "\n## Across datasets\n\n" + across_table(summary).markdown().split("\n", 2)[2]
    return md
