"""Sweeps and data-parallel runs on a real Slurm (``make test-cluster``: scripts/slurm_local.sh).

Every test submits real jobs to a single-node Slurm 22.05 (munged + slurmctld + slurmd) and
checks numbers: results equal to local runs of the same configs, job ids, folder bytes, segment
counts. Without a running Slurm they skip with one line, and fail instead where ``$CI`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import QUIET, REPO, TINY, cli_env, load_results, run_cli, train_cli
from sweep_helpers import BumpRequeued

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# One CPU and 1 GB per task fit a small CI machine's node (2 CPUs); slurm_cpu's defaults are
# sized for a real CPU partition.
SMALL = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
SUFFIX = ",task.model.hidden=32,trainer.max_epochs=2"
JOB_TIMEOUT = 240  # seconds any one submission may take before a test fails with the queue


def _conf() -> Path:
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"])
    out = subprocess.run(
        [str(REPO / "scripts" / "slurm_local.sh"), "conf"], capture_output=True, text=True
    )
    return Path(out.stdout.strip())


@pytest.fixture(scope="session")
def slurm():
    """The running test cluster's environment (``SLURM_CONF`` set); skips (fails in CI) if none."""
    conf = _conf()
    env = {**os.environ, "SLURM_CONF": str(conf)}
    why = None
    if not conf.is_file():
        why = f"no Slurm config at {conf}"
    else:
        try:
            ping = subprocess.run(
                ["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=20
            )
            state = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"],
                env=env,
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.split()
            if ping.returncode or "UP" not in ping.stdout:
                said = (ping.stdout.strip() or ping.stderr.strip() or "-").splitlines()[0]
                why = f"slurmctld does not answer ({said})"
            elif not set(state) & {"idle", "mixed", "allocated"}:
                why = f"the node is not usable (state {state})"
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"no Slurm commands ({e})"
    if why:
        message = f"Slurm is not running: {why}; `make test-cluster` starts one"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    os.environ["SLURM_CONF"] = str(conf)
    return env


def job_env(**extra: str) -> dict[str, str]:
    # One thread, as a 1-CPU job has: the local reference runs take the same float sums.
    env = cli_env(OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env["PYTHONPATH"]])
    return env


def sh(*cmd: str, timeout: float = 60) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr.strip()}"
    return out.stdout


def wait_until(pred, timeout: float, what: str, every: float = 0.5):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def probe_job_id() -> int:
    """The id Slurm gives the next job (a 1-second job that is submitted and forgotten)."""
    return int(
        sh("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true").strip().split(";")[0]
    )


def jobs_named(prefix: str) -> list[str]:
    out = sh("squeue", "-h", "-o", "%j")
    return [n for n in out.split("\n") if n.startswith(prefix)]


def folder_bytes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def slurm_sweep(sweep_dir: Path, *overrides: str, env=None, **kw):
    return run_cli(
        "-m",
        "hydra/launcher=slurm_cpu",
        f"hydra.sweep.dir={sweep_dir}",
        *SMALL,
        *QUIET,
        *overrides,
        env=env or job_env(),
        timeout=JOB_TIMEOUT,
        **kw,
    )


# ----------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def slurm_sweep_dir(slurm, tmp_path_factory):
    """A 2-job sweep on Slurm (one array job) and the same configs trained locally."""
    root = tmp_path_factory.mktemp("slurm")
    t0 = time.monotonic()
    out = slurm_sweep(root / "sweep", "depth=score,stacked", *TINY)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"\n2-job Slurm sweep: {elapsed:.1f} s")
    local = run_cli(
        "-m",
        f"hydra.sweep.dir={root / 'local'}",
        *QUIET,
        "depth=score,stacked",
        *TINY,
        env=job_env(),
    )
    assert local.returncode == 0, local.stderr[-3000:]
    return root, out


