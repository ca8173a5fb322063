"""Files as data: atomic writes, bounded reads, YAML without resolvers, no symbolic links.

Writes are atomic (a temporary file in the same folder, then ``os.replace``): a reader never sees
a half-written result. Files are created with the permissions of the process umask (``0644``
under the usual ``022``), as ``open()`` would create them: a team can share run and data folders.
``tempfile.mkstemp`` alone would leave every result ``0600``.

A run folder may have been crafted, copied from someone else or corrupted. Reading one of its
files never follows a symbolic link (``O_NOFOLLOW``), never reads past a size limit (the caller's:
:data:`score_exp.runs.record.LIMITS` names them per file), never blocks on a FIFO, and YAML is parsed by a safe loader that resolves
nothing and refuses a document whose aliases expand past :data:`MAX_YAML_NODES` nodes (an
"alias bomb"). Before a command writes into a folder, :func:`refuse_links` refuses one that
holds a symbolic link where a run writes (its top level, ``checkpoints/``, ``.hydra/``): a file
is never written through a link to somewhere else. Every refusal is one line
(:class:`UnsafeRunFile`, a :class:`~score_exp.errors.ConfigError`).

This module knows no file name of a run folder (those are :mod:`score_exp.runs.record`'s): it
sits under the record, the data registry and every writer alike.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from score_exp.errors import ConfigError

MiB = 1 << 20
#: Size limit of a read that names none.
MAX_BYTES = 64 * MiB
#: Size limit of a recorded ``runs.json`` that ``score-report`` rebuilds a snapshot from.
RECORDED_RUNS_LIMIT = 256 * MiB
#: Nodes a YAML document may hold once its aliases are expanded (score-train writes none).
MAX_YAML_NODES = 100_000

# ----------------------------------------------------------------------------- atomic writes


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
    :class:`~score_exp.errors.WriteError` (one line naming the file; an ``OSError`` too).
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


# ----------------------------------------------------------------------------- bounded reads


class UnsafeRunFile(ConfigError):
    """A run-folder file that is a link, not a regular file, too large or not plain YAML."""


def open_regular(path: str | os.PathLike, limit: int = MAX_BYTES) -> BinaryIO:
    """A regular file opened for reading without following a link, at most ``limit`` bytes.

    Raises:
        FileNotFoundError: no such file.
        UnsafeRunFile: a link, a folder or FIFO, or larger than ``limit``.
    """
    path = Path(path)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeRunFile(
                f"{path} is a symbolic link: a run folder's files are read only as regular files"
            ) from None
        if e.errno in (errno.EISDIR, errno.ENXIO):
            raise UnsafeRunFile(f"{path} is not a regular file") from None
        if isinstance(e, FileNotFoundError):
            raise
        raise UnsafeRunFile(f"{path} is unreadable: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeRunFile(f"{path} is not a regular file")
        if st.st_size > limit:
            raise UnsafeRunFile(_too_large(path, st.st_size, limit))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, limit: int = MAX_BYTES) -> bytes:
    """The bytes of a regular file, opened without following a link, at most ``limit`` of them.

    Raises:
        FileNotFoundError: no such file (callers say what that means).
        UnsafeRunFile: a link, a folder or FIFO, or larger than ``limit``.
    """
    path = Path(path)
    with open_regular(path, limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew while read
        raise UnsafeRunFile(_too_large(path, len(data), limit))
    return data


def _too_large(path: Path, size: int, limit: int) -> str:
    return f"{path} is {size:,} bytes, over the {limit:,}-byte limit for a run folder's {path.name}"


def read_text(path: str | os.PathLike, limit: int = MAX_BYTES) -> str:
    """:func:`read_bytes` decoded as UTF-8 (one line naming the file otherwise)."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeRunFile(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def yaml_loader() -> type:
    """A safe YAML loader (OmegaConf's scalars) that refuses an alias bomb (:func:`load_yaml`)."""
    return _loader()


@functools.cache
def _loader() -> type:
    from omegaconf._utils import get_yaml_loader

    class BoundedLoader(get_yaml_loader()):  # OmegaConf's safe loader: the same scalars
        def compose_document(self):
            node = super().compose_document()
            _count(node, {}, set(), [0])
            return node

    return BoundedLoader


def _count(node: yaml.Node, done: dict[int, int], open_: set[int], total: list[int]) -> int:
    """Nodes under ``node`` with aliases expanded (each shared node counted once per use)."""
    key = id(node)
    if key in done:
        n = done[key]
    elif key in open_:
        raise yaml.YAMLError("a recursive alias")
    else:
        open_.add(key)
        n = 1
        if isinstance(node, yaml.MappingNode):
            n += sum(_count(k, done, open_, total) + _count(v, done, open_, total) for k, v in node.value)  # fmt: skip
        elif isinstance(node, yaml.SequenceNode):
            n += sum(_count(v, done, open_, total) for v in node.value)
        open_.discard(key)
        done[key] = n
    if n > MAX_YAML_NODES:
        raise yaml.YAMLError(f"more than {MAX_YAML_NODES:,} nodes once its aliases are expanded")
    return n


