"""``score-tune``: tuning every depth variant with the same budget (stage 1: studies; stage 2: re-training).

Stage 1 (``score-tune study experiment=tune_esol_mlp depth=score``): an Optuna study per depth
variant, resumable, each trial a ``score-train`` run (:mod:`score_exp.runs.study`).

Stage 2 (``score-tune retrain PATH... --seeds 5``) reads each study's best trial
(:mod:`score_exp.runs.study_db`) and re-trains that configuration over seeds ``0..N-1`` (one
``score-train`` process per run), so the test metrics of the tuned variants can be compared by
``score-report`` (paired by seed).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from score_exp.errors import DataError, ScoreExpError
from score_exp.report.studies import study_experiment
from score_exp.runs.files import atomic_write_json
from score_exp.runs.study import plan_study, run_study
from score_exp.runs.study_db import STUDY_FILE, best_trial, find_studies

log = logging.getLogger("score_exp.cli.tune")


def retrain_commands(best: dict, seeds: list[int], out: Path, extra: list[str],
                     study_seed: int | None = None, name: str | None = None) -> list[list[str]]:  # fmt: skip
    """One ``score-train`` command per seed for a study's best configuration.

    The runs' experiment name is ``name`` (studies of different ``tune_*`` experiments compared
    as one: the depth variants and the peer), else the study's experiment with ``tune_`` made
    ``tuned_``. With ``study_seed`` (the sampler seed of the study) it ends in ``_study<k>``, so
    the report makes each study's comparisons apart and pools them
    (:mod:`score_exp.report.studies`).
    """
    own = ("seed=", "experiment_name=", "hydra.run.dir=", "trainer.enable_progress_bar=")
    over = [o for o in best["overrides"] if not o.startswith(own)]
    # The study's folder (the depth preset), made unique over the studies retrained together.
    variant = best.get("variant") or Path(best["db"]).parent.name
    task = next((o.split("=", 1)[1] for o in over if o.startswith("experiment=")), "tuned")
    name = study_experiment(name or task.replace("tune_", "tuned_", 1), study_seed)
    return [
        [
            sys.executable,
            "-m",
            "score_exp.cli.train",
            *over,
            f"seed={s}",
            f"experiment_name={name}",
            f"hydra.run.dir='{out / variant / f'seed={s}'}'",  # quoted: the name holds '='
            "trainer.enable_progress_bar=false",
            *extra,
        ]  # fmt: skip
        for s in seeds
    ]


def study_folders(dbs: list[Path]) -> list[str]:
    """Each study's folder under ``--out``: the name of the folder holding its database, or,
    where two studies share that name (``a/score/optuna.db``, ``b/score/optuna.db``), its
    path below the studies' common folder (``a/score``, ``b/score``): never one folder for
    two studies (the second would be refused as another configuration)."""
    names = [db.resolve().parent.name for db in dbs]
    if len(set(names)) == len(names):
        return names
    parents = [db.resolve().parent for db in dbs]
    common = Path(os.path.commonpath(parents))
    return [str(p.relative_to(common)) if p != common else p.name for p in parents]


def retrain(paths: list[Path], out: Path, seeds: int = 5, jobs: int = 1,
            extra: list[str] | None = None, study_seed: int | None = None,
            name: str | None = None) -> int:  # fmt: skip
    """Stage 2: re-train every study's best configuration over ``seeds`` seeds into ``out``.

    Returns the number of runs that failed (their folders record why).
    """
    dbs = find_studies(paths)
    if not dbs:
        raise DataError(f"no Optuna study ({STUDY_FILE}) under {', '.join(map(str, paths))}")
    bests = [best_trial(db) for db in dbs]
    out.mkdir(parents=True, exist_ok=True)
    for b, variant in zip(bests, study_folders(dbs), strict=True):
        b["study_seed"], b["variant"] = study_seed, variant
    atomic_write_json(out / "best_trials.json", bests)
    for b in bests:
        print(f"{b['study']}: best val {b['value']:.4f} (trial {b['number']}, "
              f"{b['n_complete']} finished) <- {' '.join(b['overrides'])}")  # fmt: skip
    cmds = [
        c
        for b in bests
        for c in retrain_commands(b, list(range(seeds)), out, extra or [], study_seed, name)
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def run(cmd: list[str]) -> int:
        # Each run logs into its folder (train.log); a failed one shows its last lines here.
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        where = next(c for c in cmd if c.startswith("hydra.run.dir=")).split("=", 1)[1]
        status = "ok " if proc.returncode == 0 else f"rc={proc.returncode}"
        print(f"  {status} {where.strip(chr(39))}", flush=True)
        if proc.returncode:
            print("\n".join(proc.stderr.strip().splitlines()[-5:]), file=sys.stderr, flush=True)
        return proc.returncode

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rcs = list(pool.map(run, cmds))
    return sum(rc != 0 for rc in rcs)


# --------------------------------------------------------------------------- the CLI


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="score-tune",
        description="Tuning with the same budget for every depth variant. Stage 1 (study): an "
        "Optuna study per variant on the best val metric, resumable; stage 2 (retrain): each "
        "study's best configuration over N seeds; then `score-report OUT` compares the tuned "
        "variants. A study opens in optuna-dashboard: optuna-dashboard sqlite:///STUDY/optuna.db",
        epilog="Example: score-tune study experiment=tune_esol_mlp_cpu depth=score --jobs 2; "
        "score-tune retrain multirun/tune/esol_mlp --seeds 5 --jobs 2",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "study", help="create or resume one study (tune.n_trials in total) and run its trials",
        description="Create or resume the Optuna study of a tune_* experiment and one depth "
        "variant; each trial is a score-train run in <study>/trial<N>/. Running it again "
        "finishes what is left of the budget.",
    )  # fmt: skip
    s.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="score-train overrides, e.g. experiment=tune_esol_mlp_cpu depth=score "
                   "(tune.* change the study: tune.n_trials=20)")  # fmt: skip
    s.add_argument("--dir", type=Path, default=None,
                   help="the study folder (default: <tune.dir>/<depth>, e.g. multirun/tune/esol_mlp/score)")  # fmt: skip
    s.add_argument(
        "--seed", type=int, default=None, help="the sampler's seed (default tune.seed, 0)"
    )
    s.add_argument("--trials", type=int, default=None,
                   help="the study's total budget (default tune.n_trials)")  # fmt: skip
    s.add_argument("--jobs", type=int, default=1,
                   help="trials in parallel (threads of this process, one score-train each; default 1)")  # fmt: skip
    r = sub.add_parser("retrain", help="re-train the best trial of every study under PATH")
    r.add_argument("paths", nargs="+", type=Path, help="study folders (searched for optuna.db)")
    r.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    r.add_argument("--out", type=Path, help="output folder (default: PATH/retrain for one PATH)")
    r.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    r.add_argument("--study-seed", type=int, default=None,
                   help="the studies' sampler seed: names the runs' experiment tuned_<task>_study<K>, "
                   "so score-report pools the verdicts over study seeds")  # fmt: skip
    r.add_argument("--name", default=None,
                   help="the runs' experiment name (default: each study's tune_<task> as "
                   "tuned_<task>); one name compares studies of different experiments, e.g. the "
                   "depth variants' and the peer's: --name tuned_esol_gnn_cpu")  # fmt: skip
    r.add_argument("overrides", nargs="*", default=[], metavar="-- KEY=VALUE",
                   help="extra score-train overrides after `--` (e.g. trainer=gpu)")  # fmt: skip
    return p.parse_known_args(argv)


def _error(msg: str, code: int = 2) -> int:
    print(f"score-tune: error: {msg}", file=sys.stderr)
    return code


def _study_main(args: argparse.Namespace) -> int:
    bad = next((o for o in args.overrides if "=" not in o), None)
    if bad is not None:
        return _error(
            f"{bad!r} is not a KEY=VALUE override (score-tune study experiment=tune_... depth=...)"
        )
    if args.jobs < 1:
        return _error("--jobs must be >= 1")
    try:
        plan = plan_study(args.overrides, args.dir, args.seed, args.trials, args.jobs)
        from score_exp.runs.files import check_output_dir

        check_output_dir(plan.folder, "--dir")
        out = run_study(plan)
    except ScoreExpError as e:
        return _error(str(e))
    best = out["best"]
    line = f"score-tune: study {out['study']}: {out['finished']} of {out['total']} trials finished"
    if out["failed"]:
        line += f", {out['failed']} failed (run it again to replace them)"
    if best is not None:
        line += f"; best val {best['value']:.4f} (trial {best['number']})"
    print(line + f"\n  dashboard: optuna-dashboard sqlite:///{Path(out['db']).resolve()}")
    return 0 if out["finished"] >= out["total"] else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else list(argv)
    # retrain: everything after `--` is a score-train override, never a study PATH (argparse
    # would give the first of them to PATH..., whose nargs="+" is greedy).
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args, rest = parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    # study: KEY=VALUE overrides may also follow the options (make tune-cpu ARGS=...).
    stray = [a for a in rest if a.startswith("-") or args.command != "study"]
    if stray:
        return _error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *rest, *extra]
    if args.command == "study":
        return _study_main(args)
    if args.seeds < 1 or args.jobs < 1:
        return _error("--seeds and --jobs must be >= 1")
    missing = next((p for p in args.paths if not p.exists()), None)
    if missing is not None:
        hint = " (score-train overrides go after `--`)" if "=" in str(missing) else ""
        return _error(f"{missing} does not exist{hint}")
    if args.out is None:
        if len(args.paths) != 1:
            return _error("several PATHs need --out DIR")
        args.out = args.paths[0] / "retrain"
    try:
        failed = retrain(
            args.paths,
            args.out,
            args.seeds,
            args.jobs,
            args.overrides,
            args.study_seed,
            args.name,
        )
    except ScoreExpError as e:
        return _error(str(e))
    print(f"retrained into {args.out}" + (f"; {failed} run(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
