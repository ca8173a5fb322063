"""Aggregating runs into the paper's tables: variants, integrators and the dt x steps grid (the
variants themselves, runs grouped over seeds, are :mod:`score_exp.report.variants`).

Every number here is computed from run folders; a run whose status is not ``ok`` is listed by
the report and never averaged in.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from dataclasses import dataclass, field

from score_exp.report.runs import Run
from score_exp.report.variants import Variant, stat, value_key
from score_exp.runs.files import read_text
from score_exp.runs.record import EVAL, limit

log = logging.getLogger("score_exp.report")


# --------------------------------------------------------------------------- convergence


def iteration_based(runs: list[Run]) -> bool:
    """True for tasks trained by steps (the LM), False for epoch-based ones (ESOL)."""
    return any((r.get("trainer.max_steps") or -1) > 0 and (r.get("trainer.max_epochs") or -1) < 0 for r in runs)  # fmt: skip


def reached_at(run: Run, target: float, higher_is_better: bool, by_step: bool) -> int | None:
    """First training step (or epoch count) at which the val curve reaches ``target``."""
    for row in run.curve:
        ok = row["value"] >= target if higher_is_better else row["value"] <= target
        if ok:
            if by_step or row["epoch"] is None:
                return row["step"]
            return row["epoch"] + 1  # epochs completed when this validation ran
    return None


def default_target(vs: list[Variant]) -> tuple[float | None, str]:
    """The stacked baseline's mean best val metric (the paper's "reach the baseline" target)."""
    base = [v for v in vs if v.get("depth_preset") == "stacked" and not v.reference]
    if len(base) != 1:
        return None, "no single `stacked` variant: pass --target"
    xs = [r.record.best_value for r in base[0].ok_runs if r.record.best_val is not None]
    if not xs:
        return None, "the stacked variant has no finished run"
    return statistics.fmean(
        xs
    ), f"mean best {base[0].ok_runs[0].record.best_val['metric']} of `stacked`"


# --------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A titled table: a header row and rows of strings (rendered as Markdown and LaTeX)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    # Machine-readable cells for tests and W&B: one dict per row.
    records: list[dict] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join("---" for _ in self.header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        def esc(s: str) -> str:
            for a, b in (
                ("\\", r"\textbackslash{}"),
                ("_", r"\_"),
                ("%", r"\%"),
                ("&", r"\&"),
                ("#", r"\#"),
            ):
                s = s.replace(a, b)
            return s.replace("±", r"$\pm$")

        cols = "l" + "r" * (len(self.header) - 1)
        out = [
            "% " + self.title,
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{esc(self.title)}}}",
            rf"\begin{{tabular}}{{{cols}}}",
            r"\toprule",
            " & ".join(esc(h) for h in self.header) + r" \\",
            r"\midrule",
        ]
        out += [" & ".join(esc(c) for c in row) + r" \\" for row in self.rows]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
        return "\n".join(out)


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def variant_table(task: str, vs: list[Variant], target: float | None = None) -> Table:
    """One row per depth variant: test metric over seeds, params, NFE, time, convergence."""
    runs = [r for v in vs for r in v.runs]
    headline = runs[0].headline
    hib = runs[0].higher_is_better
    by_step = iteration_based(runs)
    unit = "step" if by_step else "epoch"
    note_target = "target given with --target"
    if target is None:
        target, note_target = default_target(vs)
    header = ["variant", "n ok/total", f"test {headline}", "params", "NFE", f"time/{unit} (s)",
              f"{unit}s to target"]  # fmt: skip
    rows, records = [], []
    for v in vs:
        s = stat(v.values())
        t_key = "time_per_step_s" if by_step else "time_per_epoch_s"
        if target is None or not v.ok_runs:
            conv, reached = "n/a", []
        else:
            reached = [
                x for r in v.ok_runs if (x := reached_at(r, target, hib, by_step)) is not None
            ]
            conv = "not reached" if not reached else f"{statistics.fmean(reached):,.0f}"
            if v.ok_runs and 0 < len(reached) < len(v.ok_runs):
                conv += f" ({len(reached)}/{len(v.ok_runs)} reached)"
        params, nfe, t = v.mean_of("params"), v.mean_of("nfe"), v.mean_of(t_key)
        rows.append([v.label, f"{len(v.ok_runs)}/{len(v.runs)}", s.fmt(), _num(params), _num(nfe),
                     _num(t, "{:.3g}"), conv])  # fmt: skip
        records.append({"variant": v.label, "n_ok": len(v.ok_runs), "n": len(v.runs), "mean": s.mean,
                        "std": s.std, "params": params, "nfe": nfe, "time": t,
                        "to_target": statistics.fmean(reached) if reached else None,
                        "reached": len(reached)})  # fmt: skip
    tgt = "none" if target is None else f"{target:.4f}"
    note = (
        f"Mean ± sample std over seeds of the ok runs. Convergence: first {unit} whose val "
        f"metric reaches the target {tgt} ({note_target}), mean over the runs that reach it."
    )
    return Table(f"{task}: depth variants", header, rows, note, records)


def integrator_table(task: str, runs: list[Run]) -> Table | None:
    """Metric, NFE and wall time per training step for each integrator (ratios vs Euler)."""
    ok = [r for r in runs if r.ok]
    names = sorted({r.get("depth.integrator") for r in ok}, key=lambda n: (n != "euler", str(n)))
    if len(names) < 2:
        return None
    rows, records = [], []
    base_t = _mean([r.get("time_per_step_s") for r in ok if r.get("depth.integrator") == "euler"])
    for name in names:
        rs = [r for r in ok if r.get("depth.integrator") == name]
        s = stat([m for r in rs if (m := r.test_metric()) is not None])
        t = _mean([r.get("time_per_step_s") for r in rs])
        nfe = _mean([r.get("nfe") for r in rs])
        ratio = t / base_t if t and base_t else None
        rows.append(
            [name, str(len(rs)), s.fmt(), _num(nfe), _num(t, "{:.4f}"), _num(ratio, "{:.2f}x")]
        )
        records.append({"integrator": name, "n": len(rs), "mean": s.mean, "std": s.std, "nfe": nfe,
                        "time_per_step": t, "time_ratio": ratio})  # fmt: skip
    headline = ok[0].headline
    header = ["integrator", "n", f"test {headline}", "NFE", "time/step (s)", "time vs euler"]
    note = "Over every ok run of the task with that integrator (other varied keys pooled)."
    return Table(f"{task}: integrators", header, rows, note, records)


def dt_steps_table(task: str, runs: list[Run]) -> Table | None:
    """The dt x steps grid of the test metric over shared-depth runs (``dt=null``: 1/steps)."""
    ok = [r for r in runs if r.ok and r.get("depth.share")]
    if not ok:
        return None
    dts = sorted(
        {value_key(r.get("depth.dt")) for r in ok},
        key=lambda s: (s != "null", float(s) if s != "null" else 0),
    )
    steps = sorted({r.get("depth.steps") for r in ok if r.get("depth.steps") is not None})
    if len(dts) < 2 and len(steps) < 2:
        return None
    rows, records = [], []
    for dt in dts:
        row = ["1/steps" if dt == "null" else dt]
        for n in steps:
            cell = [
                r for r in ok if value_key(r.get("depth.dt")) == dt and r.get("depth.steps") == n
            ]
            s = stat([m for r in cell if (m := r.test_metric()) is not None])
            row.append(f"{s.fmt(3)} (n={s.n})" if s.n else "—")
            records.append(
                {"dt": json.loads(dt), "steps": n, "mean": s.mean, "std": s.std, "n": s.n}
            )
        rows.append(row)
    header = ["dt \\ steps", *[str(n) for n in steps]]
    note = f"Test {ok[0].headline}, mean ± std (n runs); every other varied key pooled."
    return Table(f"{task}: dt x steps (shared depth)", header, rows, note, records)


def eval_settings(v: Variant) -> dict[tuple, list[dict]]:
    """``score-eval``'s rows (``<run>/eval.csv``) of a variant's runs, by inference setting.

    A setting is ``(steps, integrator, dt, keep_horizon, adaptive_eps, halt)``; each run gives
    its first row per setting (a repeated evaluation is the same setting again). Rows carry
    ``nfe`` (evaluations of F spent per sample), ``metric`` (the test headline) and ``seconds``.
    """
    out: dict[tuple, list[dict]] = {}
    for r in v.ok_runs:
        path = r.path / EVAL
        if not path.is_file():
            continue
        seen = set()
        with io.StringIO(
            read_text(path, limit(path)), newline=""
        ) as f:  # bounded, never through a link
            for row in csv.DictReader(f):
                metric = row.get(f"test/{r.headline}")
                if not metric:
                    continue  # evaluated on the val split
                try:  # a row that is not score-eval's (edited, crafted) is skipped with a warning
                    key = (int(row["steps"]), row["integrator"], float(row["dt"]),
                           row["keep_horizon"] == "True", row.get("adaptive_eps") or "",
                           row.get("halt") or ("state" if row.get("adaptive_eps") else ""))  # fmt: skip
                    nfe = row.get("nfe_spent") or row["nfe"]
                    values = {"nfe": float(nfe), "metric": float(metric),
                              "seconds": float(row["seconds"])}  # fmt: skip
                except (KeyError, TypeError, ValueError) as e:
                    log.warning("%s: skipped a malformed row (%s: %s)", path, type(e).__name__, e)
                    continue
                if key in seen:
                    continue
                seen.add(key)
                out.setdefault(key, []).append(values)
    return out


def setting_label(key: tuple) -> str:
    steps, integrator, dt, keep_horizon, eps, halt = key
    text = f"{steps} x {integrator}, dt {dt:g}"
    if eps and halt == "ponder":  # learned halting: cumulative halting probability > 1 - eps
        return text + f", ponder exit p > {1 - float(eps):g}"
    return text + (f", halt {halt} < {float(eps):g}" if eps else "")


def inference_table(task: str, vs: list[Variant]) -> Table | None:
    """The metric against the evaluations spent at inference, per training scheme (variant),
    from ``score-eval``'s rows: other step counts, integrators, halting thresholds."""
    rows, records = [], []
    for v in vs:
        for key, xs in sorted(eval_settings(v).items(), key=lambda kv: (kv[0][0], str(kv[0]))):
            s = stat([x["metric"] for x in xs])
            nfe = statistics.fmean(x["nfe"] for x in xs)
            secs = statistics.fmean(x["seconds"] for x in xs)
            rows.append([v.label, setting_label(key), str(s.n), f"{nfe:.2f}", s.fmt(),
                         f"{secs:.2f}"])  # fmt: skip
            records.append({"variant": v.label, "setting": setting_label(key), "n": s.n,
                            "nfe": nfe, "mean": s.mean, "std": s.std, "seconds": secs})  # fmt: skip
    if not rows:
        return None
    headline = vs[0].ok_runs[0].headline if vs[0].ok_runs else "metric"
    header = ["variant (training)", "inference", "n", "NFE spent", f"test {headline}", "eval s"]
    note = ("From `score-eval` (`<run>/eval.csv`): NFE spent = evaluations of F per sample "
            "(fewer than steps x integrator evaluations when samples halt); mean ± std over runs.")  # fmt: skip
    return Table(f"{task}: metric against inference NFE", header, rows, note, records)


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return statistics.fmean(xs) if xs else None
