"""Tuning every depth variant with the same budget: Optuna studies (stage 1), re-training (stage 2).

Stage 1 (``score-tune study experiment=tune_esol_mlp depth=score``) drives Optuna through its own
API: one study per depth variant in its study folder (``<tune.dir>/<depth>/optuna.db``, SQLite),
``create_study(load_if_exists=True)`` with a seeded TPE sampler, the search space read from the
experiment's ``tune:`` node (a plain format, :func:`search_space`), ``tune.n_trials`` as the
study's TOTAL budget (Optuna's ``MaxTrialsCallback``: running the same command again finishes what
is left, a finished study runs nothing). Each trial is one ``score-train`` run (its own process)
into ``<study>/trial<N>/`` with the sampled values as overrides, so a trial has every guarantee of
a run: its folder bound to its config, a finished folder skipped, an unfinished one resumed from
``last.ckpt``. A diverged run is recorded as a PRUNED trial (it counts against the budget, TPE
ranks it worst); a run that fails is a FAILED trial and the study goes on. A trial killed with its
study (still RUNNING in the database) is failed and asked again with the same parameters, in the
same folder (it resumes).

Stage 2 (``score-tune retrain PATH... --seeds 5``) reads each study's best trial and re-trains
that configuration over seeds ``0..N-1`` (one ``score-train`` process per run), so the test metrics
of the tuned variants can be compared by ``score-report`` (paired by seed).

A study database is data: its stored values pass :func:`score_exp.runs.safe_load.study_overrides`
before any run uses them, nothing in it is unpickled or instantiated, and a database in an older
Optuna storage schema is refused with one line naming ``optuna storage upgrade`` (never migrated
behind the user's back).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sqlite3
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from score_exp.errors import ConfigError, DataError, ScoreExpError
from score_exp.report.studies import study_experiment
from score_exp.runs.files import atomic_write_json
from score_exp.runs.safe_load import study_overrides

log = logging.getLogger("score_exp.cli.tune")

STUDY_FILE = "optuna.db"
# System attribute of a trial asked again after its study was killed: the number of the trial
# whose run folder it continues (trial<N>/). The key and "retry_history" are those of Optuna's
# RetryFailedTrialCallback, so RetryFailedTrialCallback.retried_trial_number() reads them.
RESUMES = "failed_trial"
# Study user attribute: the sampler seed the study was started with (a resume keeps it).
STUDY_SEED = "score_exp:study_seed"
# How long a SQLite write waits for another thread's transaction (seconds; parallel trials).
SQLITE_TIMEOUT = 60


# --------------------------------------------------------------------------- storage


def storage_url(db: Path, read_only: bool = False) -> str:
    """SQLAlchemy URL of a study file (``read_only``: SQLite's ``mode=ro``, nothing written)."""
    path = db.resolve()
    return f"sqlite:///file:{path}?mode=ro&uri=true" if read_only else f"sqlite:///{path}"


def _head_schema() -> tuple[str, list[str]]:
    """This Optuna's storage schema revision and every revision it knows (alembic's)."""
    import optuna

    mem = optuna.storages.RDBStorage("sqlite:///:memory:")
    return mem.get_head_version(), mem.get_all_versions()


def check_study_file(db: Path) -> None:
    """``db`` is an Optuna SQLite study in this Optuna's schema, checked read-only.

    Raises:
        DataError: one line: a link, not SQLite, not an Optuna study, or an older (the fix:
            ``optuna storage upgrade``) or newer schema.
    """
    import optuna

    if db.is_symlink() or not db.is_file():
        why = "a link" if db.is_symlink() else "not a file"
        raise DataError(f"{db} is not a readable Optuna study ({why})")
    try:
        con = sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True)
        try:
            (version,) = con.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            con.close()
    except (sqlite3.Error, TypeError, ValueError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(f"{db} is not a readable Optuna study ({why})") from None
    head, known = _head_schema()
    if version == head:
        return
    if version in known:
        raise DataError(
            f"{db} is an Optuna study in an older storage schema ({version}; Optuna "
            f"{optuna.__version__} reads {head}): upgrade it once, after a backup, with: "
            f"optuna storage upgrade --storage sqlite:///{db.resolve()}"
        )
    raise DataError(
        f"{db} is an Optuna study from a newer Optuna (schema {version!r}, unknown to Optuna "
        f"{optuna.__version__}): read it with that version"
    )


def open_storage(db: Path, read_only: bool = False):
    """Optuna's RDB storage on ``db`` (checked first: :func:`check_study_file`)."""
    import optuna

    check_study_file(db)
    try:
        return optuna.storages.RDBStorage(
            storage_url(db, read_only),
            engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT}},
        )
    except Exception as e:  # SQLAlchemy's or Optuna's error on a damaged file
        why = " ".join(str(getattr(e, "orig", None) or e).split())[:200]
        raise DataError(f"{db} is not a readable Optuna study ({why})") from None


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class Param:
    """One searched config key: ``choices`` (categorical) or ``low``..``high`` (``log``, ``step``)."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple | None = None

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if (
            isinstance(self.low, int)
            and isinstance(self.high, int)
            and not isinstance(self.step, float)
        ):
            return trial.suggest_int(
                self.key, self.low, self.high, log=self.log, step=self.step or 1
            )
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)


def override_value(v: Any) -> str:
    """A sampled value as Hydra override text (``null``, ``true``; strings quoted)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, str) else str(v)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def search_space(node: Any, where: str = "tune.params") -> list[Param]:
    """The search space of a ``tune.params`` mapping (config key -> spec), checked.

    A spec is ``{low: a, high: b}`` (floats; ``log: true`` for a log-uniform draw, ``step`` for a
    grid; both bounds integers -> an integer parameter) or ``{choices: [v, ...]}``.

    Raises:
        ConfigError: one line naming the key and what is wrong.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, dict) or not node:
        raise ConfigError(f"{where} must map config keys to ranges, e.g. task.module.lr: "
                          "{low: 1.0e-4, high: 3.0e-3, log: true}")  # fmt: skip
    out = []
    for key, spec in node.items():
        at = f"{where}.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{at} must be {{low, high[, log, step]}} or {{choices: [...]}}")
        extra = set(spec) - {"low", "high", "log", "step", "choices"}
        if extra:
            raise ConfigError(f"{at}: unknown field(s) {', '.join(sorted(extra))} "
                              "(valid: low, high, log, step, choices)")  # fmt: skip
        if "choices" in spec:
            choices = spec["choices"]
            ok = (
                isinstance(choices, list)
                and choices
                and all(c is None or isinstance(c, (str, int, float, bool)) for c in choices)
            )
            if not ok or set(spec) != {"choices"}:
                raise ConfigError(f"{at}.choices must be a non-empty list of plain values, alone")
            out.append(Param(key, choices=tuple(choices)))
            continue
        low, high, log_, step = (
            spec.get("low"),
            spec.get("high"),
            spec.get("log", False),
            spec.get("step"),
        )
        if not (_number(low) and _number(high) and low < high):
            raise ConfigError(f"{at} needs numbers low < high (got low={low!r}, high={high!r})")
        if not isinstance(log_, bool) or (log_ and low <= 0):
            raise ConfigError(f"{at}.log must be true or false, and a log range needs low > 0")
        if step is not None and (not _number(step) or step <= 0 or log_):
            raise ConfigError(f"{at}.step must be a number > 0, without log")
        out.append(Param(key, low, high, log_, step))
    return out


# --------------------------------------------------------------------------- stage 1


@dataclass
class StudyPlan:
    """Everything a study needs, from the composed config and the command line."""

    name: str
    folder: Path
    space: list[Param]
    overrides: list[str]  # the fixed score-train overrides of every trial
    n_trials: int
    n_startup_trials: int
    seed: int
    direction: str
    jobs: int = 1

    @property
    def db(self) -> Path:
        return self.folder / STUDY_FILE


def plan_study(overrides: list[str], folder: Path | None = None, seed: int | None = None,
               n_trials: int | None = None, jobs: int = 1) -> StudyPlan:  # fmt: skip
    """Compose ``score-train``'s config for ``overrides`` and read its ``tune:`` node.

    ``tune.*`` overrides change the study (budget, seed, folder) and are not passed to the trials.

    Raises:
        ConfigError: no ``tune:`` node (not a tune_* experiment), a bad search space or budget,
            or a searched key the config does not have.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from score_exp.config import CONFIG_DIR, compose
    from score_exp.errors import check_int

    cfg = compose(*overrides)  # the project's checks: one line for a bad override
    tune = cfg.get("tune")
    if tune is None:
        tunes = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("tune_*.yaml"))
        raise ConfigError("score-tune study needs an experiment with a search space (tune:): "
                          f"experiment={' | '.join(tunes)}")  # fmt: skip
    # The depth preset chosen (Hydra's runtime choices): names the study and its folder.
    depth = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("depth=")), None)
    if depth is None:  # the experiment's default preset
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            depth = hydra_compose("train", overrides=list(overrides), return_hydra_config=True
                                  ).hydra.runtime.choices.depth  # fmt: skip
    space = search_space(tune.get("params"))
    for p in space:
        if OmegaConf.select(cfg, p.key, default=KeyError) is KeyError:
            raise ConfigError(f"tune.params.{p.key}: no such key in the composed config")
    seed = check_int("tune.seed", tune.get("seed", 0) if seed is None else seed, 0)
    n_trials = check_int("tune.n_trials", tune.n_trials if n_trials is None else n_trials, 1)
    direction = tune.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"tune.direction={direction!r}: minimize or maximize")
    fixed = [o for o in overrides if not o.lstrip("+~").startswith("tune.")]
    return StudyPlan(
        name=f"{cfg.experiment_name}_{depth}",
        folder=Path(folder) if folder is not None else Path(str(tune.dir)) / str(depth),
        space=space, overrides=fixed, n_trials=n_trials,
        n_startup_trials=check_int("tune.n_startup_trials", tune.get("n_startup_trials", 10), 0),
        seed=seed, direction=direction, jobs=check_int("--jobs", jobs, 1),
    )  # fmt: skip


