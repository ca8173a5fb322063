"""Cluster plumbing without a cluster: whose job it is, job names, requeue checkpoints."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import REPO

from score_exp.runs import cluster, stop


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


# ----------------------------------------------------------------------------- a job's outcome


def test_a_collective_that_lost_its_peer_is_told_apart_from_a_ranks_own_error():
    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.231.77.12]:54944: "
        "Connection reset by peer. This is typically caused by a remote worker hanging"
    )
    assert stop.peer_lost(gloo)
    assert stop.peer_lost(RuntimeError("gloo ... Connection closed by peer [node2]:1234"))
    try:  # wrapped by whatever re-raised it
        try:
            raise gloo
        except RuntimeError as e:
            raise ValueError("metric sync failed") from e
    except ValueError as wrapped:
        assert stop.peer_lost(wrapped)
    assert not stop.peer_lost(RuntimeError("CUDA out of memory"))
    assert not stop.peer_lost(ValueError("peer review"))
    message = stop.peer_lost_message(gloo)
    assert message.startswith("a peer rank was lost (RuntimeError: ") and "train_rank" in message


def _failed_job(sweep_dir, run_dir, error):
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    config = OmegaConf.create(
        {"hydra": {"mode": "MULTIRUN", "sweep": {"dir": str(sweep_dir)},
                   "runtime": {"output_dir": str(run_dir)}}}
    )  # fmt: skip
    from hydra.types import RunMode

    config.hydra.mode = RunMode.MULTIRUN
    ret = JobReturn(overrides=["depth=score"], status=JobStatus.FAILED)
    ret._return_value = error
    return config, ret


def test_only_rank_0_records_a_data_parallel_jobs_failure_and_a_lost_peer_says_so(
    tmp_path, monkeypatch
):
    import json

    from score_exp.runs import sweeps

    monkeypatch.setenv(sweeps.SWEEP_ENV, "test")
    lost = RuntimeError("gloo: Connection closed by peer [10.231.77.12]:4242")
    config, ret = _failed_job(tmp_path, tmp_path / "run", lost)
    # rank 1 of an srun step: its error is in its own log, not the job's outcome
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_JOB_ID", "3")
    sweeps.SweepFailures().on_job_end(config, ret)
    assert not (tmp_path / "failed_jobs.jsonl").exists()
    monkeypatch.setenv("SLURM_PROCID", "0")
    sweeps.SweepFailures().on_job_end(config, ret)
    (row,) = [json.loads(x) for x in (tmp_path / "failed_jobs.jsonl").read_text().splitlines()]
    assert row["error"].startswith("a peer rank was lost (RuntimeError: gloo: Connection closed")
    assert row["run_dir"] == str(tmp_path / "run") and row["slurm"]["job_id"] == "3"


def test_a_job_that_failed_once_and_ended_ok_after_a_requeue_is_no_failure(
    tmp_path, monkeypatch, capsys
):
    import json

    from score_exp.runs import sweeps

    monkeypatch.setenv(sweeps.SWEEP_ENV, "test")
    for k in ("SLURM_STEP_ID", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sweeps, "_sweep_dir", tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    requeued, broken, refused = tmp_path / "requeued", tmp_path / "broken", tmp_path / "refused"
    for run in (requeued, broken, refused):
        config, ret = _failed_job(tmp_path, run, RuntimeError(f"boom {run.name}"))
        sweeps.SweepFailures().on_job_end(config, ret)
    # the requeued job's later segment ended ok; the other one's record still says failed; the
    # refused job's folder holds another job's finished run (another config, refused untouched)
    for run, record in [
        (requeued, {"status": "ok", "requeues": 1, "slurm": {"job_id": "12", "restart_count": 1}}),
        (broken, {"status": "failed", "error": "boom", "slurm": {"job_id": "12"}}),
        (refused, {"status": "ok", "slurm": {"job_id": "3", "restart_count": 0}}),
    ]:
        run.mkdir()
        (run / "results.json").write_text(json.dumps(record))
    assert sweeps.report_sweep_failures("score-train") == 2
    err = capsys.readouterr().err
    assert "2 job(s) of the sweep failed" in err and "boom requeued" not in err
    assert "boom broken" in err and "boom refused" in err


def test_the_sweep_summary_says_a_requeued_job_ended_ok(tmp_path, monkeypatch, capsys):
    import json
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from score_exp.runs import launch

    runs = []
    for name, record in [
        ("requeued", {"status": "ok", "requeues": 2}),
        ("plain", {"status": "ok", "requeues": 0}),
        ("failed", {"status": "failed", "requeues": 1}),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(record))
        cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path / name)}}})
        runs.append(SimpleNamespace(hydra_cfg=cfg))
    assert [launch._requeues_of_ok_run(r) for r in runs] == [2, 0, 0]
    assert launch._requeues_of_ok_run(SimpleNamespace(hydra_cfg=None)) == 0
    monkeypatch.setattr(
        launch, "_counts", {"launched": 3, "skipped": 1, "requeued_ok": 1, "requeues": 2}
    )
    launch.report("score-train")
    assert capsys.readouterr().err.strip() == (
        "score-train: sweep summary: 4 job(s), 3 launched, 1 skipped (already finished); "
        "1 requeued, ended ok (2 requeue(s) in all)"
    )
