"""Callbacks injected into real CLI runs by the tests (``+callbacks.NAME._target_=sweep_helpers.X``)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    """Sends SIGTERM to its own process at the first training batch of ``epoch`` (or at ``step``).

    This is what a cluster does to a pre-empted job; Lightning turns it into an exception that
    ends the run, which must then resume from ``checkpoints/last.ckpt``. Only a fresh run is
    killed: re-running the same command (same config, same fingerprint) resumes to the end.
    """

    def __init__(self, epoch: int | None = None, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.ckpt_path is not None:
            return  # a resumed run
        at_epoch = self.epoch is not None and trainer.current_epoch == self.epoch and batch_idx == 0
        at_step = self.step is not None and trainer.global_step == self.step
        if at_epoch or at_step:
            os.kill(os.getpid(), signal.SIGTERM)


class ZeroWeightsFrom(L.Callback):
    """Zeroes every parameter at the start of each epoch from ``epoch`` on (fresh or resumed):
    later epochs are then worse than the earlier best, whatever the machine's rounding."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import torch

        if trainer.current_epoch >= self.epoch:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.zero_()


class SlurmInterruptAt(L.Callback):
    """In a Slurm job's first segment, asks Slurm to interrupt this job at ``epoch``.

    ``how="usr2"``: ``scancel --signal=USR2``, the signal Slurm sends ``signal_delay_s`` before a
    job's time limit (submitit's checkpoint/requeue handler takes it). ``how="requeue"``:
    ``scontrol requeue``, what pre-emption or an administrator does (SIGTERM, then requeue).
    Training then slows down (0.5 s per batch) until the signal ends it. A requeued segment
    (``SLURM_RESTART_COUNT`` > 0) and a run outside Slurm do nothing, so the same config trains
    uninterrupted locally (the reference) and interrupted once under Slurm.
    """

    def __init__(self, epoch: int, how: str = "usr2") -> None:
        self.epoch, self.how, self.asked = epoch, how, False

    def _first_segment_in_slurm(self) -> bool:
        return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import subprocess

        if trainer.current_epoch != self.epoch or not self._first_segment_in_slurm():
            return
        env = os.environ
        job = env["SLURM_JOB_ID"]
        if "SLURM_ARRAY_JOB_ID" in env:
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        cmd = (
            ["scancel", "--signal=USR2", job]
            if self.how == "usr2"
            else ["scontrol", "requeue", job]
        )
        if trainer.global_rank == 0:  # one request per job, whatever its ranks
            subprocess.run(cmd, check=True, timeout=60)
        self.asked = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        if self.asked:
            time.sleep(0.5)


class SlowBatches(L.Callback):
    """Sleeps ``seconds`` before every training batch: a job that is still training when a test
    acts on it (the numbers do not change). ``first_segment``: only in a Slurm job's first
    segment (a requeued one runs at full speed)."""

    def __init__(self, seconds: float = 0.2, first_segment: bool = False) -> None:
        self.seconds, self.first_segment = seconds, first_segment

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        if self.first_segment and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0:
            return
        time.sleep(self.seconds)


class BumpRequeued:
    """Starts requeued jobs now: Slurm holds a requeued job for 2 minutes (BeginTime). ``env``:
    the cluster's environment (its ``SLURM_CONF``); None = this process's."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        import threading

        self.env = env
        self.bumped: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _slurm(self, *cmd: str) -> str:
        import subprocess

        return subprocess.run(cmd, capture_output=True, text=True, env=self.env).stdout

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for line in self._slurm("squeue", "-h", "-t", "PD", "-o", "%i %r").splitlines():
                job, _, reason = line.partition(" ")
                if reason.strip() == "BeginTime":
                    self._slurm("scontrol", "update", f"JobId={job}", "StartTime=now")
                    self.bumped.append(job)

    def __enter__(self) -> BumpRequeued:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
