"""Reading run folders: ``results.json`` + ``config.yaml`` + ``metrics.csv`` -> :class:`Run`.

The report reads run folders only (never task internals): ``results.json`` is the contract,
read through :class:`~score_exp.runs.record.RunRecord`; files are named by
:class:`~score_exp.runs.record.RunFolder`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from score_exp.errors import DataError
from score_exp.runs.files import UnsafeRunFile, read_bytes, yaml_loader
from score_exp.runs.fingerprint import flatten, non_identity
from score_exp.runs.record import (
    CONFIG,
    FIELD_NAMES,
    HYDRA,
    METRICS,
    MOVED_ASIDE,
    RESULTS,
    RecordError,
    RunFolder,
    RunRecord,
    limit,
)

# Config keys that make a run but not a variant: the seeds a comparison pairs over, and the run's
# own folder. Keys that make no run at all (runs.fingerprint.NON_IDENTITY) are not variants either.
NOT_A_VARIANT = ("seed", "task.data.split_seed", "task.data.seed", "run_dir")
# Sub-keys that repeat a run's settings (callbacks read task.monitor, task.early_stopping_...;
# hydra's are its launch): a variant is named by the setting itself.
NOT_A_VARIANT_PREFIX = ("callbacks.", "hydra.")


@dataclass
class Run:
    """One run folder: its record (``results.json``), flattened config and validation curve."""

    path: Path
    record: RunRecord
    config: dict = field(default_factory=dict)  # flattened resolved config
    curve: list[dict] = field(default_factory=list)  # val rows: {"step", "epoch", "value"}

    @property
    def task(self) -> str:
        return self.record.task or self.config.get("task.name", "?")

    @property
    def reference(self) -> str | None:
        """The reference model (``attentivefp``) of a field-standard peer's run, else None."""
        return str(self.record.reference) if self.record.reference else None

    @property
    def status(self) -> str:
        """``results.json``'s status; an ``ok`` run whose test metrics are not all finite is
        ``non-finite``: counted as not ok and listed, never silently left out of a mean."""
        status = self.record.status or "missing"
        return "non-finite" if status == "ok" and self.non_finite() else status

    def non_finite(self) -> str:
        """``test/<metric> = nan, ...`` for the test metrics that are not finite numbers."""
        test = self.record.test or {}
        bad = [
            f"test/{k} = {v}"
            for k, v in test.items()
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
        ]
        return ", ".join(bad)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def headline(self) -> str:
        """Key of the test metric: the task's ``headline``, else rmse or loss."""
        if h := self.config.get("task.headline"):
            return h
        return "rmse" if "rmse" in (self.record.test or {}) else "loss"

    @property
    def higher_is_better(self) -> bool:
        return self.config.get("task.monitor_mode", "min") == "max" or self.headline in (
            "r2",
            "accuracy",
        )

    def test_metric(self) -> float | None:
        v = (self.record.test or {}).get(self.headline)
        return v if v is not None and math.isfinite(v) else None

    def get(self, key: str, default: Any = None) -> Any:
        """A value by flattened key: the record's first (``depth.dt``, ``params``), then the
        config's (``task.model.hidden``)."""
        head, _, rest = key.partition(".")
        node = getattr(self.record, head) if head in FIELD_NAMES else self.record.extra.get(head)
        for part in rest.split(".") if rest else ():
            node = node.get(part) if isinstance(node, dict) else None
        return node if node is not None else self.config.get(key, default)


def read_curve(path: Path, metric: str) -> list[dict]:
    """Validation curve of ``metric`` from ``metrics.csv``: one row per training step.

    Two kinds of rows are not part of the curve: rows logged again after a resume (between the
    last checkpoint and the interruption, same step: the first row per step is kept) and the
    final evaluation at the best checkpoint after training (logged at an epoch in which nothing
    trained: only epochs that hold ``train/*`` rows are kept).
    """
    if not path.exists():
        return []
    rows = list(csv.DictReader(io.StringIO(read_bytes(path, limit(path)).decode(), newline="")))
    trained = {
        row.get("epoch")
        for row in rows
        if any(k.startswith("train/") and v for k, v in row.items())
    }
    seen: dict[int, dict] = {}
    for row in rows:
        raw = row.get(metric)
        if not raw or (trained and row.get("epoch") not in trained):
            continue
        step = int(float(row.get("step") or 0))
        if step not in seen:
            epoch = row.get("epoch")
            seen[step] = {
                "step": step,
                "epoch": int(float(epoch)) if epoch else None,
                "value": float(raw),
            }
    return [seen[s] for s in sorted(seen)]


class UnreadableRun(Exception):
    """A run folder whose files cannot be read; the message names the file and the cause."""


def _read(path: Path, parse) -> Any:
    """``parse(text)`` of a run folder's file: bounded, never through a link (runs.files)."""
    try:
        return parse(read_bytes(path, limit(path)).decode())
    except UnsafeRunFile as e:
        raise UnreadableRun(f"{path.name}: {str(e).replace(str(path), 'the file')}") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableRun(f"{path.name}: {type(e).__name__}: {reason}") from None


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=yaml_loader())  # noqa: S506 (safe, alias-limited)


