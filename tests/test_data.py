"""Data registry (cache, mirror, checksums), the molecule CSV reader, splits, descriptors."""

from __future__ import annotations

import numpy as np
import pytest

from score_exp.data.molecules import (
    ESOL_SMILES_COLUMN,
    ESOL_TARGET_COLUMN,
    compute_descriptors,
    random_split,
    read_molecule_csv,
    scaffold_split,
)
from score_exp.data.registry import REGISTRY, fetch, sha256sum
from score_exp.data.scaler import FeatureScaler
from score_exp.errors import DataError


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORE_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SCORE_DATA_OFFLINE", "1")
    return tmp_path / "cache"


def test_registry_checksums_match_the_mirror():
    """Every registered file is in the mirror (CI has it) with the registered hash and size."""
    for entry in REGISTRY.values():
        path = fetch(entry.key)
        assert path.stat().st_size == entry.size
        assert sha256sum(path) == entry.sha256


def test_fetch_copies_from_mirror_then_hits_cache(empty_cache, monkeypatch):
    path = fetch("esol")
    assert path == empty_cache / "esol" / "delaney-processed.csv" and path.exists()
    monkeypatch.delenv("SCORE_DATA_MIRROR")
    assert fetch("esol") == path  # cache hit, no mirror needed


def test_fetch_rejects_a_corrupt_mirror_file(empty_cache, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "esol").mkdir(parents=True)
    (mirror / "esol" / "delaney-processed.csv").write_text("smiles,y\nCCO,1\n")
    monkeypatch.setenv("SCORE_DATA_MIRROR", str(mirror))
    with pytest.raises(DataError, match="checksum mismatch for esol/delaney-processed.csv") as e:
        fetch("esol")
    assert REGISTRY["esol"].sha256 in str(e.value)
    assert not (empty_cache / "esol" / "delaney-processed.csv").exists()


