"""``SkipFinishedSweeper``: Hydra's basic sweeper that launches only the jobs with work left.

Before each batch goes to the launcher (basic, joblib, submitit_local, Slurm), every job's run
folder is checked against its configuration (:func:`score_exp.cluster.finished_run`, read only):
a job whose folder already holds its finished run is not launched (no Slurm allocation, no
process, the folder stays byte-identical) and counts as done with its recorded objective. The
sweep ends with one summary line: how many jobs ran, were skipped, failed.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


class SkipFinishedSweeper(BasicSweeper):
    """:class:`BasicSweeper` that skips finished jobs before they are launched."""

    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.counts = {"launched": 0, "skipped": 0}
        launch = self.launcher.launch

        def launch_unfinished(batch: Sequence[Sequence[str]], initial_job_idx: int):
            todo, done = [], {}
            for i, overrides in enumerate(batch):
                ret = self._finished(list(overrides))
                if ret is None:
                    todo.append(i)
                else:
                    done[i] = ret
            self.counts["skipped"] += len(done)
            self.counts["launched"] += len(todo)
            if done:
                print(
                    f"score-train: {len(done)} of {len(batch)} job(s) already finished: "
                    "not launched (their folders are left untouched)",
                    file=sys.stderr,
                )
            ran = launch([batch[i] for i in todo], initial_job_idx) if todo else []
            out = dict(zip(todo, ran, strict=True)) | done
            return [out[i] for i in range(len(batch))]

        self.launcher.launch = launch_unfinished

    def sweep(self, arguments):
        try:
            return super().sweep(arguments)
        finally:
            c = self.counts
            print(
                f"score-train: sweep summary: {c['launched'] + c['skipped']} job(s), "
                f"{c['launched']} launched, {c['skipped']} skipped (already finished)",
                file=sys.stderr,
            )

    def _finished(self, overrides: list[str]) -> JobReturn | None:
        """A COMPLETED JobReturn for a job whose folder holds its finished run, else None."""
        from score_exp.cluster import finished_run
        from score_exp.train import objective

        old = HydraConfig.instance().cfg
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
                HydraConfig.instance().set_config(cfg)
                run_dir = Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)
                cfg.hydra.runtime.output_dir = os.path.abspath(run_dir)
            HydraConfig.instance().set_config(cfg)
            task_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            resolved = OmegaConf.to_container(task_cfg, resolve=True)
            previous = finished_run(
                Path(cfg.hydra.runtime.output_dir),
                resolved,
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
