"""A run's checkpoints: loaded as data, found relative to the folder, resumed from safely.

Checkpoints load with ``weights_only=True`` (tensors and plain values, never code) from a
regular file of a sane size (:mod:`score_exp.runs.files`). A re-run resumes from ``last.ckpt``
if readable, else from the newest readable checkpoint; an unreadable one is moved aside.
"""

from __future__ import annotations

import datetime
import logging
import os
from pathlib import Path

from score_exp.errors import ConfigError, DataError, ScoreExpError
from score_exp.runs.files import open_regular
from score_exp.runs.record import (
    ASIDE_STAMP,
    CHECKPOINT_LIMIT,
    CONFIG,
    LAST_CHECKPOINT,
    RecordError,
    RunFolder,
)

log = logging.getLogger("score_exp.runs")

#: What a checkpoint's records may inflate to: this many times their bytes on disk, plus
#: :data:`INFLATE_SLACK` (``torch.save`` writes them uncompressed: a ratio of about 1).
INFLATE_RATIO = 4
INFLATE_SLACK = 64 << 20


def load_checkpoint(path: Path) -> dict:
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain values, never code.

    The one place a checkpoint is read (``score-train``'s best-epoch record included).

    Raises:
        DataError: the file is unreadable, truncated or holds anything but plain data
            (a pickled object would run code): one line naming the file.
    """
    import torch

    try:  # a regular file, not a link or a device, of a sane size (runs.files)
        with open_regular(path, CHECKPOINT_LIMIT) as f:
            check_inflation(f, path)  # from the zip directory, before any tensor is built
            return torch.load(f, map_location="cpu", weights_only=True)
    except ScoreExpError:
        raise
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), OSError, EOFError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"checkpoint {path} is unreadable (truncated?) or not plain data: {reason}"
        ) from None


def check_inflation(f, path: Path) -> None:
    """Refuse a checkpoint whose zip directory declares more than it can honestly hold.

    ``torch.save`` stores its records uncompressed, so a record inflates to about its size on
    disk. A record declared larger than :data:`INFLATE_RATIO` times its stored bytes plus
    :data:`INFLATE_SLACK` (a 27 MB file holding a 6 GiB record of deflated zeros), or records
    that together inflate past that bound of the whole file or :data:`CHECKPOINT_LIMIT`, are
    refused from the zip's central directory alone: nothing is inflated, no tensor is built.
    A file that is not a zip (torch's legacy format) is left to ``torch.load``.

    Raises:
        DataError: one line naming the file, the record and the sizes.
    """
    import zipfile

    size = os.fstat(f.fileno()).st_size
    try:
        if not zipfile.is_zipfile(f):
            return
        f.seek(0)
        infos = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # torch.load says what is wrong with it, in one line
    finally:
        f.seek(0)
    total = 0
    for info in infos:
        total += info.file_size
        if info.file_size > info.compress_size * INFLATE_RATIO + INFLATE_SLACK:
            raise DataError(
                f"checkpoint {path}: record {info.filename} inflates to {info.file_size:,} bytes "
                f"from {info.compress_size:,} (a torch checkpoint stores its records as they "
                "are); refused before loading"
            )
    bound = min(size * INFLATE_RATIO + INFLATE_SLACK, CHECKPOINT_LIMIT)
    if total > bound:
        raise DataError(
            f"checkpoint {path} inflates to {total:,} bytes, over the {bound:,}-byte limit for "
            f"a file of {size:,} bytes; refused before loading"
        )


def find_checkpoint(run_dir: Path, checkpoint: str | None = None) -> Path:
    """``checkpoint`` (relative to ``run_dir``), else results.json's best, else ``last.ckpt``.

    Raises:
        ConfigError: the folder or the checkpoint does not exist, or a path leaves the folder.
    """
    folder = RunFolder(run_dir)
    run_dir = folder.path
    if not run_dir.is_dir():
        raise ConfigError(f"run_dir {run_dir} does not exist")
    if not folder.config.is_file():
        raise ConfigError(f"{run_dir} is not a score-train run folder (no {CONFIG})")
    if checkpoint:
        path = run_dir / checkpoint
        if not path.resolve().is_relative_to(run_dir.resolve()):
            raise ConfigError(
                f"checkpoint={checkpoint} leaves the run folder {run_dir}: give a checkpoint "
                "of the run, relative to it (e.g. checkpoints/last.ckpt)"
            )
        if not path.is_file():
            raise ConfigError(f"checkpoint {path} does not exist")
        return path
    candidates = []
    try:
        record = folder.read_record()
    except RecordError:
        record = None
    best = record.best_checkpoint if record is not None else None
    if isinstance(best, str) and best:
        path = (run_dir / best).resolve()
        if not path.is_relative_to(run_dir.resolve()):
            raise ConfigError(f"{folder.results}: best_checkpoint {best!r} leaves the run")
        candidates.append(path)
    candidates.append(folder.last_checkpoint)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(c) for c in candidates)
    raise ConfigError(f"{run_dir} holds no checkpoint (looked for {looked}); train it first")


def set_aside(path: Path, why: str) -> Path:
    """Rename an unreadable checkpoint ``<name>.unreadable-<time>`` (kept, never deleted: it may
    be worth a look), with one warning saying ``why``; returns the new path."""
    stamp = datetime.datetime.now().strftime(ASIDE_STAMP)
    aside = path.with_name(f"{path.name}.unreadable-{stamp}")
    os.rename(path, aside)
    log.warning("%s; moved it to %s", why, aside.name)
    return aside


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a re-run resumes from: ``last.ckpt`` if readable, else the newest other.

    Every candidate is loaded with ``weights_only=True`` first. An unreadable or non-data file
    (truncated by a full disk, corrupted, crafted) is renamed ``<name>.unreadable-<time>`` with a
    warning naming it; the newest readable checkpoint (by global step) is used instead, or
    ``None`` (start afresh).
    """
    folder = RunFolder(run_dir).checkpoints
    if not folder.is_dir():
        return None
    last = folder / LAST_CHECKPOINT
    ordered = ([last] if last.is_file() else []) + sorted(
        (p for p in folder.glob("*.ckpt") if p != last), key=lambda p: p.stat().st_mtime
    )[::-1]
    best: tuple[int, Path] | None = None
    for path in ordered:
        try:
            step = int(load_checkpoint(path).get("global_step", -1))
        except (ScoreExpError, AttributeError, TypeError, ValueError) as e:
            set_aside(path, str(e))
            continue
        if path == last:
            return last
        if best is None or step > best[0]:
            best = (step, path)
    if best is not None:
        log.warning("resuming from %s instead (the newest readable checkpoint)", best[1])
        return best[1]
    return None