def test_sweep_on_slurm_finishes_ok_with_the_local_numbers(slurm_sweep_dir):
    root, out = slurm_sweep_dir
    for depth in ("score", "stacked"):
        name = f"depth={depth}{SUFFIX}"
        got, want = load_results(root / "sweep" / name), load_results(root / "local" / name)
        assert got["status"] == "ok", got
        assert got["slurm"]["restart_count"] == 0 and got["requeues"] == 0
        # Same machine, same seed, CPU: the job under Slurm takes the same steps bit for bit.
        assert got["test"] == want["test"] and got["best_val"] == want["best_val"]
    assert "sweep summary: 2 job(s), 2 launched, 0 skipped" in out.stderr
    # One array job, named after the experiment and the sweep's overrides.
    log = Path(os.environ["SLURM_CONF"]).with_name("jobcomp.txt").read_text()
    ids = {
        got["slurm"]["job_id"].split("_")[0]
        for got in map(load_results, (root / "sweep").glob("depth=*"))
    }
    assert len(ids) == 1
    assert "Name=esol_mlp:depth=score,stacked" in log


def test_rerun_of_a_finished_sweep_submits_nothing_and_leaves_folders_byte_identical(
    slurm_sweep_dir,
):
    root, _ = slurm_sweep_dir
    sweep_dir = root / "sweep"
    runs = sorted(p for p in sweep_dir.iterdir() if p.name.startswith("depth="))
    before = {p.name: folder_bytes(p) for p in runs}
    first = probe_job_id()
    t0 = time.monotonic()
    out = slurm_sweep(sweep_dir, "depth=score,stacked", *TINY)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    # No job was submitted in between: the next probe takes the very next id.
    assert probe_job_id() == first + 1
    assert "sweep summary: 2 job(s), 0 launched, 2 skipped (already finished)" in out.stderr
    assert {p.name: folder_bytes(p) for p in runs} == before
    print(f"\nre-run of the finished sweep: {elapsed:.1f} s, no job submitted")


# ----------------------------------------------------------------------------- data parallelism

DDP = ["trainer=ddp_cpu", *TINY, "task.model.dropout=0"]


def job_state(job: str) -> dict[str, str]:
    """``scontrol show job``'s fields of ``job`` (kept MinJobAge=600 s after it ends)."""
    out = sh("scontrol", "show", "job", "-o", job)
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def run_seconds(state: dict[str, str]) -> int:
    h, m, s = (state["RunTime"].split("-")[-1]).split(":")
    return int(h) * 3600 + int(m) * 60 + int(s)


def srun_train(run_dir: Path, *overrides: str, ntasks: int = 2) -> tuple[int, int, list[str]]:
    """``sbatch`` + ``srun score-train`` on ``ntasks`` ranks (a user's batch script); returns the
    job's exit code, its run time in seconds (Slurm's) and each rank's stderr."""
    logs = run_dir.parent / f"{run_dir.name}-logs-{time.monotonic_ns()}"
    logs.mkdir()
    args = " ".join(f"'{a}'" for a in (f'hydra.run.dir="{run_dir}"', *QUIET, *overrides))
    script = (
        f"srun --error={logs}/rank%t.err --output={logs}/rank%t.out "
        f"{sys.executable} -m score_exp.cli.train {args}"
    )
    # --time=3: a job that hangs (as a re-run did, for 30 minutes) ends within 3 minutes.
    job = subprocess.run(
        ["sbatch", "--parsable", f"--ntasks={ntasks}", f"--ntasks-per-node={ntasks}",
         "--cpus-per-task=1", "--mem=1G", "--time=3", "-J", "score_srun",
         "-o", f"{logs}/batch.out", "--wrap", script],
        env=job_env(), capture_output=True, text=True, timeout=60, cwd=REPO, check=True,
    ).stdout.strip()  # fmt: skip
    ended = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    state = wait_until(
        lambda: (st := job_state(job))["JobState"] in ended and st, JOB_TIMEOUT, f"job {job}"
    )
    errs = [(logs / f"rank{r}.err").read_text() for r in range(ntasks)]
    return int(state["ExitCode"].split(":")[0]), run_seconds(state), errs


