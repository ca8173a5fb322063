"""Molecules from a CSV of SMILES and targets: reading, splits, RDKit descriptors.

Plain NumPy/RDKit: no torch, no Lightning. The Lightning data modules in
:mod:`score_exp.tasks.molecules` build on these functions.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from score_exp.errors import ConfigError, DataError, check_choice

log = logging.getLogger(__name__)

#: Heavy atoms a molecule may have (the largest of ESOL, FreeSolv and Lipophilicity has 115):
#: RDKit's descriptors grow with the fourth power of the size (100 atoms: 0.1 s, 300: 27 s),
#: so a larger molecule is skipped and counted, as an invalid SMILES is.
MAX_ATOMS = 150
#: A SMILES longer than this is skipped before RDKit parses it.
MAX_SMILES_CHARS = 20 * MAX_ATOMS
#: Size limit of a molecule CSV (bytes).
MAX_CSV_BYTES = 1 << 30
#: Molecules from which descriptors are computed in parallel worker processes.
PARALLEL_FROM = 5_000

ESOL_SMILES_COLUMN = "smiles"
ESOL_TARGET_COLUMN = "measured log solubility in mols per litre"


def _quiet_rdkit() -> None:
    from rdkit import RDLogger

    RDLogger.DisableLog("rdApp.*")


@dataclass
class MoleculeTable:
    """Valid molecules of a CSV: SMILES, targets, and the CSV row each came from.

    ``rows[i]`` is the 0-based data-row index (header excluded) in the source file.
    """

    smiles: list[str]
    y: np.ndarray
    rows: np.ndarray
    source: str
    n_read: int
    invalid: list[tuple[int, str, str]] = field(default_factory=list)  # (row, smiles, reason)

    def __len__(self) -> int:
        return len(self.smiles)

    def summary(self) -> dict:
        return {
            "source": self.source,
            "n_rows": self.n_read,
            "n_valid": len(self),
            "n_invalid": len(self.invalid),
            "invalid_examples": [
                {"row": r, "smiles": s, "reason": why} for r, s, why in self.invalid[:10]
            ],
        }


def read_molecule_csv(path: str | Path, smiles_column: str, target_column: str) -> MoleculeTable:
    """Read SMILES and a numeric target from a CSV; skip, count and report invalid rows.

    The file is read as UTF-8; a leading byte-order mark is dropped. SMILES are stripped of
    surrounding whitespace. A row is invalid when RDKit cannot parse its SMILES or its target
    is missing / not a finite number; such rows are never imputed.

    Raises:
        DataError: the file is missing or a directory, is not a CSV with a header, lacks a
            requested column, or holds no valid molecule.
    """
    import io

    from rdkit import Chem

    from score_exp.runs.files import UnsafeRunFile, open_regular

    _quiet_rdkit()
    path = Path(path)
    if path.is_dir():
        raise DataError(f"molecule CSV {path} is a directory, not a CSV file")
    try:  # a regular file (a FIFO or a device is refused, never waited on), of a sane size
        with open_regular(path, MAX_CSV_BYTES) as raw:
            # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of a column name
            f = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in (smiles_column, target_column) if c not in header]
            if missing:
                raise DataError(
                    f"{path}: column(s) {missing} not found; the header has {header}. "
                    "Set data.smiles_column / data.target_column."
                )
            twice = [c for c in (smiles_column, target_column) if header.count(c) > 1]
            if twice:
                raise DataError(
                    f"{path}: the header names column {twice[0]!r} {header.count(twice[0])} "
                    "times; which one holds the data is ambiguous: rename the others"
                )
            records = list(reader)
    except FileNotFoundError:
        raise DataError(f"molecule CSV not found: {path}") from None
    except UnsafeRunFile as e:
        raise DataError(f"molecule CSV {e}") from None
    except (csv.Error, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None

    smiles, ys, rows, invalid = [], [], [], []
    for i, rec in enumerate(records):
        smi = (rec.get(smiles_column) or "").strip()
        raw_y = (rec.get(target_column) or "").strip()
        try:
            y = float(raw_y)
        except ValueError:
            invalid.append((i, smi, f"target {raw_y!r} is not a number"))
            continue
        if not math.isfinite(y):
            invalid.append((i, smi, f"target {raw_y!r} is not finite"))
            continue
        if len(smi) > MAX_SMILES_CHARS:
            invalid.append((i, smi[:40] + "...", f"SMILES over {MAX_SMILES_CHARS} characters"))
            continue
        mol = Chem.MolFromSmiles(smi) if smi else None
        if mol is None:
            invalid.append((i, smi, "invalid SMILES"))
            continue
        if mol.GetNumAtoms() > MAX_ATOMS:
            invalid.append((i, smi[:40] + "...", f"{mol.GetNumAtoms()} atoms, over {MAX_ATOMS}"))
            continue
        smiles.append(smi)
        ys.append(y)
        rows.append(i)

    table = MoleculeTable(
        smiles=smiles,
        y=np.asarray(ys, dtype=np.float64),
        rows=np.asarray(rows, dtype=np.int64),
        source=str(path),
        n_read=len(records),
        invalid=invalid,
    )
    if invalid:
        shown = "; ".join(f"row {r}: {s!r} ({why})" for r, s, why in invalid[:5])
        log.warning(
            "%s: skipped %d of %d rows (%s%s)",
            path.name,
            len(invalid),
            len(records),
            shown,
            "; ..." if len(invalid) > 5 else "",
        )
    if not smiles:
        raise DataError(f"{path}: no valid molecule among {len(records)} rows")
    return table


# ----------------------------------------------------------------------------- splits

SPLIT_KINDS = ("random", "scaffold")


def random_split(
    n: int, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, np.ndarray]:
    """Seeded random train/val/test split of ``range(n)``."""
    check_fractions(fractions)
    perm = np.random.default_rng(seed).permutation(n)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def scaffold_split(
    smiles: list[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> dict[str, np.ndarray]:
    """Bemis-Murcko scaffold split (DeepChem's deterministic variant).

    Molecules are grouped by scaffold; groups are sorted largest first (ties by first index)
    and fill train, then val, then test, so no scaffold straddles two splits. The split does
    not depend on the seed.
    """
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    check_fractions(fractions)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, smi in enumerate(smiles):
        mol = Chem.MolFromSmiles(smi)
        groups[MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)].append(i)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), g[0]))
    n = len(smiles)
    cut_train, cut_val = fractions[0] * n, (fractions[0] + fractions[1]) * n
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for g in ordered:
        if len(out["train"]) + len(g) <= cut_train:
            out["train"].extend(g)
        elif len(out["train"]) + len(out["val"]) + len(g) <= cut_val:
            out["val"].extend(g)
        else:
            out["test"].extend(g)
    return {k: np.asarray(sorted(v), dtype=np.int64) for k, v in out.items()}


def check_fractions(fractions, key: str = "split_fractions") -> tuple[float, float, float]:
    """Train/val/test fractions: 3 non-negative numbers summing to 1 (a ConfigError otherwise)."""
    try:
        values = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or any(not f >= 0 for f in values) or abs(sum(values) - 1) > 1e-6:
        raise ConfigError(
            f"{key} must be 3 non-negative numbers summing to 1, got {_plain(fractions)}"
        )
    return values


def _plain(value):
    return list(value) if hasattr(value, "__iter__") and not isinstance(value, str) else value


def make_split(
    kind: str, smiles: list[str], seed: int, fractions=(0.8, 0.1, 0.1)
) -> dict[str, np.ndarray]:
    """``kind`` is ``random`` (seeded) or ``scaffold`` (Bemis-Murcko)."""
    check_choice("split", kind, SPLIT_KINDS)
    if kind == "random":
        return random_split(len(smiles), seed, tuple(fractions))
    return scaffold_split(smiles, tuple(fractions))


# ----------------------------------------------------------------------------- descriptors


def descriptor_names() -> list[str]:
    """Names of the full RDKit 2-D descriptor set, in computation order."""
    from rdkit.Chem import Descriptors

    return [name for name, _ in Descriptors._descList]


def compute_descriptors(smiles: list[str], cache: Path | None = None) -> np.ndarray:
    """RDKit 2-D descriptors, shape ``(len(smiles), n_descriptors)``; failures become NaN.

    With ``cache`` (a folder), the matrix is stored under a key of the SMILES list, the RDKit
    version and the descriptor names, so a change of any of them recomputes it. A cached file
    that cannot be read back as that matrix (truncated, wrong shape) is recomputed, with a
    warning naming it.
    """
    import rdkit

    _quiet_rdkit()
    names = descriptor_names()
    key = hashlib.sha256(
        "\n".join([rdkit.__version__, ",".join(names), *smiles]).encode()
    ).hexdigest()[:16]
    path = cache / f"rdkit-descriptors-{key}.npy" if cache is not None else None
    if path is not None and os.path.lexists(path):
        from score_exp.runs.files import UnsafeRunFile, open_regular

        try:  # a regular file only: a FIFO planted in the cache is never waited on
            with open_regular(path, 8 * len(smiles) * len(names) + (1 << 20)) as f:
                X = np.load(f, allow_pickle=False)
            if X.shape == (len(smiles), len(names)) and X.dtype == np.float64:
                return X
            reason = f"shape {X.shape} {X.dtype}, expected {(len(smiles), len(names))} float64"
        except (OSError, ValueError, EOFError, UnsafeRunFile) as e:  # truncated, not .npy, FIFO
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        log.warning("descriptor cache %s is unreadable (%s); recomputing it", path, reason)

    log.info(
        "computing %d RDKit descriptors for %d molecules (cached once)", len(names), len(smiles)
    )
    out = _descriptor_rows(smiles)
    with np.errstate(over="ignore", invalid="ignore"):
        out[~np.isfinite(out)] = np.nan
    if path is not None:
        from score_exp.runs.files import atomic_write_bytes

        try:
            atomic_write_bytes(path, _npy_bytes(out))
        except OSError as e:  # a read-only cache: the descriptors are computed, just not kept
            log.warning("cannot cache the descriptors in %s (%s)", path.parent, e.strerror or e)
    return out


def _descriptor_chunk(smiles: list[str]) -> np.ndarray:
    """Descriptors of ``smiles`` in this process (NaN where one fails or a SMILES is too large)."""
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    _quiet_rdkit()
    fns = [fn for _, fn in Descriptors._descList]
    out = np.full((len(smiles), len(fns)), np.nan, dtype=np.float64)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, smi in enumerate(smiles):
            mol = Chem.MolFromSmiles(smi) if len(smi) <= MAX_SMILES_CHARS else None
            if mol is None or mol.GetNumAtoms() > MAX_ATOMS:
                continue  # bounded time: never a molecule the reader would have skipped
            for j, fn in enumerate(fns):
                # Some descriptors fail on exotic molecules: the cell stays NaN (imputed later).
                with contextlib.suppress(Exception):
                    out[i, j] = fn(mol)
    return out


def _descriptor_rows(smiles: list[str], chunk: int = 500) -> np.ndarray:
    """Descriptors of ``smiles``: in worker processes (one per CPU this process may use) from
    :data:`PARALLEL_FROM` molecules, with a progress bar on a terminal; else in this process."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1, 16)
    if len(smiles) < PARALLEL_FROM or workers < 2:
        return _descriptor_chunk(smiles)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    parts = [smiles[i : i + chunk] for i in range(0, len(smiles), chunk)]
    # spawn: a fresh interpreter per worker (no fork of a process that holds torch threads)
    with (
        ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool,
        tqdm(total=len(smiles), unit="mol", desc="RDKit descriptors", disable=None) as bar,
    ):
        blocks = []
        for block in pool.map(_descriptor_chunk, parts):
            blocks.append(block)
            bar.update(len(block))
    return np.concatenate(blocks, axis=0)


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()
