"""The run record and the run folder: the one owner of ``results.json`` and of every file name.

``results.json`` is the contract between a run and everything that reads runs (the report,
sweeps that skip finished work, ``score-eval``, the GPU check, W&B summaries). It is read and
written only through :class:`RunRecord`, a typed dataclass with a ``schema_version``; a run
folder's files are named only by :class:`RunFolder`:

    folder = RunFolder("outputs/esol_mlp/<run>")
    record = RunRecord.load(folder)          # or RunRecord.load(folder.results)
    record.status, record.test["rmse"]
    record.save(folder)                       # atomic (a reader never sees half a file)

A record without ``schema_version`` (written before it existed) is version 1, today's format; a
record of a newer version, or one that is not a record, is refused in one line
(:class:`RecordError`). No Lightning, no Hydra here: the report and the doors read runs alike.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from score_exp.errors import ConfigError
from score_exp.runs.files import (
    MAX_BYTES,
    MiB,
    UnsafeRunFile,
    atomic_write_json,
    atomic_write_text,
    loads_json,
    read_text,
    refuse_links,
)

#: Version of ``results.json``'s schema that this code writes (and the newest it reads).
SCHEMA_VERSION = 1

# ----------------------------------------------------------------------------- file names

#: The resolved config a run trained (what ``score-eval`` rebuilds).
CONFIG = "config.yaml"
#: The run record (:class:`RunRecord`).
RESULTS = "results.json"
#: The identity a folder is bound to (:mod:`score_exp.runs.fingerprint`).
FINGERPRINT = "fingerprint.json"
#: Lightning's CSV log: one row per logged step.
METRICS = "metrics.csv"
#: The data split (indices, sizes) of the run.
SPLITS = "splits.json"
#: Rows of ``score-eval`` (one per evaluation).
EVAL = "eval.csv"
#: The folder lock (:class:`score_exp.runs.lock.RunLock`).
LOCK = ".lock"
#: Checkpoints: ``best-<epoch>-<step>.ckpt`` and ``last.ckpt`` (the resume point).
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
#: Hydra's record of the job, written by score-train once the folder is claimed.
HYDRA = ".hydra"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")
#: In a sweep folder: every failed job of the sweep (one JSON line each).
FAILURES = "failed_jobs.jsonl"
#: In a run folder's parent: where ``overwrite=true`` moves old runs (score-report skips it).
MOVED_ASIDE = ".overwritten"
#: The time in the name of whatever is moved aside (a run folder, an unreadable checkpoint).
ASIDE_STAMP = "%Y-%m-%d_%H-%M-%S"
#: Where a run writes besides its top level: a symbolic link there is refused.
WRITTEN_SUBDIRS = (CHECKPOINTS, HYDRA)

#: Size limits of the files a reader takes from a run folder (bytes; others: ``MAX_BYTES``).
LIMITS = {
    CONFIG: 4 * MiB,
    FINGERPRINT: 16 * MiB,
    RESULTS: 16 * MiB,
    METRICS: 512 * MiB,
    EVAL: 64 * MiB,
}
#: Size limit of a checkpoint (a GPT-2-sized run with its optimiser state is about 1.5 GB).
CHECKPOINT_LIMIT = 64 << 30


def limit(path: str | os.PathLike) -> int:
    """The size limit of a run folder's file, by its name (:data:`LIMITS`)."""
    return LIMITS.get(Path(path).name, MAX_BYTES)