@pytest.fixture(scope="module")
def slurm_ddp(slurm, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_ddp")
    out = slurm_sweep(root / "sweep", *DDP, "hydra.launcher.tasks_per_node=2")
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = [p for p in (root / "sweep").iterdir() if p.name.startswith("task.")]
    local = train_cli(root / "local", *DDP, env=job_env(), timeout=JOB_TIMEOUT)
    assert local.returncode == 0, local.stderr[-3000:]
    return run_dir, root / "local"


def test_two_rank_ddp_under_slurm_equals_local_ddp_bit_for_bit(slurm_ddp):
    run_dir, local = slurm_ddp
    got, want = load_results(run_dir), load_results(local)
    assert got["status"] == "ok"
    assert got["test"] == want["test"] and got["best_val"] == want["best_val"]
    assert got["params"] == want["params"]
    # Both ranks ran (srun started them): rank 1 logged beside rank 0, into its own file.
    assert (run_dir / "train.log").exists() and (run_dir / "train_rank1.log").exists()


def test_rerun_of_a_finished_ddp_job_exits_at_once_on_every_rank(slurm_ddp):
    run_dir, _ = slurm_ddp
    before = folder_bytes(run_dir)
    overrides = [o for o in load_results(run_dir)["overrides"] if not o.startswith("hydra")]
    code, elapsed, errs = srun_train(run_dir, *overrides)
    assert code == 0, errs
    assert "already finished" in errs[0]
    assert "resuming" not in errs[1] and "Traceback" not in errs[1], errs[1][-2000:]
    assert folder_bytes(run_dir) == before
    # Was: rank 1 waited 1,800 s for rank 0 in the rendezvous (here: until the 3-minute limit).
    assert elapsed < 120, f"the re-run took {elapsed} s"
    print(f"\nre-run of a finished 2-rank job: {elapsed} s (Slurm RunTime)")


def test_a_refused_ddp_job_fails_on_every_rank_with_the_same_line(slurm_ddp):
    from score_exp.runs.lock import RunLock

    run_dir, _ = slurm_ddp
    before = folder_bytes(run_dir)
    overrides = [o for o in load_results(run_dir)["overrides"] if not o.startswith("hydra")]
    with RunLock(run_dir):  # another process trains in the folder
        # skip_finished=false (a cosmetic key): the run would resume, but the folder is in use
        code, elapsed, errs = srun_train(run_dir, *overrides, "skip_finished=false")
    assert code != 0
    lines = [[ln for ln in e.splitlines() if ln.startswith("score-train: error:")] for e in errs]
    assert len(lines[0]) == 1 and lines[0] == lines[1], errs
    assert "is in use" in lines[0][0]
    assert elapsed < 120, f"the refused job took {elapsed} s"
    after = folder_bytes(run_dir)
    after.pop(".lock"), before.pop(".lock")  # this test's own lock wrote its pid there
    assert after == before


# ----------------------------------------------------------------------------- requeue

REQUEUE = [
    "trainer.max_epochs=4",
    "task.model.hidden=32",
    "callbacks.early_stopping=null",
    "logger=wandb",
    "+callbacks.interrupt._target_=sweep_helpers.SlurmInterruptAt",
    "+callbacks.interrupt.epoch=2",
]


@pytest.mark.parametrize("how", ["usr2", "requeue"])
def test_interrupted_job_is_requeued_and_ends_with_the_uninterrupted_numbers(slurm, tmp_path, how):
    """``usr2``: the time-limit signal (submitit requeues); ``requeue``: pre-emption."""
    overrides = [*REQUEUE, f"+callbacks.interrupt.how={how}"]
    ref = train_cli(tmp_path / "ref", *overrides, env=job_env(), timeout=JOB_TIMEOUT)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # timeout_min=10: submitit deems any USR2 a time limit (10 min - 10 min guaranteed).
    t0 = time.monotonic()
    with BumpRequeued() as bump:
        out = slurm_sweep(tmp_path / "sweep", *overrides, "hydra.launcher.timeout_min=10")
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    assert bump.bumped, "the job was never requeued"
    (run_dir,) = [p for p in (tmp_path / "sweep").iterdir() if p.name.startswith("+callbacks")]
    got, want = load_results(run_dir), load_results(tmp_path / "ref")
    assert got["status"] == "ok", got
    assert got["requeues"] == 1 and len(got["segments_wall_time_s"]) == 2
    assert got["slurm"]["restart_count"] == 1
    assert got["wall_time_s"] == pytest.approx(sum(got["segments_wall_time_s"]))
    assert min(got["segments_wall_time_s"]) > 0
    assert got["best_val"] == want["best_val"] and got["test"] == want["test"]
    # Resumed from the last checkpoint: no orphan checkpoint anywhere in the run.
    ckpts = sorted(p.name for p in run_dir.rglob("*.ckpt"))
    assert ckpts == sorted(["last.ckpt", Path(got["best_checkpoint"]).name]), ckpts
    # One W&B run, continued: two segments logged under the same id.
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2 and len(ids) == 1
    print(f"\nrequeue cycle ({how}): {elapsed:.1f} s for the sweep with one requeue")


# ----------------------------------------------------------------------------- jobs outlive the submitter


def test_job_outlives_a_killed_submitter(slurm, slurm_sweep_dir, tmp_path):
    root, _ = slurm_sweep_dir
    sweep_dir = tmp_path / "sweep"
    # 0.3 s per batch: the job is still training (about 10 s) when its submitter dies.
    slow = ["+callbacks.slow._target_=sweep_helpers.SlowBatches", "+callbacks.slow.seconds=0.3"]
    cmd = [sys.executable, "-m", "score_exp.cli.train", "-m", "hydra/launcher=slurm_cpu",
           f"hydra.sweep.dir={sweep_dir}", *SMALL, *QUIET, "depth=score", *TINY, *slow]  # fmt: skip
    submitter = subprocess.Popen(
        cmd, cwd=REPO, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        # The job has claimed its folder (score-train runs in it): end the submitting shell.
        (claimed,) = wait_until(
            lambda: list(sweep_dir.glob("*/fingerprint.json")), JOB_TIMEOUT, "the job to start"
        )
        run_dir = claimed.parent
        submitter.send_signal(signal.SIGTERM)
        submitter.wait(60)
        assert not (run_dir / "results.json").exists(), "the job ended before its submitter"
        wait_until(
            lambda: (
                (run_dir / "results.json").exists() and load_results(run_dir)["status"] != "running"
            ),
            JOB_TIMEOUT,
            "the job to end",
        )
    finally:
        if submitter.poll() is None:
            submitter.kill()
    got = load_results(run_dir)
    assert got["status"] == "ok", got
    assert got["test"] == load_results(root / "local" / f"depth=score{SUFFIX}")["test"]


def _free_pid_run(n: int = 4) -> int:
    """A PID below the highest in use with ``n`` unused PIDs from it on (not reused soon)."""
    used = {int(p) for p in os.listdir("/proc") if p.isdigit()}
    holes = (p for p in range(300, max(used)) if not any(p + i in used for i in range(n)))
    return next(holes, max(used) + 2000)


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
def test_job_whose_submitter_is_in_another_pid_namespace_finishes_ok(
    slurm, slurm_sweep_dir, tmp_path
):
    root, _ = slurm_sweep_dir
    sweep_dir = tmp_path / "sweep"
    args = " ".join(
        f"'{a}'" for a in ("-m", "hydra/launcher=slurm_cpu", f"hydra.sweep.dir={sweep_dir}",
                           *SMALL, *QUIET, "depth=score", *TINY)
    )  # fmt: skip
    # Inside the namespace the submitter gets a PID that no process has outside it (burn PIDs
    # up to it first), as a submitter on another node would: the job must not stop for it.
    target = _free_pid_run()
    script = (
        f'while n=$(sh -c "echo \\$\\$"); [ "$n" -lt {target - 1} ]; do :; done; '
        f"{sys.executable} -m score_exp.cli.train {args}; exit $?"  # not exec'd: PID `target`
    )
    out = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "bash", "-c", script],
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = load_results(sweep_dir / f"depth=score{SUFFIX}")
    assert got["status"] == "ok", got
    assert got["test"] == load_results(root / "local" / f"depth=score{SUFFIX}")["test"]
    assert json.loads(json.dumps(got["slurm"]))["restart_count"] == 0
