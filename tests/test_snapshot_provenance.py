"""The published snapshot's provenance (issue 27): runs from a dirty tree or outside the portable
numerics mode are refused (or, when asked, published and marked), PROVENANCE names the training
commands and the numerics, the literature table is part of the page, and the README's own prose
about verdicts is checked against the snapshot."""

from __future__ import annotations

import json

import pytest
from test_snapshot import _synthetic_runs

from score_exp.errors import DataError
from score_exp.report import literature
from score_exp.report.snapshot import LITERATURE, PROVENANCE, check, check_prose, snapshot


def _mark(runs, git: str, mode: str | None) -> None:
    for res in runs.rglob("results.json"):
        data = json.loads(res.read_text())
        data.update(git=git, overrides=["task=esol_mlp", "seed=0"])
        if mode:
            data["numerics"] = {"mode": mode, "cpu_capability": "DEFAULT", "mkl_branch": "COMPATIBLE",
                                "threads": 1, "cpu": "Some CPU"}  # fmt: skip
        res.write_text(json.dumps(data))


def test_dirty_or_default_mode_runs_are_refused_unless_asked_then_marked(tmp_path):
    runs = _synthetic_runs(tmp_path)
    _mark(runs, "abc123-dirty", None)
    with pytest.raises(
        DataError, match=r"refusing to publish: 12 runs dirty .*12 runs not portable"
    ):
        snapshot(tmp_path / "out", [runs], [], "make results", None, allow_unpublishable=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    snapshot(tmp_path / "out", [runs], [], "make results", None, train="make claims-datasets-cpu")
    prov = (tmp_path / "out" / PROVENANCE).read_text()
    assert "published anyway** (--allow-unpublishable): 12 runs dirty" in prov
    assert "12 runs not portable" in prov


def test_provenance_names_training_commands_numerics_and_cpu(tmp_path):
    runs = _synthetic_runs(tmp_path)
    _mark(runs, "abc123", "portable")
    out = tmp_path / "out"
    snapshot(out, [runs], [], "make results", "2 h", train="make claims-datasets-cpu",
             allow_unpublishable=False)  # fmt: skip
    prov = (out / PROVENANCE).read_text()
    assert "- training command: `make claims-datasets-cpu`; per experiment:" in prov
    assert "  - `claims_esol`: 6 runs, e.g. `score-train task=esol_mlp seed=0`" in prov
    assert "- numerics: portable (DEFAULT ATen, MKL COMPATIBLE, 1 thread(s)): 12 runs" in prov
    assert "CPU of the runs: Some CPU" in prov and "2 h" in prov
    assert (out / LITERATURE).read_text() == literature.markdown()  # MLP runs: no project row
    assert "Xiong et al. 2020" in literature.markdown() and "random" in literature.markdown()
    assert "<h2>Literature</h2>" in (out / "index.html").read_text()  # on the page too
    assert check(out) == []
    (out / LITERATURE).write_text("edited")
    assert check(out) == [f"{out / LITERATURE}: differs from score_exp.report.literature"]


def test_readme_prose_about_verdicts_is_checked_against_the_snapshot(tmp_path):
    runs = _synthetic_runs(tmp_path)
    out = tmp_path / "out"
    snapshot(out, [runs], [], "make results", None)
    # the synthetic snapshot: fewer parameters supported; faster convergence inconclusive
    good = "Fewer parameters is supported on both datasets. Faster convergence stays inconclusive."
    assert check_prose(good, out) == []
    bad = "In short, faster convergence is supported everywhere."
    (problem,) = check_prose(bad, out)
    assert "says supported about 'faster convergence'" in problem and "inconclusive" in problem


def test_the_readme_prose_agrees_with_the_committed_snapshot():
    from conftest import REPO

    snap = REPO / "docs" / "results"
    if not (snap / "claims.md").is_file():  # no snapshot: the README says "not yet generated"
        assert "Not yet generated" in (REPO / "README.md").read_text()
        return
    assert check_prose((REPO / "README.md").read_text(), snap) == []


def test_the_literature_table_puts_the_snapshots_gnn_runs_beside_the_papers():
    """The project's rows: test RMSE mean ± std (n) per experiment and model, GNN tasks only,
    ok runs only; a cell no source gives is 'not checked', never a number."""
    from types import SimpleNamespace as NS

    def run(task, rmse, reference=None, preset=None, ok=True, experiment="claims_gnn"):
        rec = NS(
            test={"rmse": rmse}, reference=reference, depth_preset=preset, experiment=experiment
        )
        return NS(record=rec, task=task, ok=ok)

    runs = [run("esol_gnn", 0.5, reference="attentivefp"), run("esol_gnn", 0.7, reference="attentivefp"),
            run("lipo_gnn", 0.6, preset="score025"), run("lipo_gnn", 9.9, preset="score025", ok=False),
            run("esol_mlp", 0.4, preset="score")]  # fmt: skip
    text = literature.markdown(runs)
    assert (
        "| this project: AttentiveFP (PyG) | `claims_gnn` | random | 0.600 ± 0.141 (n=2) |  |  |"
        in text
    )
    assert (
        "| this project: MolGNN, depth=score025 | `claims_gnn` | random |  |  | 0.600 ± 0.000 (n=1) |"
        in text
    )
    assert "esol_mlp" not in text and "9.9" not in text
    assert "not checked" in text  # AttentiveFP's Lipophilicity: no source read
