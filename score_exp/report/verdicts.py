"""The verdict rules of claims.md and what they are applied with: the rule texts (printed with
the table), Holm's family, each configuration counted once (:func:`once`), rows -> dataset ->
claim (:func:`dataset_verdict`, :func:`across_datasets`) and the runs that hit their epoch cap."""

from __future__ import annotations

import json

from score_exp.report.runs import Run
from score_exp.report.tables import Table
from score_exp.runs.fingerprint import non_identity

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
#: Family-wise error rate of each claim's family of tests (Holm over the claim's rows).
ALPHA = 0.05
#: Non-inferiority margin of the "X is the best" claims, relative to the comparator's mean test
#: metric: "no worse" = worse by less than 5% of the comparator's RMSE (declared before the runs).
MARGIN = 0.05

VERDICT_RULE = f"""\
Verdict rule. Every test of a claim is one member of that claim's family: all its rows, over
experiments, datasets and models (each configuration counted once: a row whose runs another
experiment already holds, the same configurations by fingerprint, is shown once, naming both).
The p-values of a family are adjusted by **Holm's step-down method** (family-wise error rate
{ALPHA}); a row's verdict uses the adjusted p ("p (Holm)"). The intervals are per-row 95%
Student-t intervals over seeds (differences paired by seed), for reading, not for the verdict.
- **fewer parameters**: supported when the shared variant has fewer trainable parameters than
  its stacked baseline in every setting of the experiment, contradicted otherwise (parameter
  counts are exact: no test).
- **faster convergence** (censored): per seed, does the shared variant's val metric reach the
  stacked run's best val value, and in fewer epochs (or steps) than the stacked run took? A run
  that never reaches it is censored and counts as slower (it is not fast). Exact two-sided sign
  test over the pairs (ties left out; censoring leaves the order known, not the size, and the
  sign test uses only the order). Supported when more pairs are faster and p (Holm) < {ALPHA};
  contradicted when more are slower and p (Holm) < {ALPHA}; inconclusive otherwise. With n pairs
  the smallest p is 2/2^n (0.0625 at 5 pairs: 5 seeds can never support it).
- **Euler the best cost/quality trade-off**: per other integrator, a non-inferiority test of
  Euler's test metric against it (one-sided paired t, margin {MARGIN:.0%} of the other
  integrator's mean: "Euler no worse by 5% or more"). Supported when the non-inferiority holds
  (p (Holm) < {ALPHA}) and the other integrator costs more time per step; contradicted when the
  other integrator is better (two-sided paired t, p (Holm) < {ALPHA}); inconclusive otherwise
  (no significant difference is not evidence of none).
- **dt 0.5 often best**: per steps setting, dt 0.5 against the dt with the best mean test metric:
  a non-inferiority test (margin {MARGIN:.0%} of the best dt's mean) and a two-sided test of
  0.5 being worse. Supported when 0.5 is the best or shown non-inferior in at least half of the
  settings and significantly worse in none; contradicted when significantly worse in at least
  half; inconclusive otherwise. The CI column pools the per-seed differences (0.5 minus the best
  dt) over settings.
- **shared contractive stable where stacking degrades**: per deeper setting S against the
  fewest steps S0, (shared(S) - shared(S0)) - (stacked(S) - stacked(S0)) per seed, in the
  metric's "worse" direction; two-sided paired t. Supported when shared degrades less and
  p (Holm) < {ALPHA}, contradicted when it degrades more and p (Holm) < {ALPHA}, inconclusive
  otherwise.
A claim an experiment cannot test (n < 2 pairs) is inconclusive at this n."""

ACROSS_RULE = """\
From rows to a dataset: per claim and model, a dataset's verdict is `supported` when every row
on that dataset (all experiments and settings) is supported, `contradicted` when at least one row
is contradicted and none supported, `mixed` when some rows are supported and others contradicted,
`inconclusive` otherwise. From datasets to the claim: supported across datasets when supported
on every dataset, contradicted when contradicted on every dataset, inconclusive otherwise (the
counts say how it splits)."""


