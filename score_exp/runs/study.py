"""Stage 1 of tuning: one Optuna study per depth variant, driven through Optuna's own API.

``score-tune study experiment=tune_esol_mlp depth=score`` (:func:`plan_study`, :func:`run_study`):
one study per depth variant in its study folder (``<tune.dir>/<depth>/optuna.db``, SQLite),
``create_study(load_if_exists=True)`` with a seeded TPE sampler, the search space read from the
experiment's ``tune:`` node (a plain format, :func:`search_space`), ``tune.n_trials`` as the
study's TOTAL budget (Optuna's ``MaxTrialsCallback``: running the same command again finishes what
is left, a finished study runs nothing). Each trial is one ``score-train`` run (its own process)
into ``<study>/trial<N>/`` with the sampled values as overrides, so a trial has every guarantee of
a run: its folder bound to its config, a finished folder skipped, an unfinished one resumed from
``last.ckpt``. A diverged run is recorded as a PRUNED trial (it counts against the budget, TPE
ranks it worst); a run that fails is a FAILED trial and the study goes on. A trial killed with its
study (still RUNNING in the database) or stopped by Ctrl-C is asked again with the same
parameters, in the same folder (it resumes). Trials run in parallel as threads of this process
(``n_jobs``), each waiting on its own ``score-train``: one process writes the SQLite file.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from score_exp.errors import ConfigError, DataError, ScoreExpError
from score_exp.runs.study_db import (
    SQLITE_TIMEOUT,
    STUDY_FILE,
    check_study_file,
    override_value,
    storage_url,
)

# System attribute of a trial asked again after its study was killed: the number of the trial
# whose run folder it continues (trial<N>/). The key and "retry_history" are those of Optuna's
# RetryFailedTrialCallback, so RetryFailedTrialCallback.retried_trial_number() reads them.
RESUMES = "failed_trial"
# Study user attribute: the sampler seed the study was started with (a resume keeps it).
STUDY_SEED = "score_exp:study_seed"


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