def load_yaml(path: str | os.PathLike, limit: int = MAX_BYTES) -> Any:
    """A YAML file of a run folder as plain Python values: bounded, no resolvers, alias-limited.

    Raises:
        FileNotFoundError: no such file.
        UnsafeRunFile: as :func:`read_bytes`, or not YAML, or an alias bomb: one line.
    """
    text = read_text(path, limit)
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 (a SafeLoader subclass)
    except (yaml.YAMLError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).strip()
        why = " ".join(why.split())[:300] or type(e).__name__
        raise UnsafeRunFile(f"{path} is not plain YAML: {why}") from None


#: Nesting a JSON document of a run folder may have (score-train writes 4 or 5 levels).
MAX_JSON_DEPTH = 64
_FLOAT_MAX = 1.7976931348623157e308


def loads_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` bounded: at most ``max_depth`` levels, every number within float range.

    ``NaN`` and ``Infinity`` (which Python's ``json.dumps`` writes for a diverged metric) are
    kept; a literal such as ``1e400`` or ``10**400`` written out is refused, as is a list
    nested 100,000 deep (the depth is counted before parsing, so no recursion limit is hit).

    Raises:
        ValueError: not JSON, nested too deeply or a number out of range (one line).
    """
    import json
    import re

    import numpy as np

    if isinstance(text, bytes):
        text = text.decode("utf-8")
    # The nesting, counted over the text with strings blanked out: no recursion, no parse.
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text).encode("utf-8", "replace")
    step = np.zeros(256, dtype=np.int8)
    step[list(b"[{")], step[list(b"]}")] = 1, -1
    levels = np.cumsum(step[np.frombuffer(bare, dtype=np.uint8)], dtype=np.int64)
    if levels.size and int(levels.max()) > max_depth:
        raise ValueError(f"JSON nested more than {max_depth} levels deep")

    def number(s: str) -> float | int:
        value = float(s) if any(c in s for c in ".eE") else int(s)
        if abs(value) > _FLOAT_MAX:  # an int past float range, or a float literal that is inf
            raise ValueError(f"the number {s[:20]}{'...' if len(s) > 20 else ''} is out of range")
        return value

    # Only a text with a 309-digit run or a 3-digit exponent can hold a number past float
    # range: the others are parsed at C speed.
    wide = re.search(rb"\d{309}|[eE]\+?\d{3}", bare) is not None
    try:
        if not wide:
            return json.loads(text)
        return json.loads(text, parse_int=number, parse_float=number)
    except RecursionError:  # pragma: no cover - the depth is counted first
        raise ValueError(f"JSON nested more than {max_depth} levels deep") from None


def read_json(path: str | os.PathLike, limit: int = MAX_BYTES) -> Any:
    """A JSON file of a run folder (bounded: :func:`loads_json`; ``ValueError`` otherwise)."""
    return loads_json(read_text(path, limit))


def refuse_links(run_dir: str | os.PathLike, subdirs: Iterable[str] = ()) -> None:
    """Refuse a run folder holding a symbolic link where a run writes, before writing anything.

    Its top level and ``subdirs`` are checked (:meth:`score_exp.runs.record.RunFolder.refuse_links`
    names a run's; W&B's own links inside ``wandb/`` are W&B's): the lock, ``results.json``, the
    logs, checkpoints and ``eval.csv`` are then never written through a link to a file outside
    the folder.

    Raises:
        UnsafeRunFile: names the link.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for folder in (run_dir, *(run_dir / s for s in subdirs)):
        if not folder.is_dir() or (folder != run_dir and folder.is_symlink()):
            continue  # a linked subfolder is itself an entry of run_dir: refused below
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink():
                    raise UnsafeRunFile(
                        f"{entry.path} is a symbolic link: files of a run folder are never "
                        "written through links; remove it or use another folder"
                    )


def check_move_aside(run_dir: str | os.PathLike, aside: str) -> None:
    """``overwrite=true`` moves only a real folder, into a real ``<parent>/<aside>`` folder.

    Raises:
        UnsafeRunFile: the run folder or ``<parent>/<aside>`` is a symbolic link (a move through
            it would put a folder outside the run's parent).
    """
    run_dir = Path(run_dir)
    for path in (run_dir, run_dir.parent / aside):
        if path.is_symlink():
            raise UnsafeRunFile(
                f"{path} is a symbolic link: overwrite=true moves a run folder only within its "
                "parent; remove the link or use another folder"
            )


def check_output_dir(path: str | os.PathLike, key: str) -> Path:
    """``path`` is a folder this process can write, or one it can create.

    Raises:
        ConfigError: a file stands where the folder (or one of its parents) should be, or the
            nearest existing parent is not writable; the message names ``key`` and the value.
    """
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:  # False under a file, too
        existing = existing.parent
    if not existing.is_dir():
        where = "it is a file" if existing == path else f"{existing} is a file"
        raise ConfigError(f"{key}={path} cannot be a folder: {where}; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "it is" if existing == path else f"{existing} is"
        raise ConfigError(f"{key}={path} is not writable: {what} read-only; choose another {key}")
    return path
