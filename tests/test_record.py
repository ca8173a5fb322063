"""The run record (results.json through RunRecord), the run folder's names, the non-identity keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from score_exp.errors import ConfigError
from score_exp.report.runs import Run, varied_keys
from score_exp.runs.files import atomic_write_json
from score_exp.runs.fingerprint import (
    NON_IDENTITY,
    dirname_exclude_keys,
    fingerprint,
    run_identity,
)
from score_exp.runs.record import (
    RESULTS,
    SCHEMA_VERSION,
    RecordError,
    RunFolder,
    RunRecord,
)

REPO = Path(__file__).resolve().parents[1]

# results.json as score-train wrote it before schema_version existed (key order included):
# a reference model's run (nfe null) with a null depth preset, and a depth run.
OLD_REFERENCE = {
    "task": "esol_gnn", "status": "ok", "seed": 0,
    "depth": {"share": True, "update": "contractive", "steps": 4, "dt": 0.25, "integrator": "euler"},
    "depth_preset": None, "experiment": "x", "run_dir": "/runs/a", "versions": {"torch": "2.13.0"},
    "git": None, "overrides": ["task/model=attentivefp"], "params": 1234, "nfe": None,
    "reference": "attentivefp", "time_per_epoch_s": None, "time_per_step_s": 0.01,
    "epochs_timed": 0, "wall_time_s": 3.5, "segments_wall_time_s": [3.5], "requeues": 0,
    "best_val": {"metric": "val/rmse", "value": 0.9, "epoch": 1, "step": 20},
    "best_checkpoint": "checkpoints/best-1-20.ckpt", "val": {"rmse": 0.9}, "test": {"rmse": 1.0},
}  # fmt: skip
OLD_DEPTH = {
    "task": "esol_mlp", "status": "diverged", "seed": 1, "depth": OLD_REFERENCE["depth"],
    "depth_preset": "score", "experiment": None, "run_dir": "/runs/b", "versions": {},
    "git": "abc", "overrides": [], "slurm": {"job_id": "7", "restart_count": 1}, "params": 99,
    "nfe": 4, "time_per_epoch_s": 0.5, "time_per_step_s": 0.01, "epochs_timed": 2,
    "wall_time_s": 3.5, "segments_wall_time_s": [1.5, 2.0], "requeues": 1,
    "diverged_at": {"epoch": 1, "step": 9, "loss": "nan"},
    "best_val": {"metric": "val/rmse", "value": 0.9, "epoch": 0, "step": 5},
    "best_checkpoint": "checkpoints/best-0-5.ckpt", "final_steps": 6,
    "learned_dt": [0.25, 0.3], "connection_weights": [[1.0]], "solver": {"tol": 1e-4},
}  # fmt: skip


@pytest.mark.parametrize("old", [OLD_REFERENCE, OLD_DEPTH])
def test_a_record_round_trips_and_keeps_todays_format(tmp_path, old):
    # An old results.json (no schema_version) reads as version 1 ...
    atomic_write_json(tmp_path / RESULTS, old)
    record = RunRecord.load(tmp_path)
    assert record.schema_version == 1 == SCHEMA_VERSION and record.extra == {}
    assert record.to_dict() == {"schema_version": 1, **old}
    # ... and is written back byte for byte as before, with the version in front.
    record.save(tmp_path)
    expected = json.dumps({"schema_version": 1, **old}, indent=2) + "\n"
    assert (tmp_path / RESULTS).read_text() == expected
    assert RunRecord.load(tmp_path / RESULTS) == record


def test_keys_a_version_does_not_know_are_kept():
    record = RunRecord.from_dict({"status": "ok", "from_a_script": [1, 2]})
    assert record.extra == {"from_a_script": [1, 2]} and record.ok
    assert record.to_dict()["from_a_script"] == [1, 2]
    with pytest.raises(AttributeError, match="no field 'from_a_script'"):
        record.update(from_a_script=3)


@pytest.mark.parametrize(
    "content, reason",
    [
        ('{"schema_version": 2, "status": "ok"}', "schema_version 2 is newer than this score_exp"),
        ('{"schema_version": "one"}', "schema_version is 'one', not a version number"),
        ('{"status": "o', "JSONDecodeError"),
        ("[]", "a JSON list, not an object"),
        ('{"test": {"rmse": "low"}}', "test.rmse is 'low', not a number"),
        ('{"seed": true}', "seed is True, not an integer"),
    ],
)
def test_an_unknown_version_or_an_unreadable_record_is_one_line(tmp_path, content, reason):
    (tmp_path / RESULTS).write_text(content)
    with pytest.raises(RecordError) as e:
        RunRecord.load(tmp_path)
    assert isinstance(e.value, ConfigError)  # the CLIs' one line, exit 2
    assert str(e.value).startswith(f"{tmp_path / RESULTS}: ") and reason in str(e.value)
    assert "\n" not in str(e.value)
    assert RunFolder(tmp_path).finished_record() is None  # a reader that only asks "finished?"


def test_a_newer_record_is_listed_unreadable_by_the_report(tmp_path):
    from score_exp.report.runs import scan_runs

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / RESULTS).write_text('{"schema_version": 99, "status": "ok"}')
    runs, unreadable = scan_runs([tmp_path])
    assert runs == [] and len(unreadable) == 1
    assert unreadable[0][1].startswith("results.json: schema_version 99 is newer")


def test_the_committed_snapshot_reads_through_the_record():
    """Every run of docs/results/ (results.json of older runs) is a version-1 record, unchanged."""
    rec = json.loads((REPO / "docs" / "results" / "runs.json").read_text())
    assert rec["runs"]
    for run in rec["runs"]:
        record = RunRecord.from_dict(run["results"])
        assert record.schema_version == 1
        out = record.to_dict()
        assert {k: out[k] for k in run["results"]} == run["results"]  # nothing lost or changed


def test_an_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    folder = RunFolder(tmp_path)
    RunRecord(task="toy", status="running").save(folder)
    before = folder.results.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        RunRecord(task="toy", status="ok", test={"rmse": 0.5}).save(folder)
    assert folder.results.read_bytes() == before  # the old record, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULTS]  # no temporary file left


def test_a_record_is_never_written_through_a_link(tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    (run / RESULTS).symlink_to(elsewhere)
    with pytest.raises(RecordError, match="the file is a symbolic link"):
        RunRecord.load(run)
    RunRecord(status="ok").save(run)  # replaces the link itself
    assert elsewhere.read_text() == "{}" and not (run / RESULTS).is_symlink()


def test_the_run_folder_names_its_files(tmp_path):
    f = RunFolder(tmp_path / "run")
    names = [f.config, f.results, f.fingerprint, f.metrics, f.splits, f.eval_csv, f.lock]
    assert [p.name for p in names] == [
        "config.yaml", "results.json", "fingerprint.json", "metrics.csv", "splits.json",
        "eval.csv", ".lock",
    ]  # fmt: skip
    assert f.last_checkpoint == tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert f.moved_aside == tmp_path / ".overwritten"
    assert RunFolder.hydra_file("overrides.yaml") == ".hydra/overrides.yaml"


# ----------------------------------------------------------------------------- non-identity keys


def _set(cfg: dict, key: str, value) -> dict:
    """``cfg`` with the dotted ``key`` set to ``value`` (its parents made where missing)."""
    node = cfg
    *parents, last = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return cfg


def test_the_fingerprint_the_folder_names_and_the_report_leave_out_the_same_keys(compose, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose("task=esol_mlp")
    base = OmegaConf.to_container(cfg, resolve=False)
    identity = run_identity(base, tmp_path)
    # 1. the fingerprint: no non-identity key is in it, and changing one changes nothing.
    assert not [k for k in identity if any(k == c or k.startswith(c + ".") for c in NON_IDENTITY)]
    for key in NON_IDENTITY:
        other = _set(json.loads(json.dumps(base)), key, "changed")
        assert fingerprint(run_identity(other, tmp_path)) == fingerprint(identity), key
    # 2. the folder names: Hydra's exclude_keys in configs/train.yaml is exactly the list.
    train_yaml = yaml.safe_load((REPO / "configs" / "train.yaml").read_text())
    exclude = train_yaml["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"]
    assert exclude == dirname_exclude_keys() and set(NON_IDENTITY) <= set(exclude)
    # 3. the report: runs that differ only in non-identity keys are one variant.
    flat = {"task.name": "esol_mlp", "depth.steps": 4}
    runs = [
        Run(tmp_path / str(i), RunRecord(status="ok"), {**flat, key: i, f"{key}.sub": i})
        for i, key in enumerate(NON_IDENTITY)
    ]
    runs.append(Run(tmp_path / "x", RunRecord(status="ok"), dict(flat)))
    assert varied_keys(runs) == []
    assert varied_keys([*runs, Run(tmp_path / "y", RunRecord(), {**flat, "depth.steps": 8})]) == [
        "depth.steps"
    ]


def test_the_recorded_depth_fields_are_derived_from_depthspec():
    import dataclasses

    from score_exp.core import DepthSpec
    from score_exp.tasks.results import PAPER_DEPTH_FIELDS, UNRECORDED_DEPTH_FIELDS, depth_fields

    names = [f.name for f in dataclasses.fields(DepthSpec)]
    assert set(names) >= UNRECORDED_DEPTH_FIELDS and set(PAPER_DEPTH_FIELDS) <= set(names)
    paper = {k: getattr(DepthSpec(), k) for k in PAPER_DEPTH_FIELDS}
    assert depth_fields(DepthSpec()) == paper
    # Today's options as results.json records them: switched-on options, never their settings.
    spec = DepthSpec(connect="ancre", ancre_init=0.9, learn_dt="per_step", checkpoint=True)
    assert depth_fields(spec) == {**paper, "connect": "ancre", "learn_dt": "per_step"}
    # A field DepthSpec gains is recorded where it is switched on, with no edit of the record.
    field = dataclasses.field(default="off")
    wider = dataclasses.make_dataclass("Wider", [("new_option", str, field)], bases=(DepthSpec,))
    assert depth_fields(wider(new_option="on")) == {**paper, "new_option": "on"}
    assert depth_fields(wider()) == paper


def test_the_report_reads_a_runs_typed_record(tmp_path):
    from score_exp.report.runs import load_run

    record = RunRecord(task="esol_mlp", status="ok", seed=3, params=7, best_val={"value": 0.5},
                       depth={"steps": 4, "dt": 0.5}, test={"rmse": 0.7}, extra={"custom": 1})  # fmt: skip
    record.save(tmp_path)
    run = load_run(tmp_path)
    assert run.record == record
    assert (run.task, run.status, run.test_metric(), run.headline) == (
        "esol_mlp",
        "ok",
        0.7,
        "rmse",
    )
    assert run.get("depth.dt") == 0.5 and run.get("params") == 7 and run.get("custom") == 1
    assert run.get("best_val.value") == 0.5 and run.get("nfe") is None and run.get("x.y", 9) == 9


def test_runs_csv_columns_come_from_one_list(tmp_path):
    from score_exp.report.build import RUN_COLUMNS, TESTED, VARIED, runs_csv
    from score_exp.report.runs import Run

    runs = [
        Run(tmp_path / str(s), RunRecord(task="t", status="ok", seed=s, test={"rmse": 1.0 + s},
                                        best_val={"value": 0.5}, params=10, nfe=4),
            {"task.name": "t", "depth.steps": 4 + s})
        for s in range(2)
    ]  # fmt: skip
    header, first, _ = runs_csv(runs).splitlines()
    columns = header.split(",")
    expand = {VARIED: ["depth.steps"], TESTED: ["test/rmse"]}
    assert columns == [c for column in RUN_COLUMNS for c in expand.get(column, [column])]
    row = dict(zip(columns, first.split(","), strict=True))
    assert row["depth.steps"] == "4" and row["test/rmse"] == "1.0" and row["best_val"] == "0.5"
    assert row["params"] == "10" and row["nfe"] == "4" and row["wall_time_s"] == ""
