"""Building a report: runs -> tables + plots -> report.md, tables.tex, runs.csv (+ W&B)."""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from score_exp.errors import DataError
from score_exp.report import plots
from score_exp.report.claims import (
    across_datasets,
    across_table,
    claims,
    claims_markdown,
    claims_table,
)
from score_exp.report.runs import Run, missing_runs, recorded_runs, scan_runs, varied_keys
from score_exp.report.stats import paired_table, reference_table
from score_exp.report.studies import across_studies, studies_table
from score_exp.report.tables import (
    Table,
    dt_steps_table,
    inference_table,
    integrator_table,
    variant_table,
)
from score_exp.report.variants import by_task, variants
from score_exp.report.verdicts import cap_table
from score_exp.runs.files import atomic_write_text

log = logging.getLogger("score_exp.report")


@dataclass
class Section:
    """One task's part of a report: its tables and figures, in the order report.md shows them."""

    task: str
    tables: list[Table]
    figures: list[Path]
    higher_is_better: bool = False


@dataclass
class Report:
    """What a report holds; ``tables`` and ``figures`` are also written to ``out``."""

    out: Path
    runs: list[Run]
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    not_ok: list[tuple[str, str, str]] = field(default_factory=list)  # (path, status, detail)
    paired: list[dict] = field(default_factory=list)  # paired.csv rows
    claims: list = field(default_factory=list)  # claims.md rows (report.claims.Claim)
    sections: list[Section] = field(default_factory=list)  # per task (the results page's order)
    claim_tables: list[Table] = field(default_factory=list)  # claims, across datasets, studies
    cap: Table | None = None  # the runs that hit their epoch cap (claims.md shows it too)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "task"


def build_report(paths: list[Path], out: Path, target: float | None = None,
                 recorded: dict | None = None) -> Report:  # fmt: skip
    """Read the runs under ``paths`` and write the report into ``out``.

    Args:
        paths: sweep or run folders (searched recursively for ``results.json``).
        out: output folder (created).
        target: val-metric target for the convergence column; default the mean best val
            metric of the ``stacked`` variant of each task.
        recorded: instead of reading ``paths``, the runs recorded by
            :func:`score_exp.report.snapshot.record` (``runs.json`` of a results snapshot): the
            same tables from the recorded numbers alone (``paths`` are then only named).
    """
    paths = [Path(p) for p in paths]
    if recorded is None:
        runs, unreadable = scan_runs(paths)
        missing = missing_runs(paths)
    else:
        runs, missing, unreadable = recorded_runs(recorded)
    if not runs and not missing and not unreadable:
        raise DataError(f"no run folders (results.json) under {', '.join(map(str, paths))}")
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, runs)
    for r in runs:
        if not r.ok:
            detail = r.record.error or r.non_finite() or _diverged_detail(r)
            report.not_ok.append((str(r.path), r.status, detail))
    report.not_ok += [
        (str(m), "missing", "no results.json (still running, crashed before writing, or never ran)")
        for m in missing
    ]
    report.not_ok += [(str(p), "unreadable", reason) for p, reason in unreadable]
    for p, reason in unreadable:
        log.warning("score-report: skipping unreadable run %s: %s", p, reason)

    sections: list[str] = []
    tasks = by_task(runs)
    for task, task_runs in sorted(tasks.items()):
        slug = _slug(task)
        vs = variants(task_runs)  # depth variants, then reference models (field-standard peers)
        depth_runs = [r for r in task_runs if not r.reference]
        tables = [variant_table(task, vs, target)]
        for pt in (paired_table(task, vs), reference_table(task, vs)):
            if pt:
                tables.append(pt)
                report.paired += pt.records
        tables += [
            t
            for t in (
                integrator_table(task, depth_runs),
                dt_steps_table(task, depth_runs),
                inference_table(task, vs),
            )
            if t
        ]
        figs = plots.val_curves(task, vs, out, slug)
        figs += plots.metric_vs_dt(task, depth_runs, out, slug)
        figs += plots.metric_vs_params(task, vs, out, slug)
        figs += plots.metric_vs_wall_time(task, vs, out, slug)
        figs += plots.metric_vs_inference_nfe(task, vs, out, slug)
        figs += plots.connection_heatmaps(task, vs, out, slug)
        if recorded is None:  # read from the run folders' metrics.csv, which a record lacks
            figs += plots.diagnostics(task, vs, out, slug)
        report.tables += tables
        report.figures += figs
        report.sections.append(Section(task, tables, figs, task_runs[0].higher_is_better))
        text = [f"## {task}", ""] + [t.markdown() for t in tables]
        text += [f"![{p.stem}]({p.name})\n" for p in figs if p.suffix == ".png"]
        sections.append("\n".join(text))

    report.claims = claims(runs)
    claims_md = claims_markdown(report.claims, runs)
    report.cap = cap_table(runs) if report.claims else None
    if report.claims:
        report.claim_tables.append(claims_table(report.claims))
        if summary := across_datasets(report.claims):
            report.claim_tables.append(across_table(summary))
    hib = {t: rs[0].higher_is_better for t, rs in tasks.items()}
    if studies := across_studies(report.paired, report.claims, hib):
        st = studies_table(studies)
        report.claim_tables.append(st)
        claims_md += "\n## Across study seeds\n\n" + st.markdown().split("\n", 2)[2]
    report.tables += report.claim_tables
    sections.append("## Claims of the paper\n\n" + claims_md.split("\n", 2)[2])
    md = [
        "# score_exp report",
        "",
        f"Runs: {len(runs)} found under {', '.join(f'`{p}`' for p in paths)}; "
        f"{sum(r.ok for r in runs)} ok, {len(report.not_ok)} not ok (listed below, not averaged).",
        "",
        *sections,
        "## Runs not averaged in",
        "",
    ]
    if report.not_ok:
        md += ["| run | status | detail |", "|---|---|---|"]
        md += [f"| `{p}` | {s} | {d.replace('|', '/')} |" for p, s, d in report.not_ok]
    else:
        md.append("None: every run finished ok.")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    atomic_write_text(out / "tables.tex", "% score-report tables (needs \\usepackage{booktabs})\n\n" + "\n".join(t.latex() for t in report.tables))  # fmt: skip
    atomic_write_text(out / "runs.csv", runs_csv(runs))
    atomic_write_text(out / "paired.csv", records_csv(report.paired, PAIRED_COLUMNS))
    atomic_write_text(out / "claims.md", claims_md)
    return report


