"""``score-report``: the paper's tables and plots from sweep folders.

Reads every ``results.json`` (and ``config.yaml``, ``metrics.csv``) under the given paths and
writes ``report.md``, ``tables.tex``, ``runs.csv`` and PNG/SVG plots. Runs that did not finish
ok (failed, diverged, interrupted, missing) are listed, never averaged in.
"""

from __future__ import annotations

from score_exp.report.build import Report, build_report
from score_exp.report.runs import Run, find_runs, load_run

__all__ = ["Report", "Run", "build_report", "find_runs", "load_run"]
