"""``StudySweeper``: Hydra's Optuna sweeper whose study resumes (see :mod:`score_exp.cli.tune`)."""

from __future__ import annotations

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class StudySweeper(OptunaSweeper):
    """Hydra's Optuna sweeper with ``n_trials`` as the study's TOTAL budget.

    Running the same command again finishes what is left of the study (stored in SQLite in the
    sweep folder); a trial killed mid-run is asked again. Configured in
    ``configs/experiment/_tune_base.yaml`` as ``hydra/sweeper=optuna`` with this ``_target_``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Imported here, as the plugin does: Hydra imports every plugin module at start-up, and
        # optuna is only needed when a study runs.
        from score_exp.cli.tune import ResumableStudy

        self.sweeper.__class__ = ResumableStudy  # the same state, the resuming sweep()
