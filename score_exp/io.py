"""Atomic file writes (a reader never sees a half-written result) and the record key helper.

Files are created with the permissions of the process umask (``0644`` under the usual ``022``),
as ``open()`` would create them: a team can share run and data folders. ``tempfile.mkstemp``
alone would leave every result ``0600``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


def mkstemp_shared(dir: str | os.PathLike, prefix: str = "", suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` with the mode ``open()`` would give (``0666 & ~umask``), not ``0600``."""
    fd, tmp = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    os.fchmod(fd, 0o666 & ~umask())
    return fd, tmp


def mkdtemp_shared(dir: str | os.PathLike, prefix: str = "", suffix: str = "") -> str:
    """``tempfile.mkdtemp`` with the mode ``mkdir`` would give (``0777 & ~umask``), not ``0700``."""
    tmp = tempfile.mkdtemp(dir=dir, prefix=prefix, suffix=suffix)
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``.

    The file gets the umask's permissions (``0644`` under ``022``), as a plain ``open()``. The
    file is a new inode: never written in place, so a hard link to the old file keeps the old
    content. A failed write (``ENOSPC``, ``EROFS``...) leaves the old file as it was and raises
    :class:`~score_exp.errors.WriteError` (one line naming the file).
    """
    from score_exp.errors import WriteError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = mkstemp_shared(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only or full folder: the old file is untouched
        raise WriteError(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a new inode: a hard link to the old file keeps its content
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, e) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically; non-JSON values (paths, numpy) become str/float."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"depth": {"dt": 0.5}}`` -> ``{"depth.dt": 0.5}``: the key names of loggers and reports."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