def test_missing_file_offline_says_what_where_and_how(empty_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("SCORE_DATA_MIRROR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError) as e:
        fetch("shakespeare")
    msg = str(e.value)
    assert "shakespeare/input.txt" in msg and "is missing" in msg
    assert str(empty_cache) in msg and str(tmp_path / "nowhere") in msg
    assert "SCORE_DATA_MIRROR" in msg and REGISTRY["shakespeare"].url in msg


def test_corrupt_cache_is_replaced_from_the_mirror(empty_cache):
    path = fetch("esol")
    path.write_text("garbage")
    assert sha256sum(fetch("esol")) == REGISTRY["esol"].sha256


# ----------------------------------------------------------------------------- CSV reader


def _csv(tmp_path, text: str):
    p = tmp_path / "mols.csv"
    p.write_text(text)
    return p


def test_reader_strips_skips_counts_and_reports_invalid_rows(tmp_path, caplog):
    p = _csv(
        tmp_path,
        "smi,logP\n CCO ,1.5\nnot_a_smiles,2.0\nc1ccccc1,abc\nC1CC,3.0\nCCN,\nCCC,0.5\n",
    )
    table = read_molecule_csv(p, "smi", "logP")
    assert table.smiles == ["CCO", "CCC"]
    assert table.y.tolist() == [1.5, 0.5]
    assert table.rows.tolist() == [0, 5]
    assert [r for r, _, _ in table.invalid] == [1, 2, 3, 4]
    assert table.summary()["n_invalid"] == 4
    assert "skipped 4 of 6 rows" in caplog.text and "not_a_smiles" in caplog.text


def test_reader_names_missing_columns(tmp_path):
    p = _csv(tmp_path, "smiles,other\nCCO,1\n")
    with pytest.raises(DataError, match=r"column\(s\) \['target'\] not found; the header has"):
        read_molecule_csv(p, "smiles", "target")


def test_reader_rejects_a_file_without_valid_molecules(tmp_path):
    with pytest.raises(DataError, match="no valid molecule"):
        read_molecule_csv(_csv(tmp_path, "smiles,y\nxx,1\n"), "smiles", "y")
    with pytest.raises(DataError, match="not found"):
        read_molecule_csv(tmp_path / "absent.csv", "smiles", "y")


def test_esol_reads_all_1128_molecules():
    table = read_molecule_csv(fetch("esol"), ESOL_SMILES_COLUMN, ESOL_TARGET_COLUMN)
    assert len(table) == 1128 and not table.invalid
    assert table.smiles[0] == table.smiles[0].strip()
    # predicting the mean gives about 2.1 log units, the reference point
    assert table.y.std() == pytest.approx(2.096, abs=0.01)


# ----------------------------------------------------------------------------- splits


def test_random_split_is_seeded_disjoint_and_complete():
    a, b, c = random_split(100, 0), random_split(100, 0), random_split(100, 1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["test"], c["test"])
    assert [len(a[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(100))


def test_scaffold_split_keeps_each_scaffold_in_one_split():
    from rdkit.Chem.Scaffolds import MurckoScaffold

    table = read_molecule_csv(fetch("esol"), ESOL_SMILES_COLUMN, ESOL_TARGET_COLUMN)
    split = scaffold_split(table.smiles)
    owner = {}
    for name, idx in split.items():
        for i in idx:
            scaf = MurckoScaffold.MurckoScaffoldSmiles(smiles=table.smiles[i])
            assert owner.setdefault(scaf, name) == name
    assert sum(len(v) for v in split.values()) == len(table)
    assert len(split["train"]) <= 0.8 * len(table) + 1


# ----------------------------------------------------------------------------- descriptors


def test_descriptors_are_cached_under_a_content_key(tmp_path):
    smiles = ["CCO", "c1ccccc1O"]
    X = compute_descriptors(smiles, cache=tmp_path)
    files = list(tmp_path.glob("rdkit-descriptors-*.npy"))
    assert len(files) == 1 and X.shape[0] == 2 and X.shape[1] > 100
    assert np.array_equal(np.load(files[0]), X, equal_nan=True)
    compute_descriptors(["CCN"], cache=tmp_path)
    assert len(list(tmp_path.glob("rdkit-descriptors-*.npy"))) == 2


# ----------------------------------------------------------------------------- caches heal


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_descriptor_cache_is_recomputed_with_a_warning(tmp_path, caplog):
    smiles = ["CCO", "c1ccccc1O", "CCN"]
    X = compute_descriptors(smiles, cache=tmp_path)
    (path,) = tmp_path.glob("rdkit-descriptors-*.npy")
    _truncate(path)
    with caplog.at_level("WARNING"):
        again = compute_descriptors(smiles, cache=tmp_path)
    assert np.array_equal(again, X, equal_nan=True)
    assert f"descriptor cache {path} is unreadable" in caplog.text
    assert np.array_equal(np.load(path), X, equal_nan=True)  # rewritten whole
    caplog.clear()
    compute_descriptors(smiles, cache=tmp_path)
    assert "unreadable" not in caplog.text  # healed: a plain cache hit now


def test_a_truncated_graph_cache_is_featurised_again_with_a_warning(tmp_path, caplog):
    import torch

    from score_exp.data.graphs import featurize

    smiles = ["CCO", "c1ccccc1O"]
    graphs = featurize(smiles, cache=tmp_path)
    (path,) = tmp_path.glob("graphs-*.pt")
    _truncate(path)
    with caplog.at_level("WARNING"):
        again = featurize(smiles, cache=tmp_path)
    assert f"graph cache {path} is unreadable" in caplog.text
    assert all(torch.equal(a[k], b[k]) for a, b in zip(graphs, again, strict=True) for k in a)
    torch.save([{"x": torch.zeros(2, 3)}], path)  # readable, but not these graphs
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert len(featurize(smiles, cache=tmp_path)) == 2
    assert f"graph cache {path} is unreadable" in caplog.text


def test_a_damaged_token_cache_is_prepared_again_with_a_warning(tmp_path, caplog):
    from score_exp.data.shakespeare import prepare_tokens

    text = tmp_path / "text.txt"
    text.write_text("to be or not to be, that is the question. " * 10)
    files = prepare_tokens(text, "char", cache=tmp_path / "tokens")
    train = np.array(files.load("train"))
    _truncate(files.path("train"))
    with caplog.at_level("WARNING"):
        again = prepare_tokens(text, "char", cache=tmp_path / "tokens")
    assert f"token cache {files.path('train')} is unreadable" in caplog.text
    assert np.array_equal(np.array(again.load("train")), train)
    # Same size, other bytes: the sha256 in meta.json catches it.
    damaged = train.copy()
    damaged[0] = damaged[1] if damaged[0] != damaged[1] else damaged[0] + 1
    damaged.tofile(files.path("train"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = prepare_tokens(text, "char", cache=tmp_path / "tokens")
    assert "sha256 differs" in caplog.text
    assert np.array_equal(np.array(again.load("train")), train)


def test_feature_scaler_uses_train_statistics_only():
    X_train = np.array([[1.0, 5.0, np.nan], [3.0, 5.0, np.nan], [np.nan, 5.0, np.nan]])
    scaler = FeatureScaler.fit(X_train)
    assert scaler.keep.tolist() == [True, False, False]  # constant and all-NaN columns dropped
    assert scaler.median.tolist() == [2.0]
    out = scaler.transform(np.array([[np.nan, 1.0, 1.0], [1e9, 0.0, 0.0]]))
    assert out.shape == (2, 1) and out[0, 0] == pytest.approx(0.0)  # imputed with the median
    assert out[1, 0] == scaler.clip  # clipped tail