def _counted(trial) -> bool:
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def _reasked(trials) -> set[int]:
    """The numbers of the trials already asked again (in a later trial's ``retry_history``)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def _reask_killed(study) -> int:
    """Ask again the parameters of every trial its study's process left unfinished.

    That is a trial still RUNNING (its process was killed: one process runs a study at a time,
    the study folder's lock), which is failed first, or one stopped by Ctrl-C (FAILED, status
    ``interrupted``). The new trial continues its run folder (``RESUMES``). Returns how many
    were asked again.
    """
    from optuna.trial import TrialState, create_trial

    trials = study.get_trials(deepcopy=False)
    asked = _reasked(trials)
    n = 0
    for t in trials:
        stopped = t.state == TrialState.FAIL and t.user_attrs.get("status") == "interrupted"
        if t.number in asked or not (t.state == TrialState.RUNNING or stopped):
            continue
        if t.state == TrialState.RUNNING:
            study.tell(t.number, state=TrialState.FAIL)
        study.add_trial(create_trial(
            state=TrialState.WAITING,
            system_attrs={
                "fixed_params": t.params,
                RESUMES: t.system_attrs.get(RESUMES, t.number),
                "retry_history": [*t.system_attrs.get("retry_history", []), t.number],
            },
        ))  # fmt: skip
        print(f"score-tune: trial {t.number} was interrupted: asked again with its parameters "
              f"(its folder resumes)", file=sys.stderr)  # fmt: skip
        n += 1
    return n


class TrialFailed(ScoreExpError):
    """A trial's run failed (a FAILED trial; the study goes on)."""


