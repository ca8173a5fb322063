"""An Optuna study's database, read as data: its schema checked, its best trial's overrides.

A study file (``<study>/optuna.db``, SQLite) is opened read-only to be read; one in an older
Optuna storage schema is refused with one line naming ``optuna storage upgrade`` (never migrated
behind the user's back), and its stored values pass :func:`score_exp.runs.safe_load.study_overrides`
before any run uses them: nothing in it is unpickled or instantiated.
"""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path
from typing import Any

from score_exp.errors import DataError
from score_exp.runs.safe_load import study_overrides

STUDY_FILE = "optuna.db"
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


def override_value(v: Any) -> str:
    """A sampled value as Hydra override text (``null``, ``true``; strings quoted)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, str) else str(v)


# --------------------------------------------------------------------------- reading a study


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
