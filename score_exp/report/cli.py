"""``score-report PATH... [--out DIR] [--target X] [--wandb]``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from score_exp.errors import ScoreExpError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="score-report",
        description="Tables (Markdown, LaTeX, CSV) and plots from score-train run or sweep folders, "
        "paired differences against `stacked` by seed (paired.csv) and the paper's claims with "
        "verdicts (claims.md). Runs that are not ok (failed, diverged, interrupted, missing, "
        "unreadable) are listed, never averaged in.",
        epilog="Example: score-report multirun/esol_gnn_paper   # writes multirun/esol_gnn_paper/report/",
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
        "--wandb",
        action="store_true",
        help="also log tables and plots as a W&B run (offline without a key)",
    )
    p.add_argument("--wandb-project", default="score_exp", help="W&B project (default: score_exp)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from score_exp.report.build import build_report, log_to_wandb

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for p in args.paths:
        if not p.exists():
            print(f"score-report: error: {p} does not exist", file=sys.stderr)
            return 2
    recorded = None
    if len(args.paths) == 1 and args.paths[0].is_file():  # a snapshot's runs.json
        import json

        if args.out is None:
            print("score-report: error: a recorded runs.json needs --out DIR", file=sys.stderr)
            return 2
        try:
            recorded = json.loads(args.paths[0].read_text())
            args.paths = [Path(p) for p in recorded["paths"]]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            print(f"score-report: error: {args.paths[0]}: not a recorded runs.json ({e})", file=sys.stderr)  # fmt: skip
            return 2
    if args.out is None:
        if len(args.paths) != 1:
            print("score-report: error: several PATHs need --out DIR", file=sys.stderr)
            return 2
        args.out = args.paths[0] / "report"
    try:
        report = build_report(args.paths, args.out, target=args.target, recorded=recorded)
    except ScoreExpError as e:
        print(f"score-report: error: {e}", file=sys.stderr)
        return 2
    for t in report.tables:
        print(t.markdown())
    if report.not_ok:
        print(f"{len(report.not_ok)} run(s) not averaged in:")
        for path, status, detail in report.not_ok:
            print(f"  {status:12s} {path}  {detail}")
    if args.wandb:
        where = log_to_wandb(report, project=args.wandb_project)
        print(f"W&B run written to {where}")
    print(f"report: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
