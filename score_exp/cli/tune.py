"""Tuning every depth variant with the same budget: Optuna studies (stage 1) and re-training (stage 2).

Stage 1 is a Hydra multirun with Hydra's Optuna sweeper (``experiment=tune_*``, one study per
depth variant, objective = best val metric). ``StudySweeper`` (``hydra_plugins/score_exp_sweeper``)
is that plugin's sweeper with what a long study needs, implemented here by
:class:`ResumableStudy`: its SQLite file inside the sweep folder, ``n_trials`` as the study's
total budget (a re-run finishes what is left), and a trial killed mid-run asked again. A
diverged trial returns ``inf`` (score-train's objective) and is kept as the worst trial.

Stage 2 (``score-tune retrain PATH... --seeds 5``) reads each study's best trial
and re-trains that configuration over seeds ``0..N-1`` by calling ``score-train`` once per seed
(one process per run), so the test metrics of the tuned variants can be compared by
``score-report`` (paired by seed).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

from score_exp.errors import DataError, ScoreExpError
from score_exp.report.studies import study_experiment
from score_exp.runs.files import atomic_write_json
from score_exp.runs.safe_load import study_overrides

log = logging.getLogger("hydra_plugins.score_exp_sweeper")  # shown with the sweeper's [HYDRA] lines

STUDY_FILE = "optuna.db"
# System attribute of a trial killed with its study (failed, asked again, not counted).
INTERRUPTED = "score_exp:interrupted"


class ResumableStudy(OptunaSweeperImpl):
    """The Optuna sweeper's study loop, resumable (used by ``hydra_plugins.score_exp_sweeper``)."""

    def sweep(self, arguments: list[str]) -> None:
        import numpy as np
        import optuna
        from optuna.trial import TrialState

        # SQLite creates the database file but not its folder.
        Path(self.sweep_dir).mkdir(parents=True, exist_ok=True)
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            directions=self._get_directions(),
            load_if_exists=True,
        )
        trials = study.get_trials(deepcopy=False)
        finished = [
            t for t in trials if t.state.is_finished() and not t.system_attrs.get(INTERRUPTED)
        ]
        # A trial still RUNNING in the database was killed with the study (one study runs in one
        # process at a time): mark it failed and ask its parameters again, so its run folder
        # resumes from last.ckpt. It does not count against the budget.
        for t in trials:
            if t.state == TrialState.RUNNING:
                study._storage.set_trial_system_attr(t._trial_id, INTERRUPTED, True)
                study._storage.set_trial_state(t._trial_id, TrialState.FAIL)
                study.enqueue_trial(t.params)
                log.warning("trial %d was interrupted: asking it again (%s)", t.number, t.params)
        if trials:
            # The seeded sampler would replay the random start of the first run: reseed it from
            # the seed and the number of trials so far (deterministic, and new points).
            seed = self.config.hydra.sweeper.sampler.get("seed")
            if seed is not None:
                rng = np.random.RandomState(int(seed) + len(trials))
                # optuna 2.10's TPESampler and its random start sampler (pinned in pyproject).
                for s in (self.sampler, getattr(self.sampler, "_random_sampler", None)):
                    if s is not None and hasattr(s, "_rng"):
                        s._rng = np.random.RandomState(rng.randint(2**31 - 1))
        total = self.n_trials
        self.n_trials = max(0, total - len(finished))
        log.info(
            "study %s: %d of %d trials finished, %d to run (storage %s)",
            study.study_name, len(finished), total, self.n_trials, self.storage,
        )  # fmt: skip
        super().sweep(arguments)


# --------------------------------------------------------------------------- stage 2


def find_studies(paths: list[Path]) -> list[Path]:
    """Every study database (``optuna.db``) under the given folders."""
    out = []
    for p in paths:
        out += [p] if p.name == STUDY_FILE else sorted(p.rglob(STUDY_FILE))
    return out


