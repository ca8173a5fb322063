"""Skip finished jobs before they are launched, whatever the sweeper and the launcher.

``score-train -m`` wraps the launcher Hydra builds (basic, joblib, submitit_local, Slurm; for the
basic sweeper and Optuna alike): before a batch goes to it, every job's run folder is checked
against its configuration (:func:`score_exp.runs.cluster.finished_run`, read only). A job whose folder
already holds its finished run is not launched (no process, no Slurm allocation, the folder stays
byte-identical) and counts as done with its recorded objective. The sweep ends with one summary
line (:func:`report`): how many jobs were launched and skipped. :func:`objective` is what a job
returns to the sweeper (a skipped one: from its recorded run).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from score_exp.errors import ConfigError
from score_exp.runs import cluster
from score_exp.runs.record import RunRecord, coerce

log = logging.getLogger("score_exp.runs.launch")

_counts: dict[str, int] | None = None  # this process's sweep: jobs launched and skipped


def install() -> None:
    """Wrap every launcher Hydra instantiates in this process (idempotent)."""
    from hydra.core.plugins import Plugins

    if getattr(Plugins.instantiate_launcher, "_score_exp", False):
        return
    original = Plugins.instantiate_launcher

    def instantiate_launcher(self, hydra_context, task_function, config):
        launcher = original(
            self, hydra_context=hydra_context, task_function=task_function, config=config
        )
        _wrap(launcher, hydra_context, config)
        return launcher

    instantiate_launcher._score_exp = True
    Plugins.instantiate_launcher = instantiate_launcher


def _wrap(launcher, hydra_context, config) -> None:
    global _counts
    _counts = {"launched": 0, "skipped": 0, "requeued_ok": 0, "requeues": 0}
    launch = launcher.launch

    def launch_unfinished(job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        done = {}
        for i, overrides in enumerate(job_overrides):
            ret = _finished(list(overrides), hydra_context, config)
            if ret is not None:
                done[i] = ret
        todo = [i for i in range(len(job_overrides)) if i not in done]
        _counts["skipped"] += len(done)
        _counts["launched"] += len(todo)
        if done:
            print(
                f"score-train: {len(done)} of {len(job_overrides)} job(s) already finished: "
                "not launched (their folders are left untouched)",
                file=sys.stderr,
            )
        ran = launch([job_overrides[i] for i in todo], initial_job_idx) if todo else []
        for ret in ran:  # jobs that Slurm requeued (pre-emption, a node that died) and ended ok
            requeues = _requeues_of_ok_run(ret)
            _counts["requeued_ok"] += requeues > 0
            _counts["requeues"] += requeues
        out = dict(zip(todo, ran, strict=True)) | done
        return [out[i] for i in range(len(job_overrides))]

    launcher.launch = launch_unfinished


def _requeues_of_ok_run(ret) -> int:
    """How often a launched job was requeued, when its run folder says it ended ``ok`` (else 0)."""
    from score_exp.runs.record import RunFolder

    try:
        record = RunFolder(Path(str(ret.hydra_cfg.hydra.runtime.output_dir))).finished_record()
    except Exception:  # no folder (a job refused before it made one), no hydra config
        return 0
    return int(record.requeues or 0) if record is not None else 0


def _finished(overrides: list[str], hydra_context, config):
    """A COMPLETED ``JobReturn`` for a job whose folder holds its finished run, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf, open_dict, read_write

    old = HydraConfig.instance().cfg
    try:
        # The job's config exactly as the launcher will build it (run_job: its output folder).
        cfg = hydra_context.config_loader.load_sweep_config(config, overrides)
        HydraConfig.instance().set_config(cfg)
        run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = os.path.abspath(run_dir)
        HydraConfig.instance().set_config(cfg)
        task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        previous = cluster.finished_run(
            Path(cfg.hydra.runtime.output_dir),
            OmegaConf.to_container(task_cfg, resolve=True),
            overwrite=bool(task_cfg.get("overwrite", False)),
            skip_finished=bool(task_cfg.get("skip_finished", True)),
        )
        if previous is None:
            return None
        ret = JobReturn(
            overrides=overrides, cfg=task_cfg, hydra_cfg=cfg, status=JobStatus.COMPLETED
        )
        ret.return_value = objective(task_cfg, previous)
        ret.working_dir = os.getcwd()
        return ret
    except Exception as e:  # the job itself reports a config it cannot run
        log.debug("cannot check %s before launching: %s", overrides, e)
        return None
    finally:
        if old is not None:
            HydraConfig.instance().set_config(old)


OBJECTIVES = ("best_val",)


def objective(cfg: Any, record: RunRecord | dict) -> float:
    """What a sweeper optimises: the best val metric; the worst value for a run without one.

    A diverged or failed run returns ``inf`` (``-inf`` when the monitor is maximised), so a
    study records it as its worst trial and goes on. ``record``: a :class:`RunRecord` or a
    ``results.json`` mapping.
    """
    name = cfg.get("objective", "best_val")
    if name not in OBJECTIVES:
        raise ConfigError(f"objective={name!r}: valid objectives: {', '.join(OBJECTIVES)}")
    worst = -math.inf if cfg.task.get("monitor_mode", "min") == "max" else math.inf
    record = coerce(record)
    value = record.best_value
    if not record.ok or value is None or not math.isfinite(value):
        return worst
    return float(value)


def report(prog: str) -> None:
    """The sweep's summary line (nothing when this process ran no sweep)."""
    if _counts is not None:
        c = _counts
        requeued = (
            f"; {c['requeued_ok']} requeued, ended ok ({c['requeues']} requeue(s) in all)"
            if c["requeued_ok"]
            else ""
        )
        print(
            f"{prog}: sweep summary: {c['launched'] + c['skipped']} job(s), {c['launched']} "
            f"launched, {c['skipped']} skipped (already finished){requeued}",
            file=sys.stderr,
        )