def _diverged_detail(r: Run) -> str:
    at = r.record.diverged_at
    if not at:
        return ""
    return f"non-finite training loss ({at.get('loss')}) at epoch {at.get('epoch')}, step {at.get('step')}"


#: The columns of ``runs.csv``, in order. Where :data:`VARIED` stands, the config keys whose value
#: differs between the runs; where :data:`TESTED`, ``test/<metric>`` of every test metric. A
#: column in :data:`_OWN` is the run's own; any other is ``Run.get`` (the record's field, else
#: the config's key).
VARIED, TESTED = "<varied config keys>", "<test metrics>"
RUN_COLUMNS = ("run_dir", "task", "status", "seed", VARIED, "best_val", TESTED, "params", "nfe",
               "wall_time_s", "time_per_epoch_s", "time_per_step_s")  # fmt: skip
_OWN = {
    "run_dir": lambda r: str(r.path),
    "task": lambda r: r.task,
    "status": lambda r: r.status,
    "best_val": lambda r: r.record.best_value,
}


def runs_csv(runs: list[Run]) -> str:
    """One row per run, :data:`RUN_COLUMNS`: status, seed, every varied config key flattened,
    metrics and cost."""
    keys = varied_keys(runs) if len(runs) > 1 else []
    if any(r.reference for r in runs):  # results.json's, not a config key
        keys.insert(0, "reference")
    tested = sorted({f"test/{k}" for r in runs for k in r.record.test or {}})
    expand = {VARIED: keys, TESTED: tested}
    header = [c for column in RUN_COLUMNS for c in expand.get(column, [column])]

    def cell(r: Run, column: str):
        if column in _OWN:
            return _OWN[column](r)
        if column in tested:
            return (r.record.test or {}).get(column.split("/", 1)[1])
        return r.get(column)

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in runs:
        w.writerow(["" if (v := cell(r, c)) is None else v for c in header])
    return buf.getvalue()


PAIRED_COLUMNS = ["task", "variant", "baseline", "metric", "n", "mean", "ci_low", "ci_high", "p_t",
                  "p_wilcoxon"]  # fmt: skip


def records_csv(records: list[dict], columns: list[str]) -> str:
    """A CSV of ``records`` (one dict per row) with the given columns; ``None`` is empty."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for rec in records:
        w.writerow(["" if rec.get(c) is None else rec.get(c) for c in columns])
    return buf.getvalue()


def log_to_wandb(report: Report, project: str = "score_exp", mode: str = "auto") -> str:
    """Log the report's tables and figures as one W&B run (offline when no API key is set).

    The run joins the W&B group of the runs it summarises (their ``experiment_name``), with
    ``job_type="report"``. Returns the run's local folder.
    """
    import wandb

    from score_exp.tasks.loggers import init_run, resolve_mode

    mode = resolve_mode(mode)
    groups = sorted(
        {str(r.get("experiment_name")) for r in report.runs if r.get("experiment_name")}
    )
    run = init_run(  # online within seconds, else offline with one warning
        project=project,
        group=groups[0] if len(groups) == 1 else None,
        job_type="report",
        name=f"report-{'+'.join(groups) or 'runs'}",
        dir=str(report.out),
        mode=mode,
        tags=["report", *groups],
    )
    try:
        for t in report.tables:
            run.log({f"table/{_slug(t.title)}": wandb.Table(columns=t.header, data=t.rows)})
        for p in report.figures:
            if p.suffix == ".png":
                run.log({f"plot/{p.stem}": wandb.Image(str(p))})
        run.summary["runs"] = len(report.runs)
        run.summary["runs_not_ok"] = len(report.not_ok)
        return run.dir
    finally:
        run.finish()
