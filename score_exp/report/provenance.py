"""A snapshot's provenance (``PROVENANCE.md``): the commands, commits, numerics and machine that
made its runs; which runs may not be published (a dirty tree, default numerics); and the check of
the README's own sentences about verdicts against the snapshot."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path

from score_exp.report.runs import recorded_result

RECORD = "runs.json"
README_START = "<!-- results:start (written by `make results`: docs/results/HEADLINE.md) -->"
README_END = "<!-- results:end -->"


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def machine() -> str:
    """CPU model and cores of this machine (``/proc/cpuinfo`` where there is one)."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} cores ({platform.system()})"  # fmt: skip


def _wall(rec: dict) -> str:
    times = [
        t for r in rec["runs"] if isinstance(t := recorded_result(r).wall_time_s, (int, float))
    ]
    if not times:
        return "unknown"
    return (f"{sum(times) / 60:.1f} min of training summed over {len(times)} runs "
            f"(median {statistics.median(times):.0f} s per run)")  # fmt: skip


def _dirty() -> bool:
    return bool(_git("status", "--porcelain", "--untracked-files=no"))


def unpublishable(rec: dict) -> dict[str, list[str]]:
    """Runs that a published snapshot must not hold: trained on a tree with uncommitted changes
    (``git`` ending in ``-dirty``, or unknown), or outside the portable numerics mode."""
    out: dict[str, list[str]] = {"dirty": [], "not portable": []}
    for r in rec["runs"]:
        res = recorded_result(r)
        if not res.git or str(res.git).endswith("-dirty"):
            out["dirty"].append(r["path"])
        if (res.numerics or {}).get("mode") != "portable":
            out["not portable"].append(r["path"])
    return {k: v for k, v in out.items() if v}


def training_commands(rec: dict) -> list[str]:
    """One line per experiment: its runs and the score-train overrides of one of them."""
    groups: dict[str, list[dict]] = {}
    for r in rec["runs"]:
        groups.setdefault(str(r["config"].get("experiment_name") or "?"), []).append(r)
    lines = []
    for exp, runs in sorted(groups.items()):
        over = recorded_result(runs[0]).overrides or []
        lines.append(f"  - `{exp}`: {len(runs)} runs, e.g. `score-train {' '.join(over)}`")
    return lines


def _numerics(rec: dict) -> str:
    modes: dict[str, int] = {}
    cpus: set[str] = set()
    for r in rec["runs"]:
        n = recorded_result(r).numerics or {}
        mode = n.get("mode", "default (not recorded: made before numerics modes)")
        if n:
            mode += f" ({n.get('cpu_capability')} ATen, MKL {n.get('mkl_branch')}, {n.get('threads')} thread(s))"
            cpus.add(str(n.get("cpu")))
        modes[mode] = modes.get(mode, 0) + 1
    text = "; ".join(f"{k}: {v} runs" for k, v in sorted(modes.items()))
    return text + (f"; CPU of the runs: {', '.join(sorted(cpus))}" if cpus else "")


def provenance(rec: dict, command: str, wall: str | None, dirty: bool | None = None,
               train: str | None = None) -> str:  # fmt: skip
    """PROVENANCE.md; ``dirty``: the tree had uncommitted changes (asked of git when None);
    ``train``: the command that trained the runs (make target)."""
    head = _git("rev-parse", "HEAD") or "unknown"
    dirty = " (with uncommitted changes)" if (_dirty() if dirty is None else dirty) else ""
    commits = sorted({str(recorded_result(r).git or "unknown") for r in rec["runs"]})
    bad = unpublishable(rec)
    marks = [
        f"- **published anyway** (--allow-unpublishable): {len(v)} runs {k}" for k, v in bad.items()
    ]
    return "\n".join([
        "# Provenance of this snapshot", "",
        f"- training command: `{train or 'not given'}`; per experiment:",
        *training_commands(rec),
        f"- numerics: {_numerics(rec)}",
        *marks,
        f"- command: `{command}`",
        f"- commit of the snapshot: `{head}`{dirty}",
        f"- commits the runs were trained at: {', '.join(f'`{c}`' for c in commits) or 'none'}",
        f"- machine: {machine()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- wall time of the sweep: {wall or 'not given'}",
        f"- runs' own wall time: {_wall(rec)}",
        f"- run folders: {', '.join(f'`{p}`' for p in rec['paths'])}", "",
        f"Every table is re-rendered from `{RECORD}` by `tests/test_snapshot.py` and must equal "
        "the committed files.", "",
    ])  # fmt: skip


_VERDICT_WORDS = ("supported", "contradicted", "inconclusive", "mixed")


def check_prose(readme: str, snap: Path) -> list[str]:
    """The README's own sentences about a claim's verdict, checked against the snapshot: a
    sentence outside the generated block that names a claim of ``claims.md`` and a verdict word
    must name a verdict that claim has in the snapshot (per dataset or across datasets)."""
    from score_exp.report.claims import ORDER

    verdicts: dict[str, set[str]] = {}
    for line in (
        (snap / "claims.md").read_text().splitlines() if (snap / "claims.md").is_file() else []
    ):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] in ORDER:
            verdicts.setdefault(cells[0].lower(), set()).update(
                c for c in cells if c in _VERDICT_WORDS
            )
            for part in " ".join(cells).split(";"):  # "esol: supported; freesolv: ..."
                verdicts[cells[0].lower()].update(
                    w for w in _VERDICT_WORDS if part.strip().endswith(w)
                )
    if README_START in readme and README_END in readme:
        a, b = readme.index(README_START), readme.index(README_END)
        readme = readme[:a] + readme[b:]
    problems = []
    for sentence in re.split(r"(?<=[.;])\s+|\n\s*\n", readme):
        flat = " ".join(sentence.split()).lower()
        for claim, seen in verdicts.items():
            short = claim.split(" the ")[0] if claim.startswith("euler") else claim
            if short.lower() not in flat and claim not in flat:
                continue
            said = {w for w in _VERDICT_WORDS if re.search(rf"\b{w}\b", flat)}
            if said and not said & seen:
                problems.append(
                    f'README: "{" ".join(sentence.split())[:120]}" says {"/".join(sorted(said))} '
                    f"about {claim!r}; the snapshot says {'/'.join(sorted(seen))}"
                )
    return problems