class RecordError(ConfigError):
    """A ``results.json`` that cannot be read as a run record: one line naming the file.

    Attributes:
        path: the file.
        reason: what is wrong with it, without the path (the report shows the file's name).
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


class RunDirError(ConfigError):
    """The run folder cannot be used as asked (another config, in use, unknown origin)."""


# ----------------------------------------------------------------------------- the record


def _null(when: str = "always") -> Any:
    """A field written as ``null`` too: always, or whenever the field ``when`` is written."""
    return field(default=None, metadata={"null": when})


@dataclass
class RunRecord:
    """What ``results.json`` holds, in the order it is written.

    A field that is None is not written, except where ``null`` means something (an experiment
    without a name; ``nfe: null`` for a reference model that has no depth). Keys this version
    does not know are kept in :attr:`extra` and written back unchanged.
    """

    task: str | None = None
    status: str | None = None  # running, ok, diverged, failed, interrupted
    seed: int | None = None
    depth: dict[str, Any] | None = None  # tasks.results.depth_fields: the paper five + options on
    depth_preset: str | None = _null()
    experiment: str | None = _null()
    run_dir: str | None = None
    versions: dict[str, str | None] | None = None
    git: str | None = _null()
    overrides: list[str] | None = None
    slurm: dict[str, Any] | None = None  # job_id, restart_count
    numerics: dict[str, Any] | None = None  # mode, kernels (ATen, MKL), threads, env, CPU
    params: int | None = None
    nfe: int | None = _null("params")  # null: a reference model (no depth)
    reference: str | None = None  # a field-standard peer (attentivefp)
    time_per_epoch_s: float | None = _null("epochs_timed")
    time_per_step_s: float | None = _null("epochs_timed")
    epochs_timed: int | None = None
    wall_time_s: float | None = None  # over every segment of a resumed run
    segments_wall_time_s: list[float] | None = None
    requeues: int | None = None
    diverged_at: dict[str, Any] | None = None
    best_val: dict[str, Any] | None = None  # metric, value, epoch, step
    best_checkpoint: str | None = None  # relative to the run folder
    val: dict[str, float] | None = None  # at the best checkpoint
    test: dict[str, float] | None = None
    error: str | None = None
    final_steps: int | None = None  # growth
    learned_dt: list[float] | None = None
    connection_weights: list[list[float]] | None = None  # ANCRe
    solver: dict[str, Any] | None = None  # fixed-point solves
    extra: dict[str, Any] = field(default_factory=dict)  # keys unknown to this version
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def best_value(self) -> float | None:
        """The monitored val metric at the best checkpoint (None without one)."""
        return (self.best_val or {}).get("value")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``results.json`` (``schema_version`` first, then the fields)."""
        values = {f.name: getattr(self, f.name) for f in _FIELDS}
        out: dict[str, Any] = {"schema_version": self.schema_version}
        for f in _FIELDS:
            value, when = values[f.name], f.metadata.get("null")
            if value is not None or when == "always" or values.get(when) is not None:
                out[f.name] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str | os.PathLike = RESULTS) -> RunRecord:
        """A record from a parsed ``results.json`` (checked: :class:`RecordError` otherwise)."""
        _check(data, source)
        known = {f.name: data[f.name] for f in _FIELDS if f.name in data}
        extra = {k: v for k, v in data.items() if k not in known and k != "schema_version"}
        return cls(**known, extra=extra, schema_version=data.get("schema_version", 1))

    @classmethod
    def load(cls, path: str | os.PathLike | RunFolder) -> RunRecord:
        """Read a run's ``results.json`` (``path``: a ``.json`` file or a run folder).

        Bounded, never through a link (:mod:`score_exp.runs.files`).

        Raises:
            RecordError: missing, unreadable, not JSON, not a record, or a newer schema.
        """
        path = _results_path(path)
        try:
            text = read_text(path, LIMITS[RESULTS])
        except FileNotFoundError:
            raise RecordError(path, "does not exist") from None
        except UnsafeRunFile as e:
            raise RecordError(path, str(e).replace(str(path), "the file")) from None
        except OSError as e:
            raise RecordError(path, f"{type(e).__name__}: {e.strerror or e}") from None
        try:
            data = loads_json(text)  # depth-limited, numbers within float range
        except ValueError as e:
            reason = str(e).splitlines()[0] if str(e) else ""
            raise RecordError(path, f"{type(e).__name__}: {reason}") from None
        return cls.from_dict(data, path)

    def save(self, path: str | os.PathLike | RunFolder) -> Path:
        """Write ``results.json`` atomically (``path``: a ``.json`` file or a run folder)."""
        return atomic_write_json(_results_path(path), self.to_dict())

    def check_finite(self) -> None:
        """A NaN metric at the end is a diverged run too, whatever the loss said."""
        values = [self.best_value, *(self.test or {}).values()]
        if self.ok and any(v is not None and not math.isfinite(v) for v in values):
            self.status = "diverged"

    def summary(self) -> dict[str, Any]:
        """The headline numbers of a W&B run's summary."""
        return {
            "params": self.params,
            "nfe": self.nfe,
            "status": self.status,
            "time_per_step": self.time_per_step_s,
            "time_per_epoch": self.time_per_epoch_s,
            **{f"test/{k}": v for k, v in (self.test or {}).items()},
            **{f"best_val/{k}": v for k, v in (self.best_val or {}).items()},
        }

    def update(self, **values: Any) -> None:
        """Set fields by name (a name the record does not know is refused)."""
        for key, value in values.items():
            if key not in FIELD_NAMES:
                raise AttributeError(f"RunRecord has no field {key!r}")
            setattr(self, key, value)


