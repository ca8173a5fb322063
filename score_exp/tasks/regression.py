"""LightningModule for scalar regression (ESOL solubility), metrics in the target's own units."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection, R2Score

from score_exp.errors import check_choice, check_number
from score_exp.tasks.depth_loss import with_depth_loss

SCHEDULERS = ("none", "cosine", "plateau")
OPTIMIZERS = ("adamw", "adam")


def _squared_error(pred: Tensor, y: Tensor) -> Tensor:
    """The MSE loss per sample, ``(B,)``."""
    return (pred - y).pow(2)


class RegressionModule(L.LightningModule):
    """Trains ``model`` with MSE on the standardised target; logs RMSE, MAE, R^2 in original units.

    The depth's own loss terms (learned halting) are added in training (``depth_loss.py``).

    Args:
        model: maps a batch's inputs to ``(B, 1)`` predictions of the standardised target.
        lr, weight_decay: optimiser settings.
        optimizer: ``adamw`` (decoupled weight decay) or ``adam`` (L2 weight decay, as PyG's
            AttentiveFP example trains).
        scheduler: ``none``, ``cosine`` (to ``min_lr`` over the run) or ``plateau``
            (halve on a stalled val RMSE).
        min_lr: floor of the cosine schedule.
        target_mean, target_std: training-split statistics used to undo the standardisation.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str = "none",
        min_lr: float = 1e-5,
        target_mean: float = 0.0,
        target_std: float = 1.0,
        optimizer: str = "adamw",
    ):
        super().__init__()
        check_choice("task.module.optimizer", optimizer, OPTIMIZERS)
        check_number("task.module.lr", lr)
        check_number("task.module.weight_decay", weight_decay, strict=False)
        check_number("task.module.min_lr", min_lr, strict=False)
        check_choice("task.module.scheduler", scheduler, SCHEDULERS)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        metrics = MetricCollection(
            {"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError(), "r2": R2Score()}
        )
        self.metrics = nn.ModuleDict(
            {stage: metrics.clone(prefix=f"{stage}/") for stage in ("val", "test")}
        )
        # The evaluation loss as a metric (sum and count summed over ranks): under data
        # parallelism Lightning's own epoch mean of `self.log(..., sync_dist=True)` averages the
        # ranks' sample counts in an integer tensor on gloo, so an odd total (113 = 57 + 56 test
        # molecules) is truncated (56 instead of 56.5) and the loss came out 1/112 too high.
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def forward(self, batch) -> tuple[Tensor, Tensor]:
        """Predictions and targets (both standardised, shape (B,)) of a batch."""
        if isinstance(batch, (list, tuple)):  # (inputs..., y) from a TensorDataset
            *inputs, y = batch
            pred = self.model(*inputs)
        else:  # a PyG Batch carries its own target
            pred, y = self.model(batch), batch.y
        return pred.view(-1), y.view(-1)

    def metric_scale(self, name: str) -> float | None:
        """The error of a trivial predictor in ``name``'s units (divergence criterion).

        Predicting the training mean errs by about the target's standard deviation (RMSE, MAE
        in original units; 1 for the MSE loss on the standardised target).
        """
        kind = name.rsplit("/", 1)[-1]
        return {"rmse": self.hparams.target_std, "mae": self.hparams.target_std, "loss": 1.0}.get(
            kind
        )

    def training_step(self, batch, batch_idx: int) -> Tensor:
        pred, y = self(batch)
        loss = nn.functional.mse_loss(pred, y)
        # The depth's own terms (learned halting: the expected loss over its steps), if any.
        loss = with_depth_loss(
            self, loss, lambda: _squared_error(pred, y), lambda: _squared_error(*self(batch))
        )
        # sync_dist: epoch-level values are averaged over data-parallel ranks (one reduction
        # per epoch, not per step); torchmetrics below synchronise themselves.
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, batch_size=y.numel(), sync_dist=True
        )
        return loss

    def _eval_step(self, batch, stage: str) -> None:
        pred, y = self(batch)
        self.losses[stage].update(nn.functional.mse_loss(pred, y), weight=y.numel())
        std, mean = self.hparams.target_std, self.hparams.target_mean
        self.metrics[stage].update(pred * std + mean, y * std + mean)  # original units

    def _eval_epoch_end(self, stage: str) -> None:
        # compute() already gathers every rank's state; sync_dist averages identical values
        # (a no-op on the numbers) and keeps Lightning from warning about unsynced metrics.
        self.log_dict(
            {f"{stage}/loss": self.losses[stage].compute(), **self.metrics[stage].compute()},
            sync_dist=True,
        )
        self.metrics[stage].reset()
        self.losses[stage].reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        hp = self.hparams
        opt_class = torch.optim.Adam if hp.get("optimizer") == "adam" else torch.optim.AdamW
        opt = opt_class(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=hp.min_lr)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if hp.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt, factor=0.5, patience=20, min_lr=hp.min_lr
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/rmse"}}
        return opt