def _run_trial(plan: StudyPlan, trial, extra_env: dict[str, str]) -> float:
    """One trial: a ``score-train`` process into ``<study>/trial<N>/``; its best val metric."""
    import optuna

    from score_exp.runs.record import RecordError, RunFolder

    values = {p.key: p.suggest(trial) for p in plan.space}
    number = trial.storage.get_trial_system_attrs(trial._trial_id).get(RESUMES, trial.number)
    folder = plan.folder / f"trial{int(number)}"
    trial.set_user_attr("overrides", plan.overrides)
    trial.set_user_attr("run_dir", folder.name)
    cmd = [sys.executable, "-m", "score_exp.cli.train", *plan.overrides,
           *[f"{k}={override_value(v)}" for k, v in values.items()],
           f"hydra.run.dir='{folder.resolve()}'", "trainer.enable_progress_bar=false"]  # fmt: skip
    proc = subprocess.run(cmd, env={**os.environ, **extra_env}, capture_output=True, text=True)
    try:
        record = RunFolder(folder).read_record()
    except RecordError:
        record = None
    status = record.status if record is not None else "failed"
    trial.set_user_attr("status", status)
    shown = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    if (
        record is not None
        and record.ok
        and record.best_value is not None
        and math.isfinite(record.best_value)
    ):
        print(f"  trial {trial.number}: {record.best_value:.4f} <- {shown}", flush=True)
        return float(record.best_value)
    if status == "interrupted":  # Ctrl-C reached the run: no new trial; this one is asked again
        trial.study.stop()
        raise TrialFailed(f"trial {trial.number}: interrupted ({folder})")
    if status == "diverged":
        print(f"  trial {trial.number}: diverged (pruned) <- {shown}", flush=True)
        raise optuna.TrialPruned(f"the run diverged ({folder})")
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    print(f"  trial {trial.number}: {status} (rc={proc.returncode}) <- {shown}\n{tail}",
          file=sys.stderr, flush=True)  # fmt: skip
    raise TrialFailed(f"trial {trial.number}: the run {status} ({folder}/train.log)")


