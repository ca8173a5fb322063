"""Claiming a run folder before any work: bound to one config, locked, or refused untouched.

Re-running with the same fingerprint (:mod:`score_exp.runs.fingerprint`) skips a finished run
or resumes an unfinished one; another fingerprint is refused with one line naming the keys that
differ, before anything in the folder is touched. ``overwrite=true`` moves the old folder aside
(``<parent>/.overwritten/<name>-<time>``), never deletes it.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

from score_exp.runs import cluster
from score_exp.runs import fingerprint as ident
from score_exp.runs.files import UnsafeRunFile, check_move_aside
from score_exp.runs.lock import RunLock
from score_exp.runs.record import ASIDE_STAMP, MOVED_ASIDE, RunDirError, RunFolder, RunRecord

log = logging.getLogger("score_exp.runs")


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<parent>/.overwritten/<name>-<time>``; returns the new path."""
    try:
        check_move_aside(run_dir, MOVED_ASIDE)  # never moves anything outside the run's parent
    except UnsafeRunFile as e:
        raise RunDirError(str(e)) from None
    stamp = datetime.datetime.now().strftime(ASIDE_STAMP)
    aside = RunFolder(run_dir).moved_aside
    target = aside / f"{run_dir.name}-{stamp}"
    n = 1
    while target.exists():
        target = aside / f"{run_dir.name}-{stamp}-{n}"
        n += 1
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(run_dir, target)
    except OSError as e:  # a file named .overwritten, a read-only parent: one line
        raise RunDirError(
            f"overwrite=true cannot move {run_dir} aside into {target.parent} "
            f"({e.strerror or e}: {e.filename or target.parent}); rename or remove it"
        ) from None
    return target


def claim_run_dir(
    run_dir: Path,
    resolved: dict,
    *,
    overwrite: bool = False,
    skip_finished: bool = True,
    hydra_files: dict[str, str] | None = None,
) -> tuple[RunRecord | None, RunLock | None]:
    """Bind ``run_dir`` to the resolved config before any work; returns ``(finished, lock)``.

    ``finished`` is the previous record when the run is already done (status ``ok``, same
    fingerprint, ``skip_finished``): nothing is written and no lock is taken. Otherwise the
    folder is locked (the caller keeps ``lock`` until the run ends), ``fingerprint.json`` and
    ``hydra_files`` (``{relative path: text}``, Hydra's ``.hydra/`` record) are written.

    Raises:
        RunDirError: another config made the folder, or another process trains in it; the
            folder is left exactly as it was.
    """
    folder = RunFolder(run_dir)
    run_dir = folder.path
    try:
        RunFolder(
            run_dir
        ).refuse_links()  # nothing of a run is written through a link (the log included)
    except UnsafeRunFile as e:
        raise RunDirError(str(e)) from None  # RunDirError: reported, never logged into the folder
    identity = ident.full_identity(resolved, run_dir)
    if overwrite and folder.holds_run():
        # Never move a folder another process trains in; the lock is held across the move, so
        # no run can start in the folder between the check and the rename.
        with RunLock(run_dir, record=False):
            moved = move_aside(run_dir)
            run_dir.mkdir(parents=True)  # the fresh run's folder (its log file opens in it)
        log.warning("overwrite=true: moved the previous run %s to %s", run_dir, moved)
    old = ident.stored_identity(run_dir) if run_dir.is_dir() else None
    identity_then = identity if old is None else ident.comparable_identity(identity, old)
    same = old is None or ident.fingerprint(old) == ident.fingerprint(identity_then)
    if not same and not folder.trained():
        # A start that failed before training (bad input) left a config but nothing of a
        # result: the corrected command may take the folder over.
        log.warning(
            "%s holds no result of its earlier configuration: re-bound to this one", run_dir
        )
        old, same = None, True
    if not same:
        raise RunDirError(
            ident.changed_data(run_dir, old, identity_then)
            or f"{run_dir} holds a run of another configuration "
            f"({ident.differences(ident.without_inputs(old), ident.without_inputs(identity_then))}); "
            "use another folder, or overwrite=true to move the old run aside"
        )
    if skip_finished and old is not None and (previous := folder.finished_record()) is not None:
        return previous, None
    lock = RunLock(run_dir).acquire()
    try:
        folder.write_json(
            folder.fingerprint.name,
            {"fingerprint": ident.fingerprint(identity), "identity": identity},
        )
        for rel, text in (hydra_files or {}).items():
            folder.write_text(rel, text)
    except BaseException:
        lock.release()
        raise
    return None, lock


def keep_finished(run_dir: Path | RunFolder) -> None:
    """A re-run never downgrades an ``ok`` results.json: one line instead of ``failed``.

    Raises:
        RunDirError: the folder's results.json says ``ok`` (a re-run with skip_finished=false
            that found no best checkpoint, e.g. one deleted by hand).
    """
    folder = run_dir if isinstance(run_dir, RunFolder) else RunFolder(run_dir)
    if folder.finished_record() is not None:
        raise RunDirError(
            f"{folder.path}: the re-run found no best checkpoint; its results.json (status ok) "
            "is kept. Use overwrite=true to train it afresh"
        )


def claim_for_ranks(
    run_dir: Path,
    resolved: dict,
    *,
    overwrite: bool = False,
    skip_finished: bool = True,
    hydra_files: dict[str, str] | None = None,
) -> tuple[dict, RunLock | None]:
    """Rank 0 claims ``run_dir`` (:func:`claim_run_dir`); every rank acts on its one decision.

    Returns ``(decision, lock)``: ``{"action": "skip", "record": <results.json mapping>}`` or
    ``{"action": "run", "resume": <checkpoint path or None>}`` (requeue checkpoints adopted, an
    unreadable ``last.ckpt`` moved aside), and the lock rank 0 holds until the run ends.

    Raises:
        RunDirError: on every rank, when rank 0 refused the folder
            (:func:`score_exp.runs.cluster.decide_together`).
    """
    lock = None

    def decide() -> dict:
        nonlocal lock
        finished, lock = claim_run_dir(
            run_dir,
            resolved,
            overwrite=overwrite,
            skip_finished=skip_finished,
            hydra_files=hydra_files,
        )
        if finished is not None:
            return {"action": "skip", "record": finished.to_dict()}
        try:
            resume = cluster.resume_point(run_dir)  # an unreadable last.ckpt is moved aside
        except BaseException:
            lock.release()
            raise
        return {"action": "run", "resume": str(resume) if resume else None}

    return cluster.decide_together(run_dir, decide), lock
