"""Published results: a snapshot of the report under ``docs/results/``, with its provenance.

``make results`` (``python -m score_exp.report.snapshot``) builds the report of the runs of
``make claims-datasets-cpu`` (and of ``make tune-cpu`` / ``tune-gnn-cpu`` when present, each in a
``tune_<task>/`` folder) into ``docs/results/``: ``report.md``, ``claims.md``, ``tables.tex``,
``runs.csv``, ``paired.csv``, the plots (PNG, SVG), plus

- ``runs.json``: the recorded numbers: per run its ``results.json``, the config keys the report
  reads (every key that varies between the runs and the keys the tables look up) and its val
  curve, and the runs not averaged in. :func:`check` re-renders every table from this file alone,
  through :func:`score_exp.report.build.build_report`, and compares it byte for byte with the
  committed files, so the page never drifts from the runs (``tests/test_snapshot.py``);
- ``HEADLINE.md``: each claim's verdict per dataset and SCORE vs stacked vs the peer, spliced
  between the ``results`` markers of ``docs/reproducing.md`` (all of it) and of the README (its
  short form: the verdict tables, without the per-experiment rows);
- ``PROVENANCE.md``: commit, command, machine (CPU model, cores), date, the runs' own commits and
  their wall time;
- ``index.html``: the results page, one self-contained file (:mod:`score_exp.report.html`): the
  headline, claims, every table (sortable), the plots inline and the provenance, of this snapshot
  and its ``tune_<task>/`` folders; checked like the tables (its images masked).

:mod:`score_exp.report.rerender` re-renders a committed snapshot from its own ``runs.json`` files.

Text and images only: checkpoints, logs and run folders are never copied.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from score_exp.errors import DataError, ScoreExpError
from score_exp.report import html, literature
from score_exp.report.build import build_report
from score_exp.report.provenance import (  # noqa: F401  (also imported from here: rerender, tests)
    README_END,
    README_START,
    RECORD,
    _dirty,
    _git,
    check_prose,
    machine,
    provenance,
    training_commands,
    unpublishable,
)
from score_exp.report.runs import missing_runs, scan_runs, varied_keys
from score_exp.runs.files import atomic_write_text

HEADLINE = "HEADLINE.md"
PROVENANCE = "PROVENANCE.md"
LITERATURE = "LITERATURE.md"
# Files score-report writes that the check compares (the plots are drawn from the same runs).
TABLE_FILES = ("report.md", "claims.md", "runs.csv", "paired.csv", "tables.tex")
# What a snapshot may hold: small text and images.
ALLOWED = (".md", ".csv", ".json", ".tex", ".png", ".svg", ".html")
PAGE_TITLE = "score_exp: published results"
# The headline's per-experiment table (long rows): in the full block only, never the README's.
EXPERIMENTS_HEADER = (
    "| experiment / task | test metric, mean ± std (n) | vs stacked | vs the peer |"
)
SHORT_MORE = (
    "Per experiment, SCORE vs stacked vs the peer with paired 95% CIs: "
    "[docs/reproducing.md](docs/reproducing.md#headline)."
)
NOT_GENERATED = (
    "**Not yet generated**: no snapshot under `docs/results/` on this branch. Run "
    "`make claims-datasets-cpu` (about 60 minutes on a 2-core CPU), then `make results`."
)

# Config keys the tables and claims look up besides the varied ones (report.runs, tables, claims).
READ_KEYS = ("task.name", "task.headline", "task.monitor", "task.monitor_mode", "depth_preset",
             "seed", "experiment_name", "task.data.path", "task.data.registry_key",
             "task.model._target_", "trainer.max_steps", "trainer.max_epochs")  # fmt: skip


def record(paths: list[Path]) -> dict:
    """The numbers the report reads from the run folders under ``paths`` (``runs.json``)."""
    runs, unreadable = scan_runs(paths)
    keys = set(varied_keys(runs)) | set(READ_KEYS)
    return {
        "paths": [str(p) for p in paths],
        "runs": [
            {
                "path": str(r.path),
                "results": r.record.to_dict(),
                "config": {
                    k: v for k, v in sorted(r.config.items()) if k in keys or k.startswith("depth.")
                },  # fmt: skip
                "curve": r.curve,
            }
            for r in runs
        ],
        "missing": [str(m) for m in missing_runs(paths)],
        "unreadable": [[str(p), reason] for p, reason in unreadable],
    }


# --------------------------------------------------------------------------- headline


def _fmt(x: float | None, spec: str = "+.3f") -> str:
    return "n/a" if x is None else format(x, spec)


def headline(report) -> str:
    """Markdown: each claim's verdict per dataset, then SCORE vs stacked vs the peer per task."""
    from score_exp.report.claims import dataset_verdict

    lines = []
    verdicts: dict[tuple[str, str], dict[str, set[str]]] = {}
    for c in report.claims:
        verdicts.setdefault((c.claim, c.model), {}).setdefault(c.dataset or "?", set()).add(c.verdict)  # fmt: skip
    datasets = sorted({d for per in verdicts.values() for d in per})
    if verdicts:
        lines += ["| claim | model | " + " | ".join(datasets) + " |",
                  "|---|---|" + "---|" * len(datasets)]  # fmt: skip
        for (claim, model), per in verdicts.items():
            cells = ["—" if d not in per else dataset_verdict(per[d]) for d in datasets]
            lines.append(f"| {claim} | {model or '?'} | " + " | ".join(cells) + " |")
        lines.append("")
    means = {}
    for t in report.tables:
        if t.title.endswith(": depth variants"):
            task = t.title[: -len(": depth variants")]
            means[task] = [(r["variant"], r["mean"], r["std"], r["n_ok"]) for r in t.records]
    paired: dict[str, list[dict]] = {}
    for p in report.paired:
        paired.setdefault(p["task"], []).append(p)
    if means:
        lines += [EXPERIMENTS_HEADER, "|---|---|---|---|"]
        for task, vs in sorted(means.items()):
            cells = "; ".join(f"{v} {_fmt(m, '.3f')}" + (f" ± {s:.3f}" if s is not None else "")
                              + f" ({n})" for v, m, s, n in vs)  # fmt: skip
            rows = paired.get(task, [])

            def diffs(ref: bool, rows=rows) -> str:
                sel = [p for p in rows if p["baseline"].endswith("(reference)") == ref
                       and not p["variant"].endswith("(reference)")
                       and p["variant"] != "stacked"]  # fmt: skip
                return (
                    "; ".join(
                        f"{p['variant']} − {p['baseline']} {_fmt(p['mean'])} "
                        + (
                            f"[{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"
                            if p["ci_low"] is not None
                            else ""
                        )
                        for p in sel
                    )
                    or "—"
                )

            lines.append(f"| {task} | {cells} | {diffs(False)} | {diffs(True)} |")
        lines.append("")
    for t in report.tables:
        if t.title == "verdicts across study seeds":  # tuned studies: the pooled verdicts
            lines += ["| comparison (tuned) | experiment | studies | spread of effects | verdict |",
                      "|---|---|---|---|---|"]  # fmt: skip
            for r, row in zip(t.records, t.rows, strict=True):
                lines.append(f"| {r['comparison']} | {r['experiment']} | {len(r['studies'])} | "
                             f"{row[4]} | {r['verdict']} |")  # fmt: skip
            lines.append("")
    if not lines:
        lines = ["No claim or variant table in these runs.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- provenance


# --------------------------------------------------------------------------- build and check


def _write(out: Path, paths: list[Path]) -> tuple[dict, object]:
    # Through JSON first: the snapshot is rendered from exactly what runs.json holds.
    rec = json.loads(json.dumps(record(paths), sort_keys=True))
    if not rec["runs"]:
        raise DataError(f"no run folders (results.json) under {', '.join(map(str, paths))}")
    report = build_report(paths, out, recorded=rec)  # the same code path as the check
    for svg in out.glob("*.svg"):  # report.md shows the PNGs: the vector copies stay out of git
        svg.unlink()
    atomic_write_text(out / RECORD, _record_text(rec))
    atomic_write_text(out / HEADLINE, headline(report))
    return rec, report


def _record_text(rec: dict) -> str:
    """runs.json, one compact run per line: small, and a new snapshot's diff names its runs."""
    head = json.dumps({k: v for k, v in rec.items() if k != "runs"}, sort_keys=True)
    runs = ",\n".join(json.dumps(r, sort_keys=True, separators=(",", ":")) for r in rec["runs"])
    return f'{head[:-1]}, "runs": [\n{runs}\n]}}\n'


def _clear(out: Path) -> None:
    """Empty a snapshot folder, refusing anything a snapshot never holds."""
    for p in sorted(out.rglob("*"), reverse=True):
        if p.is_symlink() or (p.is_file() and p.suffix not in ALLOWED):
            raise DataError(f"{p}: not part of a results snapshot; remove it by hand")
    for p in out.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def snapshot(out: Path, runs: list[Path], tune: list[Path], command: str, wall: str | None,
             train: str | None = None, tune_train: str | None = None, tune_wall: str | None = None,
             allow_unpublishable: bool = True) -> None:  # fmt: skip
    """Write the snapshot of ``runs`` (and of each ``tune`` folder, in ``tune_<name>/``) to ``out``.

    Raises:
        DataError: (``allow_unpublishable`` false) a run was trained on a dirty tree or outside the
            portable numerics mode: named before anything is written.
    """
    runs = [p for p in runs if p.exists()]
    if not runs:
        raise DataError("no run folder to publish: run `make claims-datasets-cpu` first")
    if not allow_unpublishable:
        for paths in [runs, *([t] for t in tune if t.exists())]:
            if bad := unpublishable(json.loads(json.dumps(record(paths)))):
                raise DataError(
                    "refusing to publish: "
                    + "; ".join(f"{len(v)} runs {k} (e.g. {v[0]})" for k, v in bad.items())
                    + ". Re-train them from a clean tree with numerics=portable (the claims and "
                    "tuning targets do), or pass --allow-unpublishable to publish them marked"
                )
    # Asked before the snapshot rewrites its own tracked files (which would always look dirty).
    dirty = _dirty()
    if out.exists():
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    rec, report = _write(out, runs)
    reports = {"": report}
    for t in tune:
        if t.exists() and scan_runs([t])[0]:
            name = t.parent.name if t.name == "retrain" else t.name
            rec_t, reports[f"tune_{name}"] = _write(out / f"tune_{name}", [t])
            atomic_write_text(
                out / f"tune_{name}" / PROVENANCE,
                provenance(rec_t, command, tune_wall, dirty, tune_train),
            )
    atomic_write_text(out / PROVENANCE, provenance(rec, command, wall, dirty, train))
    atomic_write_text(out / LITERATURE, literature.markdown(report.runs))
    write_page(out, reports)


def write_page(snap: Path, reports: dict) -> Path:
    """The snapshot's ``index.html`` from its reports (``""``: the main one, ``tune_<task>``: the
    tuned ones) and their HEADLINE.md and PROVENANCE.md."""
    lit = literature.markdown(reports[""].runs) if "" in reports else ""
    parts = html.folder_parts(snap, reports, PROVENANCE, HEADLINE, lit)
    return html.write_page(snap, parts, PAGE_TITLE)


def readme_block(snap: Path, short: bool = False) -> str:
    """The headline block: the snapshot's HEADLINE.md (and its tuned ones), or 'not yet generated'.

    ``short`` (the README's) keeps the verdict tables and leaves the per-experiment rows to the
    full block (``docs/reproducing.md``), with a link to it.
    """
    h = snap / HEADLINE
    body = h.read_text() if h.is_file() else NOT_GENERATED + "\n"
    for t in sorted(snap.glob(f"tune_*/{HEADLINE}")) if h.is_file() else []:
        body = body.rstrip() + f"\n\nTuned (the snapshot's `{t.parent.name}/`):\n\n"
        body += t.read_text()
    if short and h.is_file():
        blocks = body.strip().split("\n\n")
        body = "\n\n".join(b for b in blocks if not b.startswith(EXPERIMENTS_HEADER))
        body += "\n\n" + SHORT_MORE
    return f"{README_START}\n{body.rstrip()}\n{README_END}"


def splice_readme(readme: Path, snap: Path, short: bool = False) -> None:
    """Replace the block between the ``results`` markers of ``readme`` by :func:`readme_block`."""
    text = readme.read_text()
    a, b = text.index(README_START), text.index(README_END) + len(README_END)
    atomic_write_text(readme, text[:a] + readme_block(snap, short) + text[b:])


def splice_headlines(snap: Path, readme: Path | None, page: Path | None) -> None:
    """The README's short headline block and the results page's full one, from ``snap``."""
    if readme:
        splice_readme(readme, snap, short=True)
    if page:
        splice_readme(page, snap)


def check(snap: Path) -> list[str]:
    """Re-render every report of a snapshot from its ``runs.json``: the files that differ."""
    problems = []
    folders = [d for d in [snap, *sorted(snap.glob("tune_*"))] if d.is_dir()]
    if not (snap / RECORD).is_file():
        return [f"{snap}: no {RECORD}"]
    reports = {}
    # One temporary folder for all: the page is rendered last, from every report's plots.
    with tempfile.TemporaryDirectory() as top:
        for k, d in enumerate(folders):
            rec = json.loads((d / RECORD).read_text())
            tmp = Path(top) / str(k)
            report = build_report([Path(p) for p in rec["paths"]], tmp, recorded=rec)
            reports["" if d == snap else d.name] = report
            for name in TABLE_FILES:
                if (tmp / name).read_bytes() != (d / name).read_bytes():
                    problems.append(f"{d / name}: differs from what score-report makes of {RECORD}")
            if headline(report) != (d / HEADLINE).read_text():
                problems.append(f"{d / HEADLINE}: differs from the re-rendered headline")
            for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (d / "report.md").read_text()):
                if not (d / fig).is_file():
                    problems.append(f"{d / fig}: a plot of report.md is missing")
            for p in d.iterdir():
                if p.is_file() and p.suffix not in ALLOWED:
                    problems.append(f"{p}: not text or an image")
        lit, lit_text = snap / LITERATURE, literature.markdown(reports[""].runs)
        if lit.is_file() and lit.read_text() != lit_text:
            problems.append(f"{lit}: differs from score_exp.report.literature")
        parts = html.folder_parts(snap, reports, PROVENANCE, HEADLINE, lit_text)
        made = html.page(parts, PAGE_TITLE)
        problems += html.check_page(snap / html.PAGE, made, RECORD)
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m score_exp.report.snapshot",
        description="Write (or --check) the published results snapshot under docs/results/.",
    )
    p.add_argument("runs", nargs="*", type=Path, help="run folders (make claims-datasets-cpu's)")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    p.add_argument("--tune", type=Path, nargs="*", default=[], help="tune retrain folders, when present")  # fmt: skip
    p.add_argument("--command", default="make results", help="recorded in PROVENANCE.md")
    p.add_argument("--wall", help="wall time of the sweep, recorded in PROVENANCE.md")
    p.add_argument(
        "--readme",
        type=Path,
        help="splice HEADLINE.md's short form into this README "
        "(with --check: check its prose against the snapshot's verdicts)",
    )
    p.add_argument("--page", type=Path, help="splice all of HEADLINE.md into this page")
    p.add_argument("--train-command", help="the command that trained the runs (PROVENANCE.md)")
    p.add_argument("--tune-train-command", help="the command that trained the tuned runs")
    p.add_argument("--tune-wall", help="wall time of the tuning, recorded in tune_*/PROVENANCE.md")
    p.add_argument(
        "--allow-unpublishable",
        action="store_true",
        help="publish runs from a dirty tree or outside numerics=portable (marked)",
    )
    p.add_argument(
        "--check", action="store_true", help="re-render OUT from its runs.json and compare"
    )
    args = p.parse_args(argv)
    try:
        if args.check:
            problems = check(args.out)
            if args.readme:
                problems += check_prose(args.readme.read_text(), args.out)
            for line in problems:
                print(f"snapshot: {line}", file=sys.stderr)
            return 1 if problems else 0
        snapshot(
            args.out,
            args.runs,
            args.tune,
            args.command,
            args.wall,
            args.train_command,
            args.tune_train_command,
            args.tune_wall,
            args.allow_unpublishable,
        )
        splice_headlines(args.out, args.readme, args.page)
    except ScoreExpError as e:
        print(f"snapshot: error: {e}", file=sys.stderr)
        return 2
    print(f"results snapshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