def run_study(plan: StudyPlan) -> dict:
    """Stage 1: create or resume the study and run what is left of its budget.

    Returns ``{"study", "db", "finished", "total", "ran", "failed", "best"}``.
    """
    import numpy as np
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    from score_exp.runs.lock import RunLock

    plan.folder.mkdir(parents=True, exist_ok=True)  # SQLite makes the file, not its folder
    if plan.db.exists() or plan.db.is_symlink():
        check_study_file(plan.db)  # an old schema or a foreign file: one line, nothing written
    with RunLock(plan.folder):  # one process per study: RUNNING trials at start were killed
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = optuna.storages.RDBStorage(
            storage_url(plan.db), engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT}}
        )
        before = (
            optuna.load_study(study_name=plan.name, storage=storage).get_trials(deepcopy=False)
            if _one_study(storage, plan)
            else []
        )
        # The sampler's seed: the study seed for a new study; on resume, the seed and the number
        # of trials so far, so its random start draws new points instead of replaying the first.
        seed = (
            plan.seed
            if not before
            else int(np.random.SeedSequence([plan.seed, len(before)]).generate_state(1)[0])
        )
        with warnings.catch_warnings():  # constant_liar is "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(
                seed=seed, n_startup_trials=plan.n_startup_trials, constant_liar=plan.jobs > 1
            )
        study = optuna.create_study(study_name=plan.name, storage=storage, sampler=sampler,
                                    direction=plan.direction, load_if_exists=True)  # fmt: skip
        first_seed = study.user_attrs.get(STUDY_SEED, plan.seed)
        if first_seed != plan.seed:
            raise DataError(f"{plan.db}: study {plan.name} was started with seed {first_seed}, "
                            f"not {plan.seed}: give each study seed its own folder (--dir)")  # fmt: skip
        study.set_user_attr(STUDY_SEED, plan.seed)
        _reask_killed(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(_counted(t) for t in trials)
        todo = max(0, plan.n_trials - finished)
        print(f"score-tune: study {plan.name}: {finished} of {plan.n_trials} trials finished, "
              f"{todo} to run ({plan.db})", file=sys.stderr, flush=True)  # fmt: skip
        env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        ran: list[int] = []

        def trial_fn(trial) -> float:
            ran.append(trial.number)
            try:
                return _run_trial(plan, trial, env)
            except KeyboardInterrupt:  # Optuna fails the trial; the next start asks it again
                trial.set_user_attr("status", "interrupted")
                raise

        if todo:
            # Optuna's own line for a failed trial carries a traceback: _run_trial says it in one.
            optuna.logging.set_verbosity(optuna.logging.ERROR)
            study.optimize(
                trial_fn,
                n_trials=todo,  # at most this many in this process; failed ones are not counted
                n_jobs=plan.jobs,  # threads, each waiting on its own score-train process
                callbacks=[
                    MaxTrialsCallback(
                        plan.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)
                    )
                ],
                catch=(TrialFailed,),
                gc_after_trial=False,
            )
        trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if _counted(t)]
    asked = _reasked(trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        b = study.best_trial
        best = {"number": b.number, "value": b.value, "params": b.params}
    return {
        "study": plan.name, "db": str(plan.db), "finished": len(done), "total": plan.n_trials,
        "ran": len(ran),
        "failed": sum(t.state == TrialState.FAIL and t.number not in asked for t in trials),
        "best": best,
    }  # fmt: skip


def _one_study(storage, plan: StudyPlan) -> bool:
    """True when the storage holds this plan's study (False: a new one); another name refused."""
    import optuna

    names = [
        s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
    ]
    if not names:
        return False
    if names != [plan.name]:
        raise DataError(f"{plan.db} holds the study {', '.join(names)}, not {plan.name}: "
                        "give each study its own folder (--dir)")  # fmt: skip
    return True


# --------------------------------------------------------------------------- stage 2


def find_studies(paths: list[Path]) -> list[Path]:
    """Every study database (``optuna.db``) under the given folders."""
    out = []
    for p in paths:
        out += [p] if p.name == STUDY_FILE else sorted(p.rglob(STUDY_FILE))
    return out


def best_trial(db: Path) -> dict:
    """The best finished trial of the one study stored in ``db`` (opened read-only).

    Returns ``{"study", "db", "value", "number", "n_complete", "overrides"}``, where
    ``overrides`` are the ``key=value`` overrides the trial ran with (its sampled parameters and
    the study's fixed overrides: ``score-tune study``'s ``overrides`` user attribute, or, for a
    study of Hydra's Optuna sweeper, one user attribute per fixed override), checked as values
    for the project's keys (:func:`score_exp.runs.safe_load.study_overrides`; ``hydra.*`` left
    out).

    Raises:
        DataError: not a study in this Optuna's schema, no single study or no finished trial.
        ConfigError: a stored override that is not a value of a known key (one line).
    """
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(db, read_only=True)
    try:
        summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
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
    except Exception as e:  # truncated, damaged: SQLAlchemy's or Optuna's error
        why = " ".join(str(getattr(e, "orig", None) or e).split())[:200]
        raise DataError(f"{db} is not a readable Optuna study ({why})") from None
    if not complete:
        raise DataError(
            f"{db}: study {study.study_name!r} has no finished trial with a finite value"
        )
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    best = min(complete, key=lambda t: (sign * t.value, t.number))
    attrs = best.user_attrs
    where = f"{db} (trial {best.number})"
    if "overrides" in attrs:  # score-tune study: the fixed overrides as one list
        fixed = attrs["overrides"]
        if not isinstance(fixed, list) or not all(isinstance(o, str) for o in fixed):
            raise DataError(f"{where}: the stored overrides are not a list of key=value texts")
    else:  # Hydra's Optuna sweeper (score_exp before Optuna 4): one user attribute each
        fixed = [f"{k}={v}" for k, v in attrs.items()]
    sampled = [f"{k}={override_value(v)}" for k, v in best.params.items()]
    # The database is data: values for the project's keys only, never code or paths.
    overrides = study_overrides([*fixed, *sampled], where)
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
    variant = Path(best["db"]).parent.name  # the study's folder: the depth preset
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
    for b in bests:
        b["study_seed"] = study_seed
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
        from score_exp.cli.common import check_output_dir

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
            args.paths, args.out, args.seeds, args.jobs, args.overrides, args.study_seed
        )
    except ScoreExpError as e:
        return _error(str(e))
    print(f"retrained into {args.out}" + (f"; {failed} run(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
