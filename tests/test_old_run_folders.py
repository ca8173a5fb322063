"""Run folders made by an older score_exp still read: ``tests/data/run_folders_24d7fbb/`` holds
the ``config.yaml`` and ``results.json`` of two tiny runs made by main at 24d7fbb, before the
modules moved into wings (issue 28): a Shakespeare run whose data module was then named
``score_exp.tasks.lm.ShakespeareDataModule``, and an ESOL MLP run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from score_exp.errors import ConfigError
from score_exp.runs import fingerprint as ident
from score_exp.runs.record import RunRecord
from score_exp.runs.safe_load import RENAMED_TARGETS, load_run_config, project_tasks

OLD = Path(__file__).parent / "data" / "run_folders_24d7fbb"
FOLDERS = sorted(p.name for p in OLD.iterdir())


@pytest.fixture
def old_run(tmp_path):
    def copy(name: str) -> Path:
        run_dir = tmp_path / name
        shutil.copytree(OLD / name, run_dir)
        return run_dir

    return copy


def _project_targets() -> set[str]:
    from score_exp.runs.safe_load import _project_task

    return {
        _project_task(t)[slot]["_target_"]
        for t in project_tasks()
        for slot in ("data", "model", "module")
    }


def test_the_fixture_names_a_target_that_has_moved():
    text = (OLD / "shakespeare" / "config.yaml").read_text()
    assert "score_exp.tasks.lm.ShakespeareDataModule" in text  # else this test proves nothing


@pytest.mark.parametrize("name", FOLDERS)
def test_an_old_folder_config_is_rebuilt_with_todays_targets(old_run, name):
    cfg = load_run_config(old_run(name))
    old = yaml.safe_load((OLD / name / "config.yaml").read_text())
    for slot in ("data", "model", "module"):
        target = cfg.task[slot]["_target_"]
        assert target == RENAMED_TARGETS.get(
            old["task"][slot]["_target_"], old["task"][slot]["_target_"]
        )
        assert target in _project_targets()
    assert cfg.seed == old["seed"] and cfg.task.name == old["task"]["name"]
    assert dict(cfg.depth) == old["depth"]


@pytest.mark.parametrize("name", FOLDERS)
def test_an_old_folder_record_reads_and_writes_back_identically(name):
    raw = json.loads((OLD / name / "results.json").read_text())
    record = RunRecord.load(OLD / name)
    assert record.ok and record.extra == {}
    assert record.to_dict() == raw
    assert list(record.to_dict()) == list(raw)  # the same keys, in the same order


def test_an_old_folder_keeps_its_identity_under_the_renamed_target(old_run):
    run_dir = old_run("shakespeare")
    stored = ident.stored_identity(run_dir)  # from config.yaml: the fixture has no fingerprint.json
    assert stored["task.data._target_"] == "score_exp.tasks.shakespeare.ShakespeareDataModule"
    # the same folder with a fingerprint.json naming the old path
    identity = {k: v for k, v in stored.items() if k != ident.LEGACY}
    old_identity = {**identity, "task.data._target_": "score_exp.tasks.lm.ShakespeareDataModule"}
    (run_dir / "fingerprint.json").write_text(
        json.dumps({"fingerprint": ident.fingerprint(old_identity), "identity": old_identity})
    )
    assert ident.stored_identity(run_dir) == identity


def test_the_rename_table_maps_old_names_to_todays_classes_only():
    assert set(RENAMED_TARGETS.values()) <= _project_targets()
    assert not set(RENAMED_TARGETS) & _project_targets()  # the configs name the new paths only


def test_an_unknown_old_target_is_still_refused(old_run):
    run_dir = old_run("shakespeare")
    path = run_dir / "config.yaml"
    path.write_text(
        path.read_text().replace("score_exp.tasks.lm.ShakespeareDataModule", "os.system")
    )
    with pytest.raises(ConfigError, match="os.system"):
        load_run_config(run_dir)
