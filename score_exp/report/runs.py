"""Reading run folders: ``results.json`` + ``config.yaml`` + ``metrics.csv`` -> :class:`Run`.

The report reads run folders only (never task internals): ``results.json`` is the contract.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from score_exp.io import flatten

# Config keys that identify a run but not a variant (seeds, paths, bookkeeping).
NOT_A_VARIANT = ("seed", "task.data.split_seed", "task.data.seed", "run_dir", "experiment_name", "skip_finished",
                 "fail_on_diverge", "trainer.enable_progress_bar", "trainer.default_root_dir")  # fmt: skip
NOT_A_VARIANT_PREFIX = ("logger.", "callbacks.", "hydra.")


@dataclass
class Run:
    """One run folder."""

    path: Path
    results: dict
    config: dict = field(default_factory=dict)  # flattened resolved config
    curve: list[dict] = field(default_factory=list)  # val rows: {"step", "epoch", "value"}

    @property
    def task(self) -> str:
        return self.results.get("task") or self.config.get("task.name", "?")

    @property
    def status(self) -> str:
        return self.results.get("status", "missing")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def headline(self) -> str:
        """Key of the test metric: the task's ``headline``, else rmse or loss."""
        if h := self.config.get("task.headline"):
            return h
        return "rmse" if "rmse" in self.results.get("test", {}) else "loss"

    @property
    def higher_is_better(self) -> bool:
        return self.config.get("task.monitor_mode", "min") == "max" or self.headline in (
            "r2",
            "accuracy",
        )

    def test_metric(self) -> float | None:
        v = self.results.get("test", {}).get(self.headline)
        return v if v is not None and math.isfinite(v) else None

    def get(self, key: str, default: Any = None) -> Any:
        """A value by flattened key: results first (``depth.dt``, ``params``), then the config."""
        node: Any = self.results
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                node = None
                break
            node = node[part]
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
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
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


def load_run(folder: Path) -> Run:
    results = json.loads((folder / "results.json").read_text())
    config: dict = {}
    if (folder / "config.yaml").exists():
        config = flatten(yaml.safe_load((folder / "config.yaml").read_text()) or {})
    metric = results.get("best_val", {}).get("metric") or config.get("task.monitor", "val/loss")
    return Run(folder, results, config, read_curve(folder / "metrics.csv", metric))


def find_runs(paths: list[Path]) -> list[Run]:
    """Every run folder (a folder holding ``results.json``) under the given paths."""
    runs = []
    for root in paths:
        for res in sorted(Path(root).rglob("results.json")):
            if ".overwritten" in res.relative_to(root).parts:  # rundir.MOVED_ASIDE: set aside
                continue
            runs.append(load_run(res.parent))
    return runs


def varied_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value differs between runs (seeds and bookkeeping excluded)."""
    keys: set[str] = set()
    for r in runs:
        keys |= set(r.config)
    out = []
    for k in sorted(keys):
        if k in NOT_A_VARIANT or k.startswith(NOT_A_VARIANT_PREFIX):
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
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k and k.startswith(prefix) and v:
                    out[k] = float(v)
    return out
