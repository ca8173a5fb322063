"""Compatibility names: run-folder code lives in :mod:`score_exp.record` and :mod:`score_exp.runs`.

Kept for code and Hydra configs that name ``score_exp.rundir.<name>`` (e.g. a sweep's
``hydra.callbacks.sweep_failures._target_: score_exp.rundir.SweepFailures`` in an older
checkout's configs). New code imports from the modules below.
"""

from score_exp.record import FINGERPRINT, LOCK, MOVED_ASIDE, RESULTS, RunDirError
from score_exp.runs.checkpoints import find_checkpoint, load_checkpoint, resume_checkpoint
from score_exp.runs.claim import claim_run_dir, move_aside
from score_exp.runs.fingerprint import (
    LEGACY,
    NON_IDENTITY,
    comparable_identity,
    differences,
    fingerprint,
    full_identity,
    run_identity,
    stored_identity,
)
from score_exp.runs.lock import RunLock, in_training
from score_exp.runs.safe_load import TRUSTED_ENV, load_run_config, trusted_targets
from score_exp.runs.sweeps import (
    FAILURES,
    PARENT_ENV,
    SWEEP_ENV,
    SweepFailures,
    adopt_jobs,
    report_sweep_failures,
    safe_dirname,
    watch_parent,
)

COSMETIC_KEYS = NON_IDENTITY  # the old name of the non-identity keys

__all__ = [
    "COSMETIC_KEYS", "FAILURES", "FINGERPRINT", "LEGACY", "LOCK", "MOVED_ASIDE", "NON_IDENTITY",
    "PARENT_ENV", "RESULTS", "SWEEP_ENV", "TRUSTED_ENV", "RunDirError", "RunLock",
    "SweepFailures", "adopt_jobs", "claim_run_dir", "comparable_identity", "differences",
    "find_checkpoint", "fingerprint", "full_identity", "in_training", "load_checkpoint",
    "load_run_config", "move_aside", "report_sweep_failures", "resume_checkpoint",
    "run_identity", "safe_dirname", "stored_identity", "trusted_targets", "watch_parent",
]  # fmt: skip