def best_trial(db: Path) -> dict:
    """The best finished trial of the one study stored in ``db``.

    Returns ``{"study", "db", "value", "number", "n_complete", "overrides"}``, where
    ``overrides`` are the ``key=value`` overrides the trial ran with (its sampled parameters and
    the study's fixed overrides, as Hydra's Optuna sweeper passed them), checked as values for the
    project's keys (:func:`score_exp.runs.safe_load.study_overrides`; ``hydra.*`` left out).

    Raises:
        DataError: no single study or no finished trial.
        ConfigError: a stored override that is not a value of a known key (one line).
    """
    import optuna
    from optuna.trial import TrialState

    storage = f"sqlite:///{db.resolve()}"
    try:
        summaries = optuna.get_all_study_summaries(storage)
        if len(summaries) != 1:
            raise DataError(f"{db}: expected one study, found {len(summaries)}")
        study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
        complete = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)
        ]
    except DataError:
        raise
    except Exception as e:  # not SQLite, truncated, another schema: SQLAlchemy's or Optuna's error
        why = " ".join(str(getattr(e, "orig", None) or e).split())[:200]
        raise DataError(f"{db} is not a readable Optuna study ({why})") from None
    if not complete:
        raise DataError(
            f"{db}: study {study.study_name!r} has no finished trial with a finite value"
        )
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    best = min(complete, key=lambda t: (sign * t.value, t.number))
    params = {**best.params, **best.user_attrs}  # user_attrs: the fixed overrides
    # The database is data: values for the project's keys only, never code or paths.
    overrides = study_overrides(
        [f"{k}={v}" for k, v in params.items()], f"{db} (trial {best.number})"
    )
    return {
        "study": study.study_name,
        "db": str(db),
        "value": best.value,
        "number": best.number,
        "n_complete": len(complete),
        "overrides": overrides,
    }


def retrain_commands(best: dict, seeds: list[int], out: Path, extra: list[str],
                     study_seed: int | None = None) -> list[list[str]]:  # fmt: skip
    """One ``score-train`` command per seed for a study's best configuration.

    With ``study_seed`` (the sampler seed of the study) the runs' experiment name is
    ``tuned_<task>_study<k>``, so the report makes each study's comparisons apart and pools them
    (:mod:`score_exp.report.studies`).
    """
    own = ("seed=", "experiment_name=", "hydra.run.dir=", "trainer.enable_progress_bar=")
    over = [o for o in best["overrides"] if not o.startswith(own)]
    # The study's folder (the depth preset), made unique over the studies retrained together.
    variant = best.get("variant") or Path(best["db"]).parent.name
    task = next((o.split("=", 1)[1] for o in over if o.startswith("experiment=")), "tuned")
    name = study_experiment(task.replace("tune_", "tuned_", 1), study_seed)
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
            extra: list[str] | None = None, study_seed: int | None = None) -> int:  # fmt: skip
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
        for c in retrain_commands(b, list(range(seeds)), out, extra or [], study_seed)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="score-tune",
        description="Stage 2 of tuning: re-train each Optuna study's best configuration "
        "(best val metric) over N seeds; then `score-report OUT` compares the tuned variants.",
        epilog="Example: score-tune retrain multirun/tune/esol_mlp --seeds 5 "
        "--jobs 2   # -> multirun/tune/esol_mlp/retrain/<variant>/seed=<s>/",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("retrain", help="re-train the best trial of every study under PATH")
    r.add_argument("paths", nargs="+", type=Path, help="study folders (searched for optuna.db)")
    r.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    r.add_argument("--out", type=Path, help="output folder (default: PATH/retrain for one PATH)")
    r.add_argument("--jobs", type=int, default=1, help="runs in parallel (default 1)")
    r.add_argument("--study-seed", type=int, default=None,
                   help="the studies' sampler seed: names the runs' experiment tuned_<task>_study<K>, "
                   "so score-report pools the verdicts over study seeds")  # fmt: skip
    r.add_argument("overrides", nargs="*", default=[], metavar="-- KEY=VALUE",
                   help="extra score-train overrides after `--` (e.g. trainer=gpu)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after `--` is a score-train override, never a study PATH (argparse would give
    # the first of them to PATH..., whose nargs="+" is greedy).
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.overrides = [*args.overrides, *extra]
    if args.seeds < 1 or args.jobs < 1:
        print("score-tune: error: --seeds and --jobs must be >= 1", file=sys.stderr)
        return 2
    missing = next((p for p in args.paths if not p.exists()), None)
    if missing is not None:
        hint = " (score-train overrides go after `--`)" if "=" in str(missing) else ""
        print(f"score-tune: error: {missing} does not exist{hint}", file=sys.stderr)
        return 2
    if args.out is None:
        if len(args.paths) != 1:
            print("score-tune: error: several PATHs need --out DIR", file=sys.stderr)
            return 2
        args.out = args.paths[0] / "retrain"
    try:
        failed = retrain(
            args.paths, args.out, args.seeds, args.jobs, args.overrides, args.study_seed
        )
    except ScoreExpError as e:
        print(f"score-tune: error: {e}", file=sys.stderr)
        return 2
    print(f"retrained into {args.out}" + (f"; {failed} run(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
