"""``make results-page`` (``python -m score_exp.report.rerender``): a committed results snapshot
re-rendered by the current report code from its own ``runs.json`` files.

No run folder is read and nothing is trained: the tables, plots, ``HEADLINE.md`` and ``index.html``
of ``docs/results/`` (and of each ``tune_<task>/``) are what :func:`score_exp.report.build.build_report`
makes of the recorded numbers, as :func:`score_exp.report.snapshot.check` re-renders them. For when
the report's code changed (a new plot, the page) and the runs are gone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from score_exp.errors import DataError, ScoreExpError
from score_exp.report import literature
from score_exp.report.build import build_report
from score_exp.report.snapshot import (
    ALLOWED,
    HEADLINE,
    LITERATURE,
    PROVENANCE,
    RECORD,
    _dirty,
    _git,
    headline,
    splice_headlines,
    write_page,
)
from score_exp.runs.files import atomic_write_text

RERENDERED = "- re-rendered from `runs.json`"


def rerender(snap: Path) -> None:
    """Re-render a snapshot (and its ``tune_*`` folders) from its own ``runs.json`` files: the
    tables, plots, headline and page the current code makes of the recorded numbers. No run is
    read or trained; PROVENANCE.md keeps the training's provenance and says when it was
    re-rendered."""
    if not (snap / RECORD).is_file():
        raise DataError(f"{snap}: no {RECORD} to re-render from")
    head = _git("rev-parse", "HEAD") or "unknown"
    dirty = " (with uncommitted changes)" if _dirty() else ""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    reports = {}
    for d in [snap, *sorted(p for p in snap.glob("tune_*") if p.is_dir())]:
        rec = json.loads((d / RECORD).read_text())
        for p in d.iterdir():  # what the report writes; runs.json and PROVENANCE.md stay
            if p.is_file() and p.name not in (RECORD, PROVENANCE) and p.suffix in ALLOWED:
                p.unlink()
        report = build_report([Path(p) for p in rec["paths"]], d, recorded=rec)
        for svg in d.glob("*.svg"):
            svg.unlink()
        atomic_write_text(d / HEADLINE, headline(report))
        prov = d / PROVENANCE
        if prov.is_file():
            lines = [x for x in prov.read_text().splitlines() if not x.startswith(RERENDERED)]
            at = next((i for i, x in enumerate(lines) if not x.startswith("- ")
                       and i > 0 and lines[i - 1].startswith("- ")), len(lines))  # fmt: skip
            lines.insert(at, f"{RERENDERED} at commit `{head}`{dirty}, {when} (tables, plots, "
                             "page; no run re-trained): `make results-page`")  # fmt: skip
            atomic_write_text(prov, "\n".join(lines) + "\n")
        reports["" if d == snap else d.name] = report
    # the published RMSEs beside ours
    atomic_write_text(snap / LITERATURE, literature.markdown(reports[""].runs))
    write_page(snap, reports)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m score_exp.report.rerender",
        description="Re-render a results snapshot (tables, plots, HEADLINE.md, index.html) from its "
        "own runs.json files with the current code; no run folder needed. Then run "
        "`python -m score_exp.report.snapshot --check`.",
    )
    p.add_argument("--out", type=Path, default=Path("docs/results"), help="the snapshot folder")
    p.add_argument("--readme", type=Path, help="splice HEADLINE.md's short form into this README")
    p.add_argument("--page", type=Path, help="splice all of HEADLINE.md into this page")
    args = p.parse_args(argv)
    try:
        rerender(args.out)
        splice_headlines(args.out, args.readme, args.page)
    except ScoreExpError as e:
        print(f"rerender: error: {e}", file=sys.stderr)
        return 2
    print(f"results snapshot re-rendered: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