_FIELDS = tuple(
    f for f in dataclasses.fields(RunRecord) if f.name not in ("extra", "schema_version")
)
#: The names of the record's fields (``extra`` and ``schema_version`` aside).
FIELD_NAMES = frozenset(f.name for f in _FIELDS)


def _results_path(path: str | os.PathLike | RunFolder) -> Path:
    """The record's file: ``path`` itself when it names a ``.json`` file, else its run folder's."""
    if isinstance(path, RunFolder):
        return path.results
    path = Path(path)
    return path if path.suffix == ".json" else path / RESULTS


# Fields the readers index into: each must be a mapping when present.
_MAPPING_FIELDS = ("depth", "best_val", "val", "test")
_INT, _NUMBER, _TEXT, _FLAG = (int,), (int, float), (str,), (bool,)
# Scalars the readers sort, pair or print, with their types (None, or absent, is allowed; a
# bool is no number).
_SCALARS = {
    "status": _TEXT, "task": _TEXT, "seed": _INT, "params": _INT, "nfe": _NUMBER,
    "depth_preset": _TEXT, "experiment": _TEXT, "wall_time_s": _NUMBER,
    "depth.share": _FLAG, "depth.steps": _INT, "depth.dt": _NUMBER, "depth.update": _TEXT,
    "depth.integrator": _TEXT, "best_val.value": _NUMBER, "best_val.metric": _TEXT,
    "best_val.epoch": _INT, "best_val.step": _INT,
}  # fmt: skip


