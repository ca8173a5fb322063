"""Runs grouped into variants: the runs of one task that share every varied config key but the
seed, labelled readably, and the mean ± std over them (:func:`stat`)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

from score_exp.report.runs import Run, varied_keys

# Keys that vary between variants but never name one (seeds and what follows from the preset).
SEED_KEYS = ("seed",)


@dataclass
class Variant:
    """The runs of one task that share every varied config key except the seed."""

    task: str
    key: tuple  # ((config key, value), ...) over the task's varied keys
    label: str
    runs: list[Run] = field(default_factory=list)
    # A field-standard peer (results.json ``reference``): a row beside the depth variants, never
    # a depth variant or a baseline itself.
    reference: str | None = None

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    def values(self) -> list[float]:
        return [v for r in self.ok_runs if (v := r.test_metric()) is not None]

    def mean_of(self, key: str) -> float | None:
        xs = [float(v) for r in self.ok_runs if isinstance(v := r.get(key), (int, float))]
        return statistics.fmean(xs) if xs else None

    def get(self, key: str):
        return dict(self.key).get(key, self.runs[0].get(key) if self.runs else None)


@dataclass
class Stat:
    mean: float | None
    std: float | None
    n: int

    def fmt(self, digits: int = 4) -> str:
        if self.mean is None:
            return "n/a"
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(xs: list[float]) -> Stat:
    """Mean and sample standard deviation (``None`` for fewer than two values)."""
    if not xs:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))


def by_task(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs grouped by experiment and task: ``"task"`` or ``"experiment / task"``.

    Different experiments (a depth sweep and a dt sweep of the same task, say) answer different
    questions, so their runs are never pooled into one table.
    """
    out: dict[str, list[Run]] = {}
    for r in runs:
        exp = r.get("experiment_name") or r.record.experiment
        name = r.task if not exp or exp == r.task else f"{exp} / {r.task}"
        out.setdefault(name, []).append(r)
    return out


def value_key(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def variants(runs: list[Run]) -> list[Variant]:
    """Group one task's runs by every varied config key but the seed; label them readably.

    The label starts with the depth preset when presets vary; config keys a preset already fixes
    (``depth.share`` under ``stacked``...) are left out of the label, other varied keys are shown
    as ``key=value``. Runs of a reference model (a field-standard peer, :attr:`Run.reference`)
    come last, one :class:`Variant` per reference, labelled ``<name> (reference)``; their config
    keys never label a depth variant.
    """
    refs = [r for r in runs if r.reference]
    out = _depth_variants([r for r in runs if not r.reference])
    for name in sorted({r.reference for r in refs}):
        rs = [r for r in refs if r.reference == name]
        # One variant per setting of the peer: its own varied keys, never the (unused) depth.
        keys = [k for k in varied_keys(rs) if k not in SEED_KEYS and not k.startswith("depth")]
        groups: dict[str, Variant] = {}
        for r in rs:
            key = (("reference", name), *((k, r.get(k)) for k in keys))
            groups.setdefault(value_key(key), Variant(r.task, key, "", [], name)).runs.append(r)
        for v in sorted(groups.values(), key=lambda v: _sort_key(v.key[1:])):
            extra = [f"{_short(k)}={_fmt_value(val)}" for k, val in v.key[1:]]
            v.label = " ".join([f"{name} (reference)", *extra])
            out.append(v)
    return out


def _depth_variants(runs: list[Run]) -> list[Variant]:
    if not runs:
        return []
    keys = [k for k in varied_keys(runs) if k not in SEED_KEYS]
    # The preset first: rows sort by preset name, then by the other keys (numbers numerically).
    keys.sort(key=lambda k: k != "depth_preset")
    groups: dict[str, Variant] = {}
    for r in runs:
        key = tuple((k, r.get(k)) for k in keys)
        groups.setdefault(value_key(key), Variant(r.task, key, "", [])).runs.append(r)
    shown = [k for k in keys if k != "depth_preset" and not _fixed_by_preset(k, runs)]
    for v in groups.values():
        d = dict(v.key)
        parts = [str(d["depth_preset"])] if "depth_preset" in d else []
        parts += [f"{_short(k)}={_fmt_value(d[k])}" for k in shown]
        v.label = " ".join(parts) or (str(v.runs[0].get("depth_preset")) or "all")
    return sorted(groups.values(), key=lambda v: _sort_key(v.key))


def _fixed_by_preset(key: str, runs: list[Run]) -> bool:
    presets: dict[str, set[str]] = {}
    for r in runs:
        presets.setdefault(str(r.get("depth_preset")), set()).add(value_key(r.get(key)))
    return len(presets) > 1 and all(len(vals) == 1 for vals in presets.values())


def _short(key: str) -> str:
    return key.removeprefix("task.").removeprefix("model.")


def _fmt_value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _sort_key(key: tuple) -> tuple:
    # Numbers sort numerically, None first, everything else as text.
    return tuple((0, 0.0, "") if v is None else (1, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (2, 0.0, str(v)) for _, v in key)  # fmt: skip
