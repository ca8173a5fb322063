"""ESOL GNN: featurisation, every conv x readout x depth preset, the CLI, and learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_results, train_cli
from torch_geometric.data import Batch, Data

from score_exp.core import DepthSpec
from score_exp.data import graphs
from score_exp.data.graphs import ATOM_FEATURES, BOND_FEATURES, featurize, mol_to_graph
from score_exp.models.mol_gnn import CONVS, READOUTS, EdgeNetworkConv, MolGNN

SMILES = ["CCO", "c1ccccc1O", "C[C@H](N)C(=O)O", "C/C=C/Cl", "[Na+].[Cl-]", "C"]


# ----------------------------------------------------------------------------- featurisation


@pytest.mark.parametrize("smi", SMILES)
def test_graph_counts_match_rdkit(smi):
    from rdkit import Chem

    mol = Chem.MolFromSmiles(smi)
    g = mol_to_graph(smi)
    assert g["x"].shape == (mol.GetNumAtoms(), ATOM_FEATURES) == (mol.GetNumAtoms(), 39)
    assert g["edge_index"].shape == (2, 2 * mol.GetNumBonds())
    assert (
        g["edge_attr"].shape
        == (2 * mol.GetNumBonds(), BOND_FEATURES)
        == (2 * mol.GetNumBonds(), 10)
    )
    ei = g["edge_index"]
    # edge 2k+1 is the reverse of edge 2k
    assert torch.equal(ei[:, 1::2], ei.flip(0)[:, 0::2])
    for k, bond in enumerate(mol.GetBonds()):
        assert {int(ei[0, 2 * k]), int(ei[1, 2 * k])} == {
            bond.GetBeginAtomIdx(),
            bond.GetEndAtomIdx(),
        }


def test_atom_and_bond_features_encode_the_chemistry():
    g = mol_to_graph("c1ccccc1O")  # phenol: 6 aromatic C, 1 O
    x = g["x"]
    elements = x[:, : len(graphs.ELEMENTS) + 1]
    assert elements[:, graphs.ELEMENTS.index("C")].sum() == 6
    assert elements[:, graphs.ELEMENTS.index("O")].sum() == 1
    aromatic = x[:, 16 + 6 + 2 + 6]
    assert aromatic.tolist() == [1.0] * 6 + [0.0]
    bond_type = g["edge_attr"][:, :4]
    assert bond_type[:, 3].sum() == 12 and bond_type[:, 0].sum() == 2  # 6 aromatic + 1 single bond
    assert g["edge_attr"][:, 5].sum() == 12  # in a ring
    # alanine's stereocentre: flagged, CIP code S
    ala = mol_to_graph("C[C@H](N)C(=O)O")["x"]
    assert ala[:, -3].sum() == 1 and ala[:, -1].sum() == 1
    # every atom has exactly one element, degree and H-count bucket
    for s in SMILES:
        x = mol_to_graph(s)["x"]
        assert torch.all(x[:, :16].sum(1) == 1) and torch.all(x[:, 16:22].sum(1) == 1)


def test_invalid_smiles_raises():
    with pytest.raises(ValueError, match="invalid SMILES"):
        mol_to_graph("C1CC")


def test_featurisation_cache_key_names_the_featuriser_version(tmp_path, monkeypatch):
    out = featurize(SMILES[:3], cache=tmp_path)
    key = graphs.cache_key(SMILES[:3])
    assert key.startswith(f"graphs-attentivefp-v{graphs.FEATURIZER_VERSION}-")
    assert (tmp_path / key).exists()
    again = featurize(SMILES[:3], cache=tmp_path)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(out, again, strict=True))
    monkeypatch.setattr(graphs, "FEATURIZER_VERSION", graphs.FEATURIZER_VERSION + 1)
    assert graphs.cache_key(SMILES[:3]) != key  # a new featuriser never reads stale features
    assert graphs.cache_key(SMILES[:2]) != graphs.cache_key(SMILES[:3])


# ----------------------------------------------------------------------------- models


def test_edge_network_conv_equals_pyg_nnconv():
    from torch_geometric.nn import NNConv

    torch.manual_seed(0)
    conv = EdgeNetworkConv(16, 10)
    ref = NNConv(16, 16, conv.edge_net, aggr="mean", root_weight=True, bias=True)
    ref.lin.weight.data, ref.bias.data = conv.root.weight.data, conv.root.bias.data
    x, ei = torch.randn(30, 16), torch.randint(0, 30, (2, 80))
    ea = (torch.rand(80, 10) > 0.7).float()
    assert torch.allclose(conv(x, ei, ea), ref(x, ei, ea), atol=1e-5)


@pytest.mark.parametrize("conv", CONVS)
def test_every_conv_runs_on_molecules_without_bonds(conv):
    """Single-atom molecules (ESOL has methane) have no edges: alone in a batch, or the last ones
    left when halting removes the finished molecules, every conv still gives finite outputs
    (score-eval of a halting GNN crashed in torch.cat on an empty list of messages)."""
    torch.manual_seed(0)
    spec = DepthSpec(share=True, steps=3, dt=0.25)
    model = MolGNN(ATOM_FEATURES, BOND_FEATURES, spec, conv=conv, hidden=16).eval()
    batch = Batch.from_data_list([Data(**mol_to_graph(s)) for s in ("C", "O", "N")])
    assert batch.edge_index.size(1) == 0
    with torch.no_grad():
        pred = model(batch)
    assert pred.shape == (3, 1) and torch.isfinite(pred).all()


def test_edge_network_conv_without_edges_equals_pyg_nnconv():
    from torch_geometric.nn import NNConv

    torch.manual_seed(0)
    conv = EdgeNetworkConv(16, 10)
    ref = NNConv(16, 16, conv.edge_net, aggr="mean", root_weight=True, bias=True)
    ref.lin.weight.data, ref.bias.data = conv.root.weight.data, conv.root.bias.data
    x, ei, ea = torch.randn(5, 16), torch.empty(2, 0, dtype=torch.long), torch.empty(0, 10)
    assert torch.allclose(conv(x, ei, ea), ref(x, ei, ea), atol=1e-6)


def _batch(descriptors: int = 0) -> Batch:
    data = []
    for i, s in enumerate(SMILES):
        extra = {"desc": torch.randn(1, descriptors)} if descriptors else {}
        data.append(Data(**mol_to_graph(s), y=torch.tensor([float(i)]), **extra))
    return Batch.from_data_list(data)


PRESETS = {
    "score": DepthSpec(share=True, steps=3, dt=0.25),
    "stacked": DepthSpec(share=False, steps=3, dt=1.0, update="residual"),
    "stacked_plain": DepthSpec(share=False, steps=3, dt=None, update="none"),
    "skip05_rk4": DepthSpec(share=False, steps=2, dt=0.5, integrator="rk4"),
}


@pytest.mark.parametrize("conv", CONVS)
@pytest.mark.parametrize("readout", READOUTS)
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_conv_readout_and_preset_trains_one_step(conv, readout, preset):
    torch.manual_seed(0)
    model = MolGNN(
        ATOM_FEATURES, BOND_FEATURES, PRESETS[preset], conv=conv, readout=readout, hidden=16
    )
    batch = _batch()
    pred = model(batch)
    assert pred.shape == (len(SMILES), 1) and torch.isfinite(pred).all()
    ((pred.view(-1) - batch.y) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for block in model.depth.blocks:
        assert any(p.grad.abs().sum() > 0 for p in block.parameters())


def test_shared_depth_holds_one_over_steps_of_stacked_parameters():
    count = lambda m: sum(p.numel() for p in m.depth.parameters())  # noqa: E731
    shared = MolGNN(39, 10, DepthSpec(share=True, steps=4, dt=0.25))
    stacked = MolGNN(39, 10, DepthSpec(share=False, steps=4, dt=1.0, update="residual"))
    assert 4 * count(shared) == count(stacked)
    rest = lambda m: sum(p.numel() for p in m.parameters()) - count(m)  # noqa: E731
    assert rest(shared) == rest(stacked)


def test_descriptors_are_concatenated_before_the_head():
    model = MolGNN(39, 10, DepthSpec(steps=2), hidden=16, descriptor_features=7, descriptors=True)
    assert model.head[0].in_features == 16 + 7
    assert model(_batch(descriptors=7)).shape == (len(SMILES), 1)
    with pytest.raises(ValueError, match="task.model.conv must be one of mpnn, dmpnn"):
        MolGNN(39, 10, DepthSpec(), conv="schnet")


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_trains_esol_gnn_and_records_it(tmp_path):
    run_dir = tmp_path / "gnn"
    out = train_cli(
        run_dir, "task=esol_gnn", "depth=score025", "trainer.max_epochs=2",
        "task.model.hidden=32", "task.data.batch_size=128",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r = load_results(run_dir)
    assert r["task"] == "esol_gnn" and r["status"] == "ok"
    assert r["depth"] == {
        "share": True,
        "update": "contractive",
        "steps": 4,
        "dt": 0.25,
        "integrator": "euler",
    }
    assert r["depth_preset"] == "score025" and r["nfe"] == 4
    assert 0 < r["test"]["rmse"] < 5 and r["best_val"]["metric"] == "val/rmse"
    assert len(json.loads((run_dir / "splits.json").read_text())["test_idx"]) == 113


@pytest.mark.slow
def test_gnn_learns_well_below_the_mean_predictor(tmp_path):
    run_dir = tmp_path / "learn"
    out = train_cli(
        run_dir, "task=esol_gnn", "depth=score025", "trainer.max_epochs=12",
        "callbacks.early_stopping=null", "task.model.hidden=64", "task.data.batch_size=64",
        "task.model.conv=gine", "task.model.readout=sum",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    from score_exp.data import fetch
    from score_exp.data.molecules import ESOL_SMILES_COLUMN, ESOL_TARGET_COLUMN, read_molecule_csv

    y = read_molecule_csv(fetch("esol"), ESOL_SMILES_COLUMN, ESOL_TARGET_COLUMN).y
    splits = json.loads((run_dir / "splits.json").read_text())
    mean_rmse = float(
        np.sqrt(np.mean((y[splits["test_idx"]] - y[splits["train_idx"]].mean()) ** 2))
    )
    rmse = load_results(run_dir)["test"]["rmse"]
    assert rmse < 0.6 * mean_rmse, (rmse, mean_rmse)


def test_experiment_file_composes_the_paper_setting(compose):
    from score_exp.config import depth_spec

    cfg = compose("experiment=paper_esol_gnn")
    assert cfg.task.name == "esol_gnn" and cfg.task.model.conv == "mpnn"
    assert cfg.task.model.readout == "attentive" and cfg.task.model.hidden == 128
    assert depth_spec(cfg) == DepthSpec(share=True, steps=4, dt=0.25, update="contractive")
    stacked = depth_spec(compose("experiment=paper_esol_gnn", "depth=stacked"))
    assert (stacked.share, stacked.update, stacked.dt) == (False, "residual", 1.0)