def _check(data: Any, source: str | os.PathLike) -> None:
    """``data`` is a record of a schema this code reads, with the shapes readers rely on."""
    if not isinstance(data, dict):
        raise RecordError(source, f"a JSON {type(data).__name__}, not an object")
    version = data.get("schema_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RecordError(source, f"schema_version is {version!r}, not a version number")
    if version > SCHEMA_VERSION:
        raise RecordError(
            source,
            f"schema_version {version} is newer than this score_exp reads "
            f"({SCHEMA_VERSION}); update score_exp to read it",
        )
    for key in _MAPPING_FIELDS:
        if key in data and not isinstance(data[key], dict):
            raise RecordError(source, f"{key!r} is a {type(data[key]).__name__}, not an object")
    for key in ("val", "test"):
        for name, v in data.get(key, {}).items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise RecordError(source, f"{key}.{name} is {v!r}, not a number")
    for key, types in _SCALARS.items():
        head, _, tail = key.partition(".")
        v = data.get(head) if not tail else data.get(head, {}).get(tail)
        bad = isinstance(v, bool) and types is not _FLAG
        if (v is not None or (key == "status" and key in data)) and (
            bad or not isinstance(v, types)
        ):
            what = {_INT: "an integer", _NUMBER: "a number", _TEXT: "a string"}.get(
                types, "true or false"
            )
            raise RecordError(source, f"{key} is {v!r}, not {what}")


def coerce(record: RunRecord | dict) -> RunRecord:
    """``record`` as a :class:`RunRecord` (a plain ``results.json`` mapping is checked)."""
    return record if isinstance(record, RunRecord) else RunRecord.from_dict(record)


# ----------------------------------------------------------------------------- the folder


@dataclass(frozen=True)
class RunFolder:
    """A run folder: the path of each of its files, and atomic writes into it.

    Writes go through a temporary file in the folder and ``os.replace``
    (:mod:`score_exp.runs.files`), which replaces a link instead of writing through it;
    :meth:`refuse_links` refuses a folder holding links before a run writes anything.
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config = property(lambda self: self.path / CONFIG, doc="``config.yaml``")
    results = property(lambda self: self.path / RESULTS, doc="``results.json``")
    fingerprint = property(lambda self: self.path / FINGERPRINT, doc="``fingerprint.json``")
    metrics = property(lambda self: self.path / METRICS, doc="``metrics.csv``")
    splits = property(lambda self: self.path / SPLITS, doc="``splits.json``")
    eval_csv = property(lambda self: self.path / EVAL, doc="``eval.csv``")
    lock = property(lambda self: self.path / LOCK, doc="``.lock``")
    checkpoints = property(lambda self: self.path / CHECKPOINTS, doc="``checkpoints/``")
    last_checkpoint = property(
        lambda self: self.path / CHECKPOINTS / LAST_CHECKPOINT, doc="``checkpoints/last.ckpt``"
    )
    hydra = property(lambda self: self.path / HYDRA, doc="``.hydra/``")
    moved_aside = property(
        lambda self: self.path.parent / MOVED_ASIDE, doc="``<parent>/.overwritten/``"
    )

    @staticmethod
    def hydra_file(name: str) -> str:
        """``.hydra/<name>``, relative to the folder (one of :data:`HYDRA_FILES`)."""
        return f"{HYDRA}/{name}"

    def holds_run(self) -> bool:
        """True when the folder holds anything of a run (not just Hydra's log of a failed start)."""
        return any(
            p.exists() for p in (self.fingerprint, self.config, self.results, self.checkpoints)
        )

    def trained(self) -> bool:
        """True once a run wrote anything of a result: results.json, metrics or a checkpoint."""
        ckpts = self.checkpoints
        return (
            self.results.exists()
            or self.metrics.exists()
            or (ckpts.is_dir() and any(ckpts.iterdir()))
        )

    def read_record(self) -> RunRecord | None:
        """The folder's record, None when it has no ``results.json``.

        Raises:
            RecordError: it has one that cannot be read.
        """
        return RunRecord.load(self.results) if self.results.is_file() else None

    def finished_record(self) -> RunRecord | None:
        """The folder's record when it says ``ok``; None otherwise (absent, unreadable, other)."""
        try:
            record = self.read_record()
        except RecordError:
            return None
        return record if record is not None and record.ok else None

    def write_json(self, name: str, obj: Any) -> Path:
        """``<folder>/<name>`` as indented JSON, atomically."""
        return atomic_write_json(self.path / name, obj)

    def write_text(self, name: str, text: str) -> Path:
        """``<folder>/<name>``, atomically (``name`` may be relative, e.g. ``.hydra/x.yaml``)."""
        return atomic_write_text(self.path / name, text)

    def refuse_links(self) -> None:
        """Refuse the folder when it holds a symbolic link where a run writes (its top level,
        ``checkpoints/``, ``.hydra/``): :func:`score_exp.runs.files.refuse_links`."""
        refuse_links(self.path, WRITTEN_SUBDIRS)
