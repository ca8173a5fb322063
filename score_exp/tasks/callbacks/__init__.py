"""The run's Lightning callbacks, registered in ``configs/callbacks/default.yaml`` (one module per
concern), and the checkpoint IO.

Every class is importable from here: ``_target_: score_exp.tasks.callbacks.X`` in the configs and
in existing run folders' ``config.yaml`` names these re-exports.
"""

from score_exp.tasks.callbacks.checkpoints import (
    AtomicCheckpointIO,
    LastCheckpoint,
    RNGStateCheckpoint,
)
from score_exp.tasks.callbacks.depth import DepthGrowth, RandomDepth, find_depth
from score_exp.tasks.callbacks.diagnostics import DepthDiagnostics, FixedPointSolves
from score_exp.tasks.callbacks.run_state import DivergenceDetector, RunTimer

__all__ = [
    "AtomicCheckpointIO",
    "DepthDiagnostics",
    "DepthGrowth",
    "DivergenceDetector",
    "FixedPointSolves",
    "LastCheckpoint",
    "RNGStateCheckpoint",
    "RandomDepth",
    "RunTimer",
    "find_depth",
]
