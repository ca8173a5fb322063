"""Molecules as PyG graphs, featurised as AttentiveFP does (Xiong et al., 2020).

Atom features (39 floats):

====================  =====  =============================================================
feature               width  values
====================  =====  =============================================================
element               16     B C N O F Si P S Cl As Se Br Te I At, other
degree                6      0 .. 5 (5 also for higher)
formal charge         1      integer
radical electrons     1      integer
hybridisation         6      SP SP2 SP3 SP3D SP3D2, other
aromatic              1      0/1
total H count         5      0 .. 4 (4 also for higher)
chirality             3      is a stereocentre; CIP code R; CIP code S
====================  =====  =============================================================

Bond features (10 floats): type (single, double, triple, aromatic), conjugated, in a ring,
stereo (none, any, Z, E). Each bond appears as two directed edges, stored in consecutive
columns ``2k`` (i -> j) and ``2k + 1`` (j -> i) of ``edge_index``, so the reverse of edge ``e``
is ``e ^ 1`` (the D-MPNN conv relies on it; PyG batching keeps it).

Featurised graphs are cached on disk under a key naming :data:`FEATURIZER` and
:data:`FEATURIZER_VERSION` (bump it whenever a feature changes) and the SMILES list.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FEATURIZER = "attentivefp"
FEATURIZER_VERSION = 2

ELEMENTS = ["B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "As", "Se", "Br", "Te", "I", "At"]
HYBRIDISATIONS = ["SP", "SP2", "SP3", "SP3D", "SP3D2"]
BOND_TYPES = ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC"]
BOND_STEREO = ["STEREONONE", "STEREOANY", "STEREOZ", "STEREOE"]

ATOM_FEATURES = len(ELEMENTS) + 1 + 6 + 1 + 1 + len(HYBRIDISATIONS) + 1 + 1 + 5 + 3  # 39
BOND_FEATURES = len(BOND_TYPES) + 1 + 1 + len(BOND_STEREO)  # 10


def _one_hot(value, choices: list, other: bool) -> list[float]:
    out = [float(value == c) for c in choices]
    if other:
        out.append(float(value not in choices))
    return out


def atom_features(atom, centres: dict[int, str]) -> list[float]:
    """The 39 AttentiveFP features of an RDKit atom (``centres``: stereocentre index -> CIP code)."""
    degree = min(atom.GetDegree(), 5)
    n_h = min(atom.GetTotalNumHs(), 4)
    cip = centres.get(atom.GetIdx())
    return (
        _one_hot(atom.GetSymbol(), ELEMENTS, other=True)
        + _one_hot(degree, list(range(6)), other=False)
        + [float(atom.GetFormalCharge()), float(atom.GetNumRadicalElectrons())]
        + _one_hot(str(atom.GetHybridization()), HYBRIDISATIONS, other=True)
        + [float(atom.GetIsAromatic())]
        + _one_hot(n_h, list(range(5)), other=False)
        + [float(atom.GetIdx() in centres), float(cip == "R"), float(cip == "S")]
    )


def bond_features(bond) -> list[float]:
    """The 10 AttentiveFP features of an RDKit bond."""
    return (
        _one_hot(str(bond.GetBondType()), BOND_TYPES, other=False)
        + [float(bond.GetIsConjugated()), float(bond.IsInRing())]
        + _one_hot(str(bond.GetStereo()), BOND_STEREO, other=False)
    )


def mol_to_graph(smiles: str) -> dict[str, Tensor]:
    """``{"x": (N, 39), "edge_index": (2, 2B), "edge_attr": (2B, 10)}`` of one molecule.

    Raises:
        ValueError: RDKit cannot parse ``smiles``.
    """
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"invalid SMILES {smiles!r}")
    # stereocentres, assigned (R/S) or not ('?'), as AttentiveFP's featuriser flags them
    centres = dict(
        Chem.FindMolChiralCenters(mol, includeUnassigned=True, useLegacyImplementation=False)
    )
    x = torch.tensor([atom_features(a, centres) for a in mol.GetAtoms()], dtype=torch.float32)
    src, dst, attr = [], [], []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        f = bond_features(bond)
        src += [i, j]  # edges 2k (i -> j) and 2k + 1 (j -> i): reverse(e) = e ^ 1
        dst += [j, i]
        attr += [f, f]
    return {
        "x": x.view(-1, ATOM_FEATURES),
        "edge_index": torch.tensor([src, dst], dtype=torch.long).view(2, -1),
        "edge_attr": torch.tensor(attr, dtype=torch.float32).view(-1, BOND_FEATURES),
    }


def cache_key(smiles: list[str]) -> str:
    """File name of the cached graphs: featuriser name and version plus a hash of the inputs."""
    import rdkit

    digest = hashlib.sha256("\n".join([rdkit.__version__, *smiles]).encode()).hexdigest()[:16]
    return f"graphs-{FEATURIZER}-v{FEATURIZER_VERSION}-{digest}.pt"


def featurize(smiles: list[str], cache: Path | None = None) -> list[dict[str, Tensor]]:
    """Featurise every SMILES once; with ``cache`` (a folder) reuse a previous result.

    The SMILES are expected to be valid (the CSV reader already skipped and reported the
    invalid ones); an invalid one raises ``ValueError``. A cached file that cannot be read back
    as these graphs (truncated, other content) is featurised again, with a warning naming it.
    """
    path = cache / cache_key(smiles) if cache is not None else None
    if path is not None and path.exists():
        try:
            graphs = torch.load(path, map_location="cpu", weights_only=True)  # data, never code
            _check_graphs(graphs, len(smiles))
            return graphs
        except Exception as e:  # truncated zip, unpickling refused, wrong content, ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.warning("graph cache %s is unreadable (%s); featurising again", path, reason)
    log.info(
        "featurising %d molecules as graphs (%s v%d, cached once)",
        len(smiles),
        FEATURIZER,
        FEATURIZER_VERSION,
    )
    graphs = [mol_to_graph(s) for s in smiles]
    if path is not None:
        import io

        from score_exp.runs.files import atomic_write_bytes

        buf = io.BytesIO()
        torch.save(graphs, buf)
        try:
            atomic_write_bytes(path, buf.getvalue())
        except OSError as e:  # a read-only cache: the graphs are featurised, just not kept
            log.warning("cannot cache the graphs in %s (%s)", path.parent, e.strerror or e)
    return graphs


def _check_graphs(graphs, n: int) -> None:
    """Raise ``ValueError`` unless ``graphs`` are ``n`` featurised molecules (a cache's content)."""
    if not isinstance(graphs, list) or len(graphs) != n:
        raise ValueError(f"expected a list of {n} graphs")
    widths = {"x": ATOM_FEATURES, "edge_attr": BOND_FEATURES}
    for g in graphs:
        if not isinstance(g, dict) or set(g) != {"x", "edge_index", "edge_attr"}:
            raise ValueError("a graph is not {x, edge_index, edge_attr}")
        if any(g[k].dim() != 2 or g[k].shape[1] != w for k, w in widths.items()):
            raise ValueError("feature widths differ from the featuriser's")
