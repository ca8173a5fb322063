"""The published results snapshot (docs/results/): its tables are what score-report makes of the
recorded numbers (runs.json), checked on the committed snapshot when there is one and always on a
small synthetic one, so the page can never drift from the runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import QUIET, REPO, cli_env, run_cli
from test_report import write_run

from score_exp.report.html import IMAGE_RE
from score_exp.report.rerender import rerender
from score_exp.report.snapshot import (
    HEADLINE,
    NOT_GENERATED,
    PROVENANCE,
    README_END,
    README_START,
    RECORD,
    check,
    readme_block,
    snapshot,
    splice_readme,
)

COMMITTED = REPO / "docs" / "results"


def _synthetic_runs(root: Path) -> Path:
    """Score and stacked over 3 seeds on two datasets (the claims and the headline have rows)."""
    runs = root / "runs"
    for dataset, shift in (("esol", 0.0), ("freesolv", 0.5)):
        for seed in range(3):
            for preset, share, params, rmse in (("stacked", False, 300, 1.0), ("score", True, 100, 1.1)):  # fmt: skip
                run = write_run(runs, f"{dataset}/{preset}/seed={seed}", preset=preset, seed=seed,
                                share=share, params=params, rmse=rmse + shift + 0.01 * seed,
                                curve=[2.0, 1.5 - 0.1 * share, 1.2])  # fmt: skip
                cfg = yaml.safe_load((run / "config.yaml").read_text())
                cfg["experiment_name"] = f"claims_{dataset}"
                cfg["task"]["data"] = {"registry_key": dataset}
                cfg["task"]["model"] = {"_target_": "score_exp.tasks.models.RecurrentMLP"}
                (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return runs


def _snapshot(tmp_path: Path) -> Path:
    runs = _synthetic_runs(tmp_path)
    out = tmp_path / "docs" / "results"
    snapshot(out, [runs], [], "make results", "3 min")
    shutil.rmtree(runs)  # the check reads runs.json only, never the run folders
    return out


def test_synthetic_snapshot_re_renders_exactly_and_a_changed_table_is_caught(tmp_path):
    out = _snapshot(tmp_path)
    for name in ("report.md", "claims.md", "runs.csv", "paired.csv", RECORD, HEADLINE, PROVENANCE,
                 "index.html"):  # fmt: skip
        assert (out / name).is_file(), name
    assert all(p.suffix in (".md", ".csv", ".json", ".tex", ".png", ".svg", ".html") for p in out.rglob("*"))  # fmt: skip
    assert check(out) == []
    headline = (out / HEADLINE).read_text()
    assert "| claim | model | esol | freesolv |" in headline
    assert "| fewer parameters | RecurrentMLP | supported | supported |" in headline
    assert "score − stacked +0.100 [" in headline
    prov = (out / PROVENANCE).read_text()
    assert "- command: `make results`" in prov and "cores" in prov and "3 min" in prov
    # A hand-edited number in the page (or a stale page after new runs) is caught.
    claims = out / "claims.md"
    claims.write_text(claims.read_text().replace("supported", "contradicted", 1))
    assert check(out) == [f"{claims}: differs from what score-report makes of {RECORD}"]


def test_the_results_page_is_checked_like_the_tables(tmp_path):
    """index.html: one file, nothing fetched, every plot inlined; re-rendered from runs.json to
    the same text (images masked); a hand-edited verdict or a broken image is caught."""
    out = _snapshot(tmp_path)
    page = out / "index.html"
    text = page.read_text()
    report_md = (out / "report.md").read_text()
    assert text.count("data:image/png;base64,") == report_md.count("![")
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", text), "the page links outside itself"
    assert "http://" not in text and "https://" not in text
    for part in ("Headline", "Claims of the paper", "Provenance", "command: <code>make results"):
        assert part in text, part
    assert 'class="verdict supported' in text and "lower is better" in text
    page.write_text(text.replace("verdict supported", "verdict contradicted", 1))
    assert check(out) == [f"{page}: differs from the page score-report makes of {RECORD}"]
    page.write_text(IMAGE_RE.sub("data:image/png;base64,AAAA", text, count=1))
    assert check(out) == [f"{page}: an inlined image is not a PNG"]
    page.unlink()
    assert check(out) == [f"{page}: missing (make results writes it)"]


def test_rerender_remakes_a_snapshot_from_its_runs_json_alone(tmp_path):
    out = _snapshot(tmp_path)
    (out / "tune_toy").mkdir()
    for name in (RECORD, PROVENANCE):
        shutil.copy(out / name, out / "tune_toy" / name)
    before = {p.name: p.read_bytes() for p in out.glob("*.md") if p.name != PROVENANCE}
    for p in [*out.glob("*.png"), out / "index.html", out / "report.md"]:
        p.unlink()
    rerender(out)  # the run folders are gone: runs.json only
    assert check(out) == []
    assert {p.name: p.read_bytes() for p in out.glob("*.md") if p.name != PROVENANCE} == before
    assert (out / "tune_toy" / "report.md").is_file() and list(out.glob("*.png"))
    prov = (out / PROVENANCE).read_text()
    assert prov.count("- re-rendered from `runs.json` at commit") == 1
    assert "- command: `make results`" in prov
    rerender(out)  # again: the line is replaced, not added
    assert (out / PROVENANCE).read_text().count("- re-rendered from") == 1
    assert "Tuned: tune_toy" in (out / "index.html").read_text()


def test_a_changed_recorded_number_changes_the_rendered_tables(tmp_path):
    out = _snapshot(tmp_path)
    # score-report renders the same tables from the recorded runs.json alone.
    proc = run_cli(str(out / RECORD), "--out", str(tmp_path / "again"), module="score_exp.report")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("claims.md", "runs.csv", "paired.csv", "report.md"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": [{"path": 1}]}')
    proc = run_cli(str(bad), "--out", str(tmp_path / "x"), module="score_exp.report")
    assert proc.returncode == 2 and "not a recorded runs.json" in proc.stderr
    assert "Traceback" not in proc.stderr
    rec = json.loads((out / RECORD).read_text())
    rec["runs"][0]["results"]["test"]["rmse"] += 1.0
    (out / RECORD).write_text(json.dumps(rec))
    assert any("report.md" in p for p in check(out))


def test_the_snapshot_refuses_to_clear_files_it_never_holds(tmp_path):
    runs = _synthetic_runs(tmp_path)
    out = tmp_path / "results"
    out.mkdir()
    (out / "best.ckpt").write_bytes(b"x")
    with pytest.raises(Exception, match="not part of a results snapshot"):
        snapshot(out, [runs], [], "make results", None)


def test_readme_block_is_spliced_from_the_snapshot(tmp_path):
    out = _snapshot(tmp_path)
    (out / "tune_toy").mkdir()
    (out / "tune_toy" / HEADLINE).write_text("| comparison (tuned) |\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{readme_block(tmp_path / 'none')}\n\n## Next\n")
    assert NOT_GENERATED in readme.read_text()
    splice_readme(readme, out)
    text = readme.read_text()
    assert (out / HEADLINE).read_text().strip() in text and NOT_GENERATED not in text
    assert "Tuned (the snapshot's `tune_toy/`):\n\n| comparison (tuned) |" in text
    assert text.endswith("## Next\n")
    # The README's short form: the verdict tables, the per-experiment rows left to the docs page.
    splice_readme(readme, out, short=True)
    short = readme.read_text()
    assert "| fewer parameters | RecurrentMLP | supported | supported |" in short
    assert "Tuned (the snapshot's `tune_toy/`):\n\n| comparison (tuned) |" in short
    assert "score − stacked +0.100 [" in text and "score − stacked" not in short
    assert "docs/reproducing.md#headline" in short and short.endswith("## Next\n")
    assert readme_block(tmp_path / "none", short=True) == readme_block(tmp_path / "none")


@pytest.mark.slow  # re-renders every table of the committed snapshot (315 runs: about 30 s)
def test_committed_snapshot_is_what_score_report_makes_of_its_runs():
    """On the committed docs/results/ when present; otherwise the README must say so honestly."""
    readme = (REPO / "README.md").read_text()
    page = (REPO / "docs" / "reproducing.md").read_text()
    assert README_START in readme and README_END in readme
    assert readme_block(COMMITTED, short=True) in readme  # the README's headline is the snapshot's
    assert readme_block(COMMITTED) in page  # and docs/reproducing.md holds all of it
    if (COMMITTED / RECORD).is_file():
        assert check(COMMITTED) == []
    else:
        assert NOT_GENERATED in readme and NOT_GENERATED in page
        assert not COMMITTED.exists() or not any(COMMITTED.glob("*.md"))


@pytest.mark.slow
def test_tiny_real_sweep_to_a_checked_snapshot(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli("-m", "depth=score,stacked", "seed=0,1", "task.max_epochs=1",
                  f"hydra.sweep.dir={sweep}", *QUIET, env=cli_env(OMP_NUM_THREADS="1"))  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    snap = tmp_path / "results"
    proc = run_cli(str(sweep), "--out", str(snap), "--wall", "1 min", module="score_exp.report.snapshot")  # fmt: skip
    # default numerics (and maybe a dirty tree): refused unless asked, then marked
    assert proc.returncode == 2 and "refusing to publish" in proc.stderr, proc.stderr[-3000:]
    proc = run_cli(str(sweep), "--out", str(snap), "--wall", "1 min", "--allow-unpublishable",
                   module="score_exp.report.snapshot")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "published anyway" in (snap / "PROVENANCE.md").read_text()
    assert not list(snap.rglob("*.ckpt")) and (snap / "runs.csv").is_file()
    assert "score − stacked" in (snap / HEADLINE).read_text()
    check_proc = run_cli("--check", "--out", str(snap), module="score_exp.report.snapshot")
    assert check_proc.returncode == 0, check_proc.stderr


def test_provenance_says_dirty_only_for_changes_other_than_the_snapshot_itself(
    tmp_path, monkeypatch
):
    """Re-publishing over a committed snapshot rewrites tracked files; that alone is no
    "uncommitted changes" (it was, before the state of the tree was asked first)."""
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    monkeypatch.chdir(tmp_path)
    runs, out = _synthetic_runs(tmp_path), tmp_path / "docs" / "results"
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", "code.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    snapshot(out, [runs], [], "make results", None)
    git("add", "docs")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "snapshot")
    snapshot(out, [runs], [], "make results", None)  # rewrites (and first clears) its files
    assert "uncommitted" not in (out / PROVENANCE).read_text()
    (tmp_path / "code.py").write_text("x = 2\n")
    snapshot(out, [runs], [], "make results", None)
    assert "(with uncommitted changes)" in (out / PROVENANCE).read_text()
