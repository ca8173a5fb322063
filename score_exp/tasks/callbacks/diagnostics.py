"""What the depth logs: per-step diagnostics on validation and the fixed-point solver's
convergence."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from score_exp.tasks.callbacks.depth import find_depth

log = logging.getLogger("score_exp.cli.train")


class DepthDiagnostics(L.Callback):
    """Logs per-step diagnostics of the depth on the first validation batch of each epoch.

    ``diag/rel_change_step{t}`` (``||h_{t+1} - h_t|| / ||h_t||``), ``diag/contraction_step{t}``
    (``||h_{t+1} - h_t|| / ||h_t - h_{t-1}||``, from ``t = 1``), ``depth/steps`` (the active
    step count), ``depth/dt_step{t}`` with a learned dt, ``depth/steps_used`` (mean over
    samples) with adaptive depth and ``depth/nfe_spent`` (evaluations of ``F`` per sample) with
    adaptive depth or the fixed-point solver. The depth's input is captured by a forward hook, so the cost
    is one extra no-grad pass of the depth alone on one batch per validation.
    """

    def __init__(self) -> None:
        self._handle = None
        self._captured: tuple | None = None
        self._metrics: dict[str, float] = {}

    # The hook stays registered for a whole validation (and test, whose forward must match it)
    # and stores every call's input without a branch: under torch.compile, a hook added or
    # removed between batches, or a condition inside it, would change the compiled forward's
    # guards and recompile it (docs/gpu.md, torch.compile).
    def _capture(self, module, args, kwargs) -> None:
        self._captured = (args[0], dict(kwargs))

    def _arm(self, trainer, pl_module) -> None:
        depth = find_depth(pl_module)
        if depth is None or trainer.sanity_checking:
            return
        self._captured = None
        self._handle = depth.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._captured = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._arm(trainer, pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._arm(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._disarm()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._handle is None or batch_idx != 0 or dataloader_idx != 0:
            return
        depth = find_depth(pl_module)
        metrics: dict[str, float] = {"depth/steps": float(depth.steps)}
        if depth.last_steps_used is not None:
            metrics["depth/steps_used"] = float(depth.last_steps_used.float().mean())
        if depth.last_nfe is not None and (
            depth.last_steps_used is not None or depth.spec.solver != "unroll"
        ):
            metrics["depth/nfe_spent"] = float(depth.last_nfe)  # halting, fixed-point solver
        if self._captured is not None:
            h, ctx = self._captured
            self._captured = None
            # The captured state is in the run's precision (bf16 under autocast): trace it
            # under the same autocast, which Lightning has left by the time this hook runs.
            with trainer.precision_plugin.forward_context():
                trace = depth.trace(h, **ctx)
            for t, v in enumerate(trace["rel_change"].tolist()):
                metrics[f"diag/rel_change_step{t}"] = v
            for t, v in enumerate(trace["contraction"].tolist()[1:], start=1):
                metrics[f"diag/contraction_step{t}"] = v
        if depth.spec.learn_dt != "none":
            for t, v in enumerate(float(dt) for dt in depth.dts()):
                metrics[f"depth/dt_step{t}"] = v
        self._metrics = metrics

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._disarm()
        if self._metrics and not trainer.sanity_checking:
            # Each rank traced its own first batch: average them (a no-op on one process).
            pl_module.log_dict(
                self._metrics, on_step=False, on_epoch=True, batch_size=1, sync_dist=True
            )
        self._metrics = {}


class FixedPointSolves(L.Callback):
    """The convergence of a ``solver=fixed_point`` depth: each sample's solve, counted.

    Every training step logs ``depth/solver_converged`` (the fraction of the batch's samples
    whose solve reached ``solver_tol``) and ``depth/solver_max_residual`` (the batch's largest
    relative residual). :meth:`summary` gives the totals of the whole training (kept in
    checkpoints, so a resumed run counts on) and of the last test pass, for ``results.json``.
    A run whose training solves mostly did not converge warns once, in one line, when training
    ends. Registered for every run: for a depth that is not solved, nothing is counted, logged,
    gathered or saved in checkpoints.
    """

    def __init__(self) -> None:
        self.train = [0, 0, 0.0]  # samples, converged, largest residual
        self.test = [0, 0, 0.0, 0.0, 0]  # ..., evaluations of F spent, forwards
        self._warned = False
        self.active = False  # set in setup

    def setup(self, trainer, pl_module, stage: str) -> None:
        depth = find_depth(pl_module)
        self.active = depth is not None and depth.spec.solver == "fixed_point"

    @staticmethod
    def _add(totals: list, depth) -> tuple[float, float] | None:
        if depth is None or depth.last_converged is None:
            return None
        n, converged = depth.last_converged.numel(), int(depth.last_converged.sum())
        largest = float(depth.last_residual.max()) if n else 0.0
        totals[0] += n
        totals[1] += converged
        if not largest <= totals[2]:  # NaN (a diverged solve) stays NaN
            totals[2] = largest if not math.isnan(totals[2]) else totals[2]
        return converged / max(n, 1), largest

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.active:
            return
        batch_stats = self._add(self.train, find_depth(pl_module))
        if batch_stats is not None:
            frac, largest = batch_stats
            pl_module.log("depth/solver_converged", frac, on_step=True, on_epoch=False,
                          batch_size=1)  # fmt: skip
            pl_module.log("depth/solver_max_residual", largest, on_step=True, on_epoch=False,
                          batch_size=1)  # fmt: skip

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        if not self.active:
            return
        self.test = [0, 0, 0.0, 0.0, 0]

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dl_idx=0) -> None:
        if not self.active:
            return
        depth = find_depth(pl_module)
        if self._add(self.test, depth) is not None and depth.last_nfe is not None:
            self.test[3] += float(depth.last_nfe)  # what this forward spent (its slowest solve)
            self.test[4] += 1

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if not self.active:
            return
        self.test = self._gathered(pl_module, self.test)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.active:
            return
        totals = self._gathered(pl_module, self.train)
        n, converged, largest = totals
        depth = find_depth(pl_module)
        if n and converged / n < 0.5 and not self._warned and trainer.is_global_zero:
            spec = depth.spec
            log.warning(
                "fixed point: only %.0f%% of the training solves converged (largest residual "
                "%.2g > depth.solver_tol=%g within depth.solver_max_iter=%d); raise "
                "solver_max_iter or solver_tol",
                100 * converged / n, largest, spec.solver_tol, spec.solver_max_iter,
            )  # fmt: skip
            self._warned = True

    @staticmethod
    def _gathered(pl_module, totals: list) -> list:
        """The totals over every data-parallel rank (the rank's own on one process)."""
        if pl_module.trainer.world_size == 1:
            return totals
        t = pl_module.all_gather(torch.tensor(totals, dtype=torch.float64, device=pl_module.device))
        sums = [float(t[:, i].sum()) for i in range(3, t.shape[1])]  # the test's nfe, forwards
        return [int(t[:, 0].sum()), int(t[:, 1].sum()), float(t[:, 2].max()), *sums]

    @staticmethod
    def _record(totals: list) -> dict | None:
        n, converged, largest = totals[:3]
        if not n:
            return None
        record = {"converged": round(converged / n, 6), "max_residual": largest, "samples": n}
        if len(totals) > 3 and totals[4]:
            # The evaluations of F a forward spent (solver iterations + 1), the mean over the
            # test's forwards: what a solved depth costs, where spec.nfe is only its steps.
            nfe = round(totals[3] / totals[4], 2)
            record["nfe"] = int(nfe) if nfe.is_integer() else nfe
        return record

    def summary(self, spec) -> dict:
        """``results.json``'s ``solver``: the budget, and the training's and test's solves."""
        record = {"tol": spec.solver_tol, "max_iter": spec.solver_max_iter}
        for stage, totals in (("train", self.train), ("test", self.test)):
            if (r := self._record(totals)) is not None:
                record[stage] = r
        return record

    def state_dict(self) -> dict:
        return {"train": list(self.train)} if self.active else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train = list(state_dict.get("train", self.train))
