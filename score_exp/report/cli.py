"""``score-report PATH... [--out DIR] [--target X] [--html] [--wandb]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from score_exp.errors import ScoreExpError
from score_exp.runs.record import RESULTS

NOTHING_TO_REPORT = 1  # exit status when no PATH holds a run (yet); 2 is bad input


def has_runs(path: Path) -> bool:
    """``path`` holds a run folder (``results.json``) or a Hydra job folder that should."""
    return path.is_dir() and (
        next(path.rglob(RESULTS), None) is not None or next(path.rglob(".hydra"), None) is not None
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="score-report",
        description="Tables (Markdown, LaTeX, CSV) and plots from score-train run or sweep folders, "
        "paired differences against `stacked` by seed (paired.csv) and the paper's claims with "
        "verdicts (claims.md); with --html also one self-contained results page (index.html). "
        "Prints each task's variant table and paired differences and the claims; the notes and "
        "verdict rules are in report.md and claims.md. Runs that are not ok (failed, diverged, "
        "interrupted, missing, unreadable) are listed, never averaged in.",
        epilog="Example: score-report multirun/paper_esol_gnn   # writes multirun/paper_esol_gnn/report/. "
        "Exit status: 0 report written, 1 nothing to report (no run under PATH yet), 2 bad input.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="sweep or run folders (searched recursively), or one snapshot's runs.json "
        "(docs/results/runs.json: the tables from its recorded numbers; needs --out)",
    )
    p.add_argument("--out", type=Path, help="output folder (default: PATH/report for one PATH)")
    p.add_argument(
        "--target",
        type=float,
        help="val-metric target for the convergence column (default: the mean best val metric "
        "of the task's `stacked` variant)",
    )
    p.add_argument(
        "--html",
        action="store_true",
        help="also write OUT/index.html: one self-contained page (tables sortable by a click, "
        "claims, plots inline, provenance) that opens in a browser with no network",
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log tables and plots as a W&B run (offline without a key)",
    )
    p.add_argument("--wandb-project", default="score_exp", help="W&B project (default: score_exp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from score_exp.report.build import build_report, log_to_wandb
    from score_exp.runs.files import check_output_dir

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    recorded = None
    if len(args.paths) == 1 and args.paths[0].is_file():  # a snapshot's runs.json
        if args.out is None:
            print("score-report: error: a recorded runs.json needs --out DIR", file=sys.stderr)
            return 2
        from score_exp.runs.files import RECORDED_RUNS_LIMIT, UnsafeRunFile, read_json

        try:  # refused by size (one line) before it is read: never a MemoryError
            recorded = read_json(args.paths[0], RECORDED_RUNS_LIMIT)
            args.paths = [Path(p) for p in recorded["paths"]]
        except UnsafeRunFile as e:
            print(f"score-report: error: {e}", file=sys.stderr)
            return 2
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            print(f"score-report: error: {args.paths[0]}: not a recorded runs.json ({e})", file=sys.stderr)  # fmt: skip
            return 2
    if args.out is None:
        if len(args.paths) != 1:
            print("score-report: error: several PATHs need --out DIR", file=sys.stderr)
            return 2
        args.out = args.paths[0] / "report"
    try:
        check_output_dir(args.out, "--out")
    except ScoreExpError as e:
        print(f"score-report: error: {e}", file=sys.stderr)
        return 2
    # A sweep folder that does not exist yet (or holds no run yet) is not an error: there is
    # nothing to report, said in one line with exit status 1 (2 is kept for bad input).
    # A recorded runs.json holds its runs: its paths are only named.
    if recorded is None and not any(has_runs(p) for p in args.paths):
        where = ", ".join(f"{p}{'' if p.exists() else ' (does not exist yet)'}" for p in args.paths)
        print(f"score-report: nothing to report: no run folder under {where}", file=sys.stderr)
        return NOTHING_TO_REPORT
    if recorded is None:
        for p in args.paths:
            if not p.exists():
                print(f"score-report: {p} does not exist (yet): nothing from it", file=sys.stderr)
        args.paths = [p for p in args.paths if p.exists()]
    try:
        report = build_report(args.paths, args.out, target=args.target, recorded=recorded)
    except ScoreExpError as e:
        print(f"score-report: error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    if args.html:
        from score_exp.report.html import Part, write_page

        command = " ".join(["score-report", *(argv if argv is not None else sys.argv[1:])])
        page = write_page(args.out, [Part("", report, provenance(report, command))])
    if args.wandb:
        where = log_to_wandb(report, project=args.wandb_project)
        print(f"W&B run written to {where}")
    print(f"report: {args.out / 'report.md'} (every table with its notes; the verdict rules: "
          f"{args.out / 'claims.md'})")  # fmt: skip
    if args.html:
        print(f"page: {page}")
    return 0


def provenance(report, command: str) -> str:
    """Provenance of a ``score-report --html`` page: command, the commit of the code that made it
    (the checkout score_exp runs from, not the working folder), machine, date, the runs' own
    commits and folders."""
    import datetime
    import subprocess

    from score_exp.report.snapshot import machine

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[2],
                                 capture_output=True, text=True, timeout=10)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    head = git("rev-parse", "HEAD") or "unknown (not a git checkout)"
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""  # fmt: skip
    commits = sorted({str(run.get("git") or "unknown") for run in report.runs})
    folders = sorted({str(run.path.parent) for run in report.runs})
    shown = folders[:10] + ([f"... and {len(folders) - 10} more"] if len(folders) > 10 else [])
    return "\n".join([
        f"- command: `{command}`",
        f"- commit of the code that made this page: `{head}`{dirty}",
        f"- commits the runs were trained at: {', '.join(f'`{c}`' for c in commits) or 'none'}",
        f"- machine: {machine()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- folders of the runs: {', '.join(f'`{f}`' for f in shown)}",
        f"- the same tables as Markdown, LaTeX and CSV: `{report.out}`",
    ])  # fmt: skip


# Tables printed in full on the terminal: what a researcher reads first. The others (integrators,
# dt x steps, inference NFE) are named, and are in report.md.
PRINTED = (": depth variants", ": paired differences against")


def summary(report) -> str:
    """What score-report prints: per task its variant table and paired differences (titled with
    the metric's direction), the other tables by name, the claims without their rules, the runs
    not averaged in."""
    from score_exp.report.plots import better

    out = []
    for s in report.sections:
        out.append(f"## {s.task} (test metric: {better(s.higher_is_better)})\n")
        rest = []
        for t in s.tables:
            if any(k in t.title for k in PRINTED):
                out.append(_table(t))
            else:
                rest.append(t.title.removeprefix(f"{s.task}: "))
        if rest:
            out.append(f"also in report.md: {'; '.join(rest)}\n")
    for t in report.claim_tables:
        out.append(_table(t))
    if report.not_ok:
        out.append(f"{len(report.not_ok)} run(s) not averaged in:")
        out += [f"  {status:12s} {path}  {detail}" for path, status, detail in report.not_ok]
        out.append("")
    return "\n".join(out).rstrip("\n")


def _table(t) -> str:
    """A table as Markdown without its note (the notes are in report.md)."""
    md = t.markdown()
    return md[: md.index("\n\n" + t.note)] + "\n" if t.note else md


if __name__ == "__main__":
    sys.exit(main())