def run_key(run: Run) -> str:
    """A run's configuration, as its fingerprint holds it: the config without the keys that make
    no run (:data:`~score_exp.runs.fingerprint.NON_IDENTITY`: the experiment's name among them)."""
    ident = {k: v for k, v in run.config.items() if not non_identity(k) and k != "run_dir"}
    return json.dumps(ident, sort_keys=True, default=str)


def run_keys(runs: list[Run]) -> frozenset:
    return frozenset(run_key(r) for r in runs)


def once(rows: list) -> list:
    """Each configuration counted once: a row reading the same runs (by configuration) as an
    earlier row of the same claim is dropped, and the kept row names the other experiment. The
    studies of a tuned comparison (``..._study<k>``) are replicates of the tuning, each judged on
    its own and pooled after (:mod:`score_exp.report.studies`): never merged."""
    from score_exp.report.studies import split_study

    kept: dict[tuple, object] = {}
    out = []
    for c in rows:
        key = (c.claim, c.runs, split_study(c.experiment)[1])
        if c.runs and key in kept:
            first = kept[key]
            first.experiment += f" (= {c.experiment.split(' / ')[0]})"
            continue
        kept[key] = c
        out.append(c)
    return out


MIXED = "mixed"


def dataset_verdict(verdicts: set[str] | list[str]) -> str:
    """The verdict of one dataset from its rows' verdicts (:data:`ACROSS_RULE`)."""
    vs = set(verdicts)
    if vs == {SUPPORTED}:
        return SUPPORTED
    if SUPPORTED in vs and CONTRADICTED in vs:
        return MIXED
    if CONTRADICTED in vs:
        return CONTRADICTED
    return INCONCLUSIVE


def across_datasets(rows: list) -> list[dict]:
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
        per = {d: dataset_verdict(vs) for d, vs in sorted(by_dataset.items())}
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


def at_cap(runs: list[Run]) -> list[dict]:
    """Per experiment and task: how many ok runs trained to their epoch cap (``trainer.max_epochs``)
    instead of ending by early stopping; a run at its cap may not be trained to its best."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        cap = r.get("trainer.max_epochs")
        if r.ok and isinstance(cap, int) and cap > 0 and r.get("epochs_timed") is not None:
            groups.setdefault((str(r.get("experiment_name") or "?"), r.task), []).append(r)
    out = []
    for (exp, task), rs in sorted(groups.items()):
        hit = [r for r in rs if r.get("epochs_timed") >= r.get("trainer.max_epochs")]
        out.append({"experiment": exp, "task": task, "runs": len(rs), "at_cap": len(hit),
                    "reference_at_cap": sum(bool(r.reference) for r in hit)})  # fmt: skip
    return out


def cap_table(runs: list[Run]) -> Table | None:
    """The share of ok runs that trained to ``trainer.max_epochs`` instead of stopping early."""
    rows = at_cap(runs)
    if not rows:
        return None
    total, hit = sum(r["runs"] for r in rows), sum(r["at_cap"] for r in rows)
    note = (f"{hit} of {total} ok runs ({hit / total:.0%}) trained to `trainer.max_epochs` instead "
            "of ending by early stopping: they may be short of their best.")  # fmt: skip
    cells = [[f"{r['experiment']} / {r['task']}", str(r["runs"]), str(r["at_cap"]),
              str(r["reference_at_cap"])] for r in rows]  # fmt: skip
    header = ["experiment / task", "runs", "at the cap", "of them the peer"]
    return Table("Runs that hit their epoch cap", header, cells, note, rows)


def cap_markdown(runs: list[Run]) -> str:
    if (t := cap_table(runs)) is None:
        return ""
    lines = [
        f"## {t.title}",
        "",
        t.note,
        "",
        "| " + " | ".join(t.header) + " |",
        "|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in t.rows]
    return "\n".join(lines) + "\n"


def dataset_and_model(run: Run) -> tuple[str, str]:
    """A run's dataset (registry key, or its own CSV's file name) and model class name."""
    path = run.get("task.data.path")
    dataset = str(path).replace("\\", "/").rsplit("/", 1)[-1] if path else run.get("task.data.registry_key")  # fmt: skip
    model = str(run.get("task.model._target_") or "").rsplit(".", 1)[-1]
    return str(dataset or ""), model
