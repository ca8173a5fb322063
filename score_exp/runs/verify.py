"""``make verify-results``: re-train a sample of a published snapshot's runs and compare the bits.

A snapshot's ``runs.json`` holds, per run, its ``results.json`` (with the command-line overrides
it was trained with and its numerics mode) and the config keys the report reads. This re-trains
a few runs per experiment and task (the quickest by their recorded wall time, within a budget)
with ``score-train`` and the same overrides into a temporary folder, and compares the test and
best-val metrics with the recorded ones, exactly (float equality: portable runs give the same
bits on any x86-64 CPU). It prints each run and the largest difference, and exits

- 0: every re-trained run equals its record;
- 1: a run differs (or failed): the snapshot does not reproduce here;
- 2: nothing can be verified as asked: a sampled run was not trained with ``numerics=portable``
  (its bits depend on the CPU that made it: a snapshot made in the default mode is refused, the
  runs named), or today's config of a run is not the one it was trained with (the keys named),
  or the snapshot is unreadable.

    python -m score_exp.runs.verify docs/results [--per-task 2] [--budget-s 480] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: A snapshot's record of its runs (score_exp.report.snapshot.RECORD).
RECORD = "runs.json"
#: Recorded config keys that a re-composed config may lack or change without making another run
#: (where the run was written, its name).
_IGNORED = ("experiment_name", "run_dir")


def sample(rec: dict, per_task: int, budget_s: float) -> list[dict]:
    """Up to ``per_task`` ok runs per (experiment, task), quickest first, within ``budget_s`` of
    recorded wall time in all (the budget is the sum of single-thread run times)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rec["runs"]:
        res = r["results"]
        if res.get("status") == "ok" and res.get("overrides") is not None:
            key = (r["config"].get("experiment_name"), res.get("task"))
            groups.setdefault(key, []).append(r)
    picked = []
    for rank in range(per_task):
        for key in sorted(groups, key=str):
            runs = sorted(
                groups[key], key=lambda r: (r["results"].get("wall_time_s") or 0, r["path"])
            )
            if rank < len(runs):
                picked.append(runs[rank])
    out, total = [], 0.0
    for r in picked:  # round-robin order: every task gets its first run before any its second
        t = float(r["results"].get("wall_time_s") or 0)
        if out and total + t > budget_s:
            continue
        out.append(r)
        total += t
    return out


def not_portable(runs: list[dict]) -> list[str]:
    return [
        r["path"] for r in runs if (r["results"].get("numerics") or {}).get("mode") != "portable"
    ]


def config_drift(run: dict) -> str | None:
    """The recorded config keys that today's config (same overrides) gives otherwise, or None."""
    from omegaconf import OmegaConf

    from score_exp.config import compose
    from score_exp.runs.fingerprint import flatten

    try:
        cfg = compose(*run["results"]["overrides"])
        now = flatten(OmegaConf.to_container(cfg, resolve=False))
    except Exception as e:  # a config that no longer composes is drift too
        return f"does not compose today ({type(e).__name__}: {e})"
    diffs = []
    for k, v in run["config"].items():
        if k in _IGNORED or k not in now:
            continue
        w = now[k]
        if isinstance(w, str) and "${" in w:
            continue  # an interpolation: resolved only inside a run
        if w != v:
            diffs.append(f"{k}: {v!r} -> {w!r}")
    return "; ".join(diffs[:6]) or None


def retrain(run: dict, where: Path) -> dict:
    overrides = [o for o in run["results"]["overrides"] if not o.startswith("hydra.run.dir=")]
    cmd = [sys.executable, "-m", "score_exp.cli.train", *overrides, f"hydra.run.dir={where}",
           "trainer.enable_progress_bar=false", "overwrite=true"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    path = where / "results.json"
    if proc.returncode != 0 or not path.is_file():
        return {"status": "failed", "error": proc.stderr.strip().splitlines()[-1:] or ["?"]}
    return json.loads(path.read_text())


def difference(recorded: dict, now: dict) -> float:
    """Largest absolute difference of the test metrics and the best val value (inf: missing)."""
    pairs = [(recorded.get("best_val", {}).get("value"), now.get("best_val", {}).get("value"))]
    pairs += [(v, (now.get("test") or {}).get(k)) for k, v in (recorded.get("test") or {}).items()]
    worst = 0.0
    for a, b in pairs:
        if a is None and b is None:
            continue
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return math.inf if a != b else worst
        worst = max(worst, abs(a - b))
    return worst


def verify(snapshot: Path, per_task: int = 2, budget_s: float = 480, jobs: int = 2,
           check_config: bool = True) -> int:  # fmt: skip
    try:
        rec = json.loads((snapshot / RECORD).read_text())
        runs = sample(rec, per_task, budget_s)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"verify-results: error: {snapshot / RECORD} unreadable ({e})", file=sys.stderr)
        return 2
    if not runs:
        print(
            f"verify-results: error: no ok run with recorded overrides in {snapshot}",
            file=sys.stderr,
        )
        return 2
    if bad := not_portable(runs):
        print(f"verify-results: error: {len(bad)} of the {len(runs)} sampled runs were not trained with "
              "numerics=portable, so their bits depend on the CPU that made them and cannot be "
              "checked here; re-make the snapshot in portable mode (the claims and tuning targets "
              "use it). Not portable: " + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""),
              file=sys.stderr)  # fmt: skip
        return 2
    if check_config:
        drift = [(r["path"], d) for r in runs if (d := config_drift(r))]
        if drift:
            for path, d in drift:
                print(f"verify-results: error: {path}: today's config differs from the recorded "
                      f"one ({d})", file=sys.stderr)  # fmt: skip
            return 2
    est = sum(float(r["results"].get("wall_time_s") or 0) for r in runs) / max(jobs, 1)
    print(f"verify-results: re-training {len(runs)} runs of {snapshot} ({jobs} at a time, about "
          f"{est / 60:.1f} min by their recorded times)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="verify_results_") as tmp:

        def one(i_run):
            i, run = i_run
            now = retrain(run, Path(tmp) / f"run{i}")
            d = difference(run["results"], now) if now.get("status") == "ok" else math.inf
            head = run["results"].get("test", {})
            print(f"  {'ok  ' if d == 0 else 'DIFF'} {run['path']}: max |diff| {d:.3g} "
                  f"(test {json.dumps(head)})" + ("" if now.get("status") == "ok" else
                  f" re-run {now.get('status')}: {now.get('error')}"), flush=True)  # fmt: skip
            return d

        with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
            diffs = list(pool.map(one, enumerate(runs)))
    worst = max(diffs)
    same = sum(d == 0 for d in diffs)
    print(f"verify-results: {same}/{len(diffs)} runs bit-identical; largest difference {worst:.3g}")
    return 0 if worst == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m score_exp.runs.verify", description=__doc__.splitlines()[0]
    )
    p.add_argument("snapshot", type=Path, nargs="?", default=Path("docs/results"))
    p.add_argument("--per-task", type=int, default=2, help="runs per experiment and task")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480,
        help="sum of the sampled runs' recorded wall times, at most (seconds)",
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument(
        "--no-config-check",
        action="store_true",
        help="re-train even where today's config differs from the recorded one",
    )
    args = p.parse_args(argv)
    return verify(args.snapshot, args.per_task, args.budget_s, args.jobs, not args.no_config_check)


if __name__ == "__main__":
    sys.exit(main())
