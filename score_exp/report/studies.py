"""Verdicts across tuning studies: the same comparison re-made after studies with other sampler seeds.

``make tune-cpu`` repeats every Optuna study with several study seeds (the TPE sampler's seed) and
re-trains each study's best configuration over the paired seeds; the runs of study seed ``k`` carry
the experiment name ``tuned_<task>_study<k>`` (:func:`study_experiment`), so the report computes
each study's paired differences and claims on their own. This module pools them: a verdict is
``supported``/``contradicted`` (``better``/``worse`` for a paired difference) only when it holds
in every study (rule: :data:`STUDIES_RULE`), so a verdict carries its robustness to the path a study
took (another CPU's rounding, another sampler seed), never one study's p-value.
"""

from __future__ import annotations

import re
import statistics

from score_exp.report.tables import Table

STUDY_SUFFIX = re.compile(r"^(?P<base>.+)_study(?P<seed>\d+)$")

SUPPORTED, CONTRADICTED, INCONCLUSIVE, MIXED = "supported", "contradicted", "inconclusive", "mixed"

STUDIES_RULE = """\
Across study seeds (`make tune-cpu` repeats each Optuna study with the sampler seeds STUDY_SEEDS and
re-trains each study's best over the same paired seeds): each row is one comparison made once per
study; per study its effect and 95% CI (paired by seed, as above) and its verdict. Pooled verdict:
supported (a paired difference: the variant better) or contradicted (worse) only when at least two
studies were made and EVERY study gives that verdict with a CI that excludes 0; `mixed` when some
study says supported and another contradicted; inconclusive otherwise (some or all studies' CIs
include 0). The spread is the range of the per-study effects; the pooled effect is their mean."""


def study_experiment(name: str, study_seed: int | None) -> str:
    """The experiment name of the runs re-trained from study seed ``study_seed``."""
    return name if study_seed is None else f"{name}_study{study_seed}"


def split_study(task: str) -> tuple[str, int | None]:
    """``("tuned_x_study2 / esol_mlp")`` -> ``("tuned_x / esol_mlp", 2)``; no study -> ``(task, None)``."""
    exp, sep, rest = task.partition(" / ")
    m = STUDY_SUFFIX.match(exp)
    if not m:
        return task, None
    return m["base"] + sep + rest, int(m["seed"])


def pooled_verdict(verdicts: list[str]) -> str:
    """The verdict across studies from each study's verdict (rule: :data:`STUDIES_RULE`)."""
    if len(verdicts) < 2:
        return INCONCLUSIVE
    if SUPPORTED in verdicts and CONTRADICTED in verdicts:
        return MIXED
    for v in (SUPPORTED, CONTRADICTED):
        if all(x == v for x in verdicts):
            return v
    return INCONCLUSIVE


def paired_verdict(ci_low: float | None, ci_high: float | None, higher_is_better: bool) -> str:
    """One study's verdict on ``variant - baseline``: supported = the variant better, CI excluding 0."""
    if ci_low is None or ci_high is None:
        return INCONCLUSIVE
    below, above = ci_high < 0, ci_low > 0
    better, worse = (above, below) if higher_is_better else (below, above)
    return SUPPORTED if better else CONTRADICTED if worse else INCONCLUSIVE


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.4f}"


def across_studies(
    paired: list[dict], claims: list, higher_is_better: dict[str, bool]
) -> list[dict]:
    """One row per comparison made in two or more studies of the same base experiment.

    Args:
        paired: the report's paired-difference records (``task``, ``variant``, ``baseline``,
            ``metric``, ``n``, ``mean``, ``ci_low``, ``ci_high``).
        claims: the report's claim rows (:class:`score_exp.report.claims.Claim`).
        higher_is_better: per task name, whether the headline metric is better higher.

    Returns dicts with ``comparison``, ``experiment`` (the base name), ``studies`` (``[{"study",
    "n", "effect", "ci", "verdict"}]``, by study seed), ``spread`` (min, max of the effects or
    None), ``pooled`` (mean effect or None) and ``verdict``.
    """
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    for rec in paired:
        base, seed = split_study(rec["task"])
        if seed is None:
            continue
        hib = higher_is_better.get(rec["task"], False)
        comparison = f"{rec['variant']} − {rec['baseline']} ({rec['metric']})"
        groups.setdefault((comparison, base), {})[seed] = {
            "study": seed, "n": rec["n"], "effect": rec["mean"],
            "ci": "n/a" if rec["ci_low"] is None else f"[{rec['ci_low']:+.4f}, {rec['ci_high']:+.4f}]",
            "verdict": paired_verdict(rec["ci_low"], rec["ci_high"], hib),
        }  # fmt: skip
    seen: dict[tuple[str, str, int], int] = {}
    for c in claims:
        base, seed = split_study(c.experiment)
        if seed is None:
            continue
        i = seen.get((c.claim, c.experiment, seed), 0)  # several rows of one claim: by order
        seen[(c.claim, c.experiment, seed)] = i + 1
        comparison = c.claim + (f" (row {i + 1})" if i else "")
        groups.setdefault((comparison, base), {})[seed] = {
            "study": seed, "n": c.n, "effect": None, "effect_text": c.effect, "ci": c.ci,
            "verdict": c.verdict,
        }  # fmt: skip
    out = []
    for (comparison, base), by_seed in groups.items():
        if len(by_seed) < 2:
            continue
        studies = [by_seed[s] for s in sorted(by_seed)]
        effects = [s["effect"] for s in studies if s["effect"] is not None]
        out.append({
            "comparison": comparison, "experiment": base, "studies": studies,
            "spread": (min(effects), max(effects)) if effects else None,
            "pooled": statistics.fmean(effects) if effects else None,
            "verdict": pooled_verdict([s["verdict"] for s in studies]),
        })  # fmt: skip
    return out


def studies_table(rows: list[dict]) -> Table:
    header = ["comparison", "experiment", "studies", "per study: effect [95% CI] verdict",
              "spread of effects", "pooled effect", "verdict"]  # fmt: skip
    body = []
    for r in rows:
        per = "; ".join(
            f"study {s['study']}: "
            + (_fmt(s["effect"]) if s["effect"] is not None else s.get("effect_text", ""))
            + f" {s['ci']} {s['verdict']} (n={s['n']})"
            for s in r["studies"]
        )
        spread = (
            "n/a" if r["spread"] is None else f"{_fmt(r['spread'][0])} to {_fmt(r['spread'][1])}"
        )
        body.append([r["comparison"], r["experiment"], str(len(r["studies"])), per.replace("|", "/"),
                     spread, _fmt(r["pooled"]), r["verdict"]])  # fmt: skip
    return Table("verdicts across study seeds", header, body, STUDIES_RULE, rows)