def load_run(folder: Path) -> Run:
    """Read one run folder.

    Raises:
        UnreadableRun: ``results.json`` is not a JSON object of the expected shape, or
            ``config.yaml`` / ``metrics.csv`` cannot be parsed (the message says which file).
    """
    files = RunFolder(folder)
    try:
        record = RunRecord.load(files.results)
    except RecordError as e:
        raise UnreadableRun(f"{RESULTS}: {e.reason}") from None
    config: dict = {}
    if files.config.exists():
        raw = _read(files.config, _yaml) or {}
        if not isinstance(raw, dict):
            raise UnreadableRun(f"{CONFIG}: a YAML {type(raw).__name__}, not a mapping")
        config = flatten(raw)
    metric = (record.best_val or {}).get("metric") or config.get("task.monitor", "val/loss")
    try:
        curve = read_curve(files.metrics, metric)
    except UnsafeRunFile as e:
        raise UnreadableRun(
            f"{METRICS}: {str(e).replace(str(files.metrics), 'the file')}"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, TypeError, csv.Error) as e:
        raise UnreadableRun(f"{METRICS}: {type(e).__name__}: {e}") from None
    return Run(folder, record, config, curve)


def scan_runs(paths: list[Path]) -> tuple[list[Run], list[tuple[Path, str]]]:
    """Every run folder (a folder holding ``results.json``) under the given paths.

    Returns the readable runs and ``(folder, reason)`` for each folder that could not be read,
    so that one corrupt file never stops a report.
    """
    runs, unreadable = [], []
    for root in paths:
        for res in sorted(Path(root).rglob(RESULTS)):
            if MOVED_ASIDE in res.relative_to(root).parts:  # set aside by overwrite=true
                continue
            try:  # a folder name that is not UTF-8 cannot be printed into a report
                str(res.parent).encode("utf-8")
            except UnicodeEncodeError:
                shown = (
                    str(res.parent).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                )
                unreadable.append((Path(shown), "its name is not UTF-8: rename the folder"))
                continue
            try:
                runs.append(load_run(res.parent))
            except UnreadableRun as e:
                unreadable.append((res.parent, str(e)))
    return runs, unreadable


def find_runs(paths: list[Path]) -> list[Run]:
    """The readable run folders under the given paths (see :func:`scan_runs`)."""
    return scan_runs(paths)[0]


def varied_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between runs (seeds and non-identity keys excluded)."""
    keys: set[str] = set()
    for r in runs:
        keys |= set(r.config)
    out = []
    for k in sorted(keys):
        if k in NOT_A_VARIANT or k.startswith(NOT_A_VARIANT_PREFIX) or non_identity(k):
            continue
        values = {json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}
        if len(values) > 1:
            out.append(k)
    return out


def last_values(path: Path, prefix: str) -> dict[str, float]:
    """The last logged value of every ``metrics.csv`` column starting with ``prefix``."""
    if not path.exists():
        return {}
    out: dict[str, float] = {}
    for row in csv.DictReader(io.StringIO(read_bytes(path, limit(path)).decode(), newline="")):
        for k, v in row.items():
            if k and k.startswith(prefix) and v:
                try:
                    out[k] = float(v)
                except ValueError:  # a malformed row (edited, crafted): not a value
                    continue
    return out


def missing_runs(paths: list[Path]) -> list[Path]:
    """Hydra job folders (``.hydra/`` present) that hold no ``results.json``: crashed or never ran."""
    out = []
    for root in paths:
        for hydra_dir in sorted(Path(root).rglob(HYDRA)):
            folder = hydra_dir.parent
            if MOVED_ASIDE in folder.relative_to(root).parts:  # set aside by overwrite=true
                continue
            if not RunFolder(folder).results.exists():
                out.append(folder)
    return out


def recorded_runs(rec: dict) -> tuple[list[Run], list[Path], list[tuple[Path, str]]]:
    """:class:`Run` objects (and the runs not averaged in) from a recorded ``runs.json``
    (:func:`score_exp.report.snapshot.record`).

    Raises:
        DataError: not the shape :func:`score_exp.report.snapshot.record` writes (one line).
    """
    try:
        runs = [Run(Path(r["path"]), recorded_result(r), dict(r["config"]), list(r["curve"]))
                for r in rec["runs"]]  # fmt: skip
        missing = [Path(m) for m in rec["missing"]]
        unreadable = [(Path(p), str(w)) for p, w in rec["unreadable"]]
    except RecordError as e:
        raise DataError(f"not a recorded runs.json (a run's {e.reason})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"not a recorded runs.json ({type(e).__name__}: {e})") from None
    return runs, missing, unreadable


def recorded_result(run: dict) -> RunRecord:
    """A recorded run's ``results`` (a ``results.json`` as it was read)."""
    return RunRecord.from_dict(run["results"], f"{run['path']}/results")
