"""Cluster plumbing without a cluster: whose job it is, job names, requeue checkpoints."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import REPO

from score_exp.runs import cluster


def test_only_a_job_in_the_submitters_place_watches_it(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv(cluster.PARENT_WHERE_ENV, cluster.where())
    assert cluster.submitter_here()  # joblib, submitit_local, local DDP ranks
    monkeypatch.setenv("SLURM_JOB_ID", "17")  # a Slurm job submitted from here
    assert not cluster.submitter_here()
    monkeypatch.setenv(cluster.PARENT_WHERE_ENV, cluster.where())  # a joblib sweep inside job 17
    assert cluster.submitter_here()
    host, ns, job = cluster.where().split("|")
    monkeypatch.setenv(cluster.PARENT_WHERE_ENV, f"{host}|pid:[1]|{job}")  # another namespace
    assert not cluster.submitter_here()


def test_a_slurm_job_never_starts_the_parent_watchdog():
    # The submitter's PID does not exist where the job runs: the watchdog would stop the job.
    code = (
        "import os; from score_exp.runs import cluster; from score_exp.runs import sweeps;"
        "os.environ[sweeps.PARENT_ENV] = '999999999';"
        "os.environ[cluster.PARENT_WHERE_ENV] = 'login-node|pid:[1]|';"
        "os.environ['SLURM_JOB_ID'] = '5';"
        "sweeps.watch_parent(); print(sweeps._watching)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_job_name_holds_the_experiment_and_the_sweep_overrides():
    name = cluster.job_name(
        "esol_mlp",
        ["trainer.enable_progress_bar=false", "depth=score,stacked", "seed=0,1", "+a='b c'"],
        ["trainer.enable_progress_bar"],
    )
    assert name == "esol_mlp:depth=score,stacked,seed=0,1,+a=_bc_"
    assert (
        cluster.job_name("gpt", []) == "gpt"
        and len(cluster.job_name("x", ["k=" + "v" * 500])) == 120
    )


def _ckpt(path, step):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {}}, path)


def test_the_requeue_handlers_checkpoint_is_resumed_from_and_leaves_no_orphan(tmp_path):
    _ckpt(tmp_path / "checkpoints" / "last.ckpt", 10)
    _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 12)  # Lightning's auto-requeue, older than the next
    _ckpt(tmp_path / "hpc_ckpt_2.ckpt", 15)
    assert cluster.resume_point(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 15
    assert sorted(p.name for p in tmp_path.rglob("*.ckpt")) == ["last.ckpt"]


def test_an_older_or_unreadable_requeue_checkpoint_does_not_replace_last(tmp_path):
    _ckpt(tmp_path / "checkpoints" / "last.ckpt", 20)
    _ckpt(tmp_path / "hpc_ckpt_1.ckpt", 12)
    (tmp_path / "hpc_ckpt_2.ckpt").write_bytes(b"truncated")
    assert cluster.resume_point(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 20
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert len(list(tmp_path.glob("hpc_ckpt_2.ckpt.unreadable-*"))) == 1


def test_an_unreadable_checkpoint_is_moved_aside_one_way_wherever_it_is_found(tmp_path):
    import datetime

    from score_exp.runs.record import ASIDE_STAMP

    (tmp_path / "hpc_ckpt_3.ckpt").write_bytes(b"truncated")  # a requeue's
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"truncated")  # a run's own
    assert cluster.resume_point(tmp_path) is None
    aside = sorted(tmp_path.rglob("*.unreadable-*"))
    assert [p.name.split(".unreadable-")[0] for p in aside] == ["last.ckpt", "hpc_ckpt_3.ckpt"]
    for p in aside:  # one timestamp format, the run folders' too (overwrite=true)
        datetime.datetime.strptime(p.name.split(".unreadable-")[1], ASIDE_STAMP)


def test_segments_count_requeues_of_the_same_job(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (tmp_path / "results.json").write_text(
        json.dumps({"status": "interrupted", "segments_wall_time_s": [3.0], "requeues": 0,
                    "slurm": {"job_id": "7", "restart_count": 0}})
    )  # fmt: skip
    seg = cluster.segments(tmp_path, resuming=True)
    assert seg["walls"] == [3.0] and seg["requeues"] == 1
    assert cluster.segments(tmp_path, resuming=False)["walls"] == []  # a fresh start
