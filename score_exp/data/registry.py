"""Registry of the public files the project uses, each with its canonical URL and sha256.

Resolution order for :func:`fetch`:

1. the cache folder (``$SCORE_DATA_DIR``, default ``data/`` in the checkout);
2. the offline mirror folder ``$SCORE_DATA_MIRROR`` (same relative layout), copied into the cache;
3. a download from the canonical URL (skipped when ``SCORE_DATA_OFFLINE=1``).

Every file is checked against its sha256 before it is used. Anything missing or corrupt raises
:class:`~score_exp.errors.DataError` with one message saying which file, where it looked and
what to set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from score_exp.errors import DataError
from score_exp.runs.files import mkstemp_shared

log = logging.getLogger(__name__)

_CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DataFile:
    """One public file: where it lives relative to the data folder, where it comes from, its hash."""

    key: str
    relpath: str
    url: str
    sha256: str
    size: int
    description: str = ""


REGISTRY: dict[str, DataFile] = {
    f.key: f
    for f in (
        DataFile(
            "esol",
            "esol/delaney-processed.csv",
            "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/delaney-processed.csv",
            "8c06a76f0c6487d29ab0f903e6a7a7139f189ab3c1178f159c8be8964602f189",
            96_699,
            "ESOL (Delaney 2004) aqueous solubility, 1,128 molecules (MoleculeNet)",
        ),
        DataFile(
            "freesolv",
            "freesolv/SAMPL.csv",
            "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/SAMPL.csv",
            "ab5895d914ee87cb563bd7b9611e869527bba45bec6b014d34dc495a0f9dcb72",
            32_060,
            "FreeSolv hydration free energies, 642 molecules (MoleculeNet)",
        ),
        DataFile(
            "lipophilicity",
            "lipophilicity/Lipophilicity.csv",
            "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/Lipophilicity.csv",
            "aed41590cb30609d51d8e08ad3ff06495a76e80e211358801f596b10da69bacd",
            282_606,
            "Lipophilicity (AstraZeneca, ChEMBL) logD at pH 7.4, 4,200 molecules (MoleculeNet)",
        ),
        DataFile(
            "shakespeare",
            "shakespeare/input.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
            1_115_394,
            "Tiny Shakespeare (char-rnn), 1,115,394 characters",
        ),
        DataFile(
            "gpt2_vocab_bpe",
            "gpt2/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
            456_318,
            "GPT-2 BPE merges",
        ),
        DataFile(
            "gpt2_encoder_json",
            "gpt2/encoder.json",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
            1_042_301,
            "GPT-2 BPE vocabulary",
        ),
    )
}


def data_dir() -> Path:
    """The cache folder: ``$SCORE_DATA_DIR``, else ``data/`` in the checkout (or ``~/.cache``)."""
    if env := os.environ.get("SCORE_DATA_DIR"):
        return Path(env).expanduser()
    if (_CHECKOUT / "pyproject.toml").exists():
        return _CHECKOUT / "data"
    return Path.home() / ".cache" / "score_exp"


def cache_dir() -> Path:
    """Where derived artefacts (descriptors, graphs, token memmaps) are cached."""
    return data_dir() / "cache"


#: Size limit of a registered data file (the largest, GPT-2's merges, is under 1 MB).
MAX_DATA_BYTES = 1 << 30


def sha256sum(path: Path) -> str:
    """The file's sha256, read as a regular file only (a FIFO or a device is refused, never
    waited on; a link is not followed).

    Raises:
        DataError: not a regular file, or larger than :data:`MAX_DATA_BYTES` (one line).
    """
    from score_exp.runs.files import UnsafeRunFile, open_regular

    h = hashlib.sha256()
    try:
        with open_regular(path, MAX_DATA_BYTES) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except UnsafeRunFile as e:
        raise DataError(f"data file {e}; remove it or point the path elsewhere") from None
    return h.hexdigest()


def fetch(key: str) -> Path:
    """Return a local, checksum-verified path to the registered file ``key``.

    Raises:
        DataError: unknown key, checksum mismatch, or the file is nowhere to be found.
    """
    if key not in REGISTRY:
        raise DataError(f"unknown data file {key!r}; registered: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[key]
    target = data_dir() / entry.relpath
    looked: list[str] = []

    # 1. cache
    looked.append(f"cache {target}")
    if os.path.lexists(target):
        if sha256sum(target) == entry.sha256:
            return target
        log.warning("cached %s has a wrong checksum; fetching it again", target)
        target.unlink()

    # 2. offline mirror
    mirror = os.environ.get("SCORE_DATA_MIRROR")
    if mirror:
        src = Path(mirror).expanduser() / entry.relpath
        looked.append(f"mirror {src}")
        if os.path.lexists(src):
            got = sha256sum(src)
            if got != entry.sha256:
                raise DataError(
                    f"checksum mismatch for {entry.relpath} in the mirror {src}:\n"
                    f"  expected sha256 {entry.sha256}\n  got      sha256 {got}\n"
                    f"Replace it with the file from {entry.url}."
                )
            try:
                _copy_atomic(src, target)
            except OSError as e:  # a read-only cache folder: one line, not a traceback
                raise cache_not_writable(target, e) from None
            log.info("copied %s from the mirror %s", entry.relpath, src)
            return target
    else:
        looked.append("mirror (SCORE_DATA_MIRROR not set)")

    # 3. download
    if os.environ.get("SCORE_DATA_OFFLINE", "0") not in ("", "0", "false", "False"):
        looked.append("download (skipped: SCORE_DATA_OFFLINE is set)")
    else:
        looked.append(f"download {entry.url}")
        try:
            _download(entry, target)
            return target
        except DataError:
            raise
        except OSError as e:
            if e.filename is not None:  # the cache folder, not the network, failed
                raise cache_not_writable(target, e) from None
            looked[-1] += f" -> failed: {type(e).__name__}: {e}"
        except Exception as e:  # network errors of any kind
            looked[-1] += f" -> failed: {type(e).__name__}: {e}"

    where = "\n  ".join(looked)
    raise DataError(
        f"data file {entry.relpath} ({entry.description}) is missing.\nLooked in:\n  {where}\n"
        f"Fix: set SCORE_DATA_MIRROR to a folder holding {entry.relpath} (e.g. ../shared/data), "
        f"or download {entry.url} to {target}."
    )


def cache_not_writable(path: Path, e: OSError) -> DataError:
    """The one-line error for a cache folder that cannot be written (read-only, full, a file)."""
    return DataError(
        f"cannot write {path} into the data cache folder {data_dir()} "
        f"({e.strerror or e}); make it writable or set SCORE_DATA_DIR to a writable folder"
    )


def _copy_atomic(src: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_shared(target.parent, suffix=".part")  # the umask's mode, not 0600
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(entry: DataFile, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_shared(target.parent, suffix=".part")  # the umask's mode, not 0600
    os.close(fd)
    try:
        log.info("downloading %s", entry.url)
        with urllib.request.urlopen(entry.url, timeout=30) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        got = sha256sum(Path(tmp))
        if got != entry.sha256:
            raise DataError(
                f"checksum mismatch for {entry.relpath} downloaded from {entry.url}:\n"
                f"  expected sha256 {entry.sha256}\n  got      sha256 {got}"
            )
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
