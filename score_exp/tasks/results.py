"""What a run records of itself in ``results.json`` (:class:`~score_exp.runs.record.RunRecord`):
package versions, the git commit, its depth's fields (derived from
:class:`~score_exp.core.DepthSpec`) and the depth as it ended.
"""

from __future__ import annotations

import dataclasses
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = (
    "score_exp", "torch", "lightning", "torchmetrics", "torch_geometric", "rdkit",
    "hydra-core", "omegaconf", "numpy", "tiktoken", "wandb",
)  # fmt: skip
_CHECKOUT = Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """HEAD of the checkout the package runs from, with ``-dirty`` if files changed; None outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_CHECKOUT, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_CHECKOUT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


#: The paper's depth fields: always in ``results.json``'s ``depth``, in this order.
PAPER_DEPTH_FIELDS = ("share", "update", "steps", "dt", "integrator")
#: DepthSpec fields never in ``depth``: settings of an option that is recorded (the ANCRe
#: connection's, growth's, the random initial state's, the solver's, PonderNet's) and activation
#: checkpointing (memory only: the same numbers).
UNRECORDED_DEPTH_FIELDS = frozenset({
    "checkpoint", "ancre_tau", "ancre_init", "ancre_param", "keep_horizon", "init_std",
    "solver_tol", "solver_max_iter", "ponder_lambda_p", "ponder_beta",
})  # fmt: skip


def depth_fields(spec: Any) -> dict[str, Any]:
    """``results.json``'s ``depth`` of a :class:`~score_exp.core.DepthSpec`: the paper's fields,
    then every other field of the spec (in its order) that differs from its default, but
    :data:`UNRECORDED_DEPTH_FIELDS`. A field added to DepthSpec is recorded with no edit here."""
    depth = {k: getattr(spec, k) for k in PAPER_DEPTH_FIELDS}
    for f in dataclasses.fields(spec):
        if f.name in depth or f.name in UNRECORDED_DEPTH_FIELDS:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(spec, f.name) != default:
            depth[f.name] = getattr(spec, f.name)
    return depth


def depth_outcome(depth: Any) -> dict[str, Any]:
    """The record's fields of the depth as it ended (a :class:`~score_exp.core.RecurrentDepth`,
    or None: nothing): its nfe, its step count (growth), learned dt and connection weights
    (ANCRe)."""
    if depth is None:
        return {}
    out: dict[str, Any] = {"nfe": depth.nfe}
    if depth.spec.growth is not None:
        out["final_steps"] = depth.steps
    if depth.spec.learn_dt != "none":
        out["learned_dt"] = [round(float(dt), 6) for dt in depth.dts()]
    if depth.spec.connect == "ancre":
        out["connection_weights"] = [
            [round(v, 6) for v in row] for row in depth.connection_weights().tolist()
        ]
    return out
