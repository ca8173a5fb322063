"""One process trains in a run folder at a time: ``flock`` on ``<run>/.lock``.

The kernel releases the lock when its process dies (SIGKILL included), so a stale lock of a
dead process is simply taken over; :func:`in_training` only looks (``score-eval`` refuses a run
that is still training).
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from score_exp.runs.record import RunDirError, RunFolder


class RunLock:
    """An exclusive lock on a run folder: ``flock`` on ``<run_dir>/.lock`` (pid and host inside).

    The kernel releases the lock when its process dies (SIGKILL included), so a lock file left
    by a dead process is taken over by the next run. Use as a context manager or call
    :meth:`acquire` / :meth:`release`.
    """

    held = 0  # run folders this process holds (watch_parent waits for them to be released)

    def __init__(self, run_dir: Path, record: bool = True) -> None:
        self.path = RunFolder(run_dir).lock
        self.record = record  # write this process's pid and host into the lock file
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`RunDirError` naming the process that holds it."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a crafted .lock link never gets its target overwritten; O_NONBLOCK: a
        # FIFO never hangs the open (it is refused by the fstat below).
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as e:
            raise RunDirError(_refusal(self.path, e)) from None
        try:
            _check_lock_file(self.path, fd)
        except RunDirError:
            os.close(fd)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.path.parent} is in use: {holder} trains in it; wait for it to end "
                "(a run killed with its lock is taken over automatically)"
            ) from None
        if self.record:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        RunLock.held += 1
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
            RunLock.held -= 1

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _refusal(path: Path, e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return f"{path} is a symbolic link: a run folder's lock is never written through a link; remove it"  # fmt: skip
    if e.errno in (errno.EISDIR, errno.ENXIO):
        return f"{path} is not a regular file; remove it (the lock is a plain file)"
    return f"cannot open the run lock {path}: {e.strerror or e}"


def _check_lock_file(path: Path, fd: int) -> None:
    """The lock must be a regular file with one link: the pid written into it never lands in a
    file outside the run (a hard link) or blocks on a FIFO or a device."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise RunDirError(f"{path} is not a regular file; remove it (the lock is a plain file)")
    if st.st_nlink != 1:
        raise RunDirError(
            f"{path} has {st.st_nlink} hard links: a run folder's lock is never written through "
            "a link to another file; remove it"
        )


def in_training(run_dir: Path) -> str | None:
    """Who trains in ``run_dir`` now (the lock's ``pid ... on host``), or None.

    Only looks: the lock is tested with a shared ``flock`` on a read-only descriptor and let go
    at once, and a folder without a ``.lock`` (never trained, or read-only) is not in training.
    """
    import fcntl

    path = RunFolder(run_dir).lock
    try:  # O_NONBLOCK: a FIFO at .lock never hangs the look
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.EISDIR, errno.ELOOP, errno.ENXIO):
            raise RunDirError(_refusal(path, e)) from None
        return None  # unreadable: nobody this process can see trains in it
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RunDirError(f"{path} is not a regular file; remove it (the lock is a plain file)")
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)  # drops the shared lock too
    return None
