"""Language modelling the nanoGPT way: random windows, AdamW, warmup + cosine, fixed-batch eval.

Training is iteration-based (``max_steps``). The validation loss is nanoGPT's ``estimate_loss``:
the mean loss over a FIXED set of ``eval_iters`` batches. The data (random training windows, the
fixed evaluation windows, :class:`~score_exp.tasks.shakespeare.ShakespeareDataModule`) is
:mod:`score_exp.tasks.shakespeare`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from score_exp.errors import ConfigError, check_int, check_number
from score_exp.tasks.depth_loss import with_depth_loss

log = logging.getLogger(__name__)


def nanogpt_lr(it: int, lr: float, min_lr: float, warmup_iters: int, lr_decay_iters: int) -> float:
    """nanoGPT's ``get_lr``: linear warmup, cosine decay to ``min_lr`` at ``lr_decay_iters``."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The mean next-token cross-entropy of each sequence, ``(B,)`` (``-1`` targets ignored)."""
    B, T = targets.shape
    nll = nn.functional.cross_entropy(
        logits.reshape(B * T, -1), targets.reshape(-1), ignore_index=-1, reduction="none"
    ).view(B, T)  # (B, T)
    counted = (targets != -1).sum(1).clamp_min(1)  # (B,)
    return nll.sum(1) / counted


class NanoGPTSchedule(torch.optim.lr_scheduler.LRScheduler):
    """Sets every group's learning rate to :func:`nanogpt_lr` of the step, as nanoGPT does.

    ``LambdaLR`` would multiply the base rate by ``nanogpt_lr / lr``, which differs from
    ``nanogpt_lr`` in the last bit at some steps (79 of the GPU preset's 5000). The peak rate is
    each group's initial ``lr``.
    """

    def __init__(
        self, optimizer, min_lr: float, warmup_iters: int, lr_decay_iters: int, last_epoch=-1
    ):
        self.min_lr, self.warmup_iters, self.lr_decay_iters = min_lr, warmup_iters, lr_decay_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        it = self.last_epoch
        return [
            nanogpt_lr(it, base, self.min_lr, self.warmup_iters, self.lr_decay_iters)
            for base in self.base_lrs
        ]


def _plain(obj):
    """Mappings and sequences (e.g. OmegaConf containers) as plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return [_plain(v) for v in obj]
    return obj


class LanguageModelModule(L.LightningModule):
    """Next-token cross-entropy of ``model(idx, targets) -> (logits, loss)`` (nanoGPT's GPT).

    Logs ``train/loss``, ``train/lr``, ``train/tokens_per_s`` (training tokens per second of wall
    time over each logging interval, all devices together) and, on the fixed validation batches,
    ``val/loss`` (nats per token) and, for a character vocabulary, ``val/bpc`` (bits per character,
    ``loss / ln 2``); ``test/*`` likewise. The depth's own loss terms (learned halting) are
    added in training (``depth_loss.py``).

    Args:
        model: the language model.
        lr, min_lr, warmup_iters, lr_decay_iters: nanoGPT's schedule (see :func:`nanogpt_lr`).
        weight_decay: AdamW decay, applied to tensors with >= 2 dimensions only (matmul weights
            and embeddings), never to LayerNorm gains or biases.
        betas: AdamW betas (nanoGPT: 0.9, 0.99 for Shakespeare).
        vocab: the data's vocabulary metadata, kept in the checkpoint for ``score-sample``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_iters: int = 100,
        lr_decay_iters: int = 5000,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        vocab: dict | None = None,
    ):
        super().__init__()
        check_number("task.module.lr", lr)
        check_number("task.module.min_lr", min_lr, strict=False)
        if min_lr > lr:
            raise ConfigError(f"task.module.min_lr must be <= task.module.lr={lr}, got {min_lr}")
        check_int("task.module.warmup_iters", warmup_iters, 0)
        check_int("task.module.lr_decay_iters", lr_decay_iters, 0)
        check_number("task.module.weight_decay", weight_decay, strict=False)
        # Plain types in the checkpoint (Hydra hands over its own containers): weights_only loads.
        betas = tuple(float(b) for b in betas)
        vocab = _plain(vocab)
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.per_char = (vocab or {}).get("tokenizer") == "char"
        self.eval_loss = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self._tokens, self._t0 = 0, 0.0

    def forward(self, idx: Tensor, targets: Tensor | None = None):
        return self.model(idx, targets)

    def metric_scale(self, name: str) -> float | None:
        """The loss of a uniform guess over the vocabulary, ``ln V`` (divergence criterion)."""
        vocab_size = getattr(self.model, "vocab_size", None)
        kind = name.rsplit("/", 1)[-1]
        if not vocab_size or kind not in ("loss", "bpc"):
            return None
        return math.log(vocab_size) / (math.log(2) if kind == "bpc" else 1.0)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch  # (B, T), (B, T)
        logits, loss = self(x, y)
        # The depth's own terms (learned halting: the expected loss over its steps), if any.
        loss = with_depth_loss(
            self,
            loss,
            lambda: sequence_loss(logits, y),
            lambda: sequence_loss(self(x, y)[0], y),
            per_step=True,  # iteration-based: logged like train/loss
        )
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_fit_start(self) -> None:
        t = self.trainer
        every = t.val_check_interval  # in training batches: accumulate_grad_batches per step
        if isinstance(every, int):
            every //= max(int(t.accumulate_grad_batches), 1)
        if isinstance(every, int) and 0 < t.max_steps < every:
            raise ConfigError(
                f"max_steps={t.max_steps} < val_check_interval={every}: the validation loss "
                "(the monitored metric) would never be computed; lower task.val_check_interval"
            )

    # Throughput over each logging interval, without the validation pauses in between.
    def on_train_start(self) -> None:
        self._restart_clock()

    def on_validation_end(self) -> None:
        self._restart_clock()

    def _restart_clock(self) -> None:
        self._tokens, self._t0 = 0, time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._tokens += batch[0].numel()
        if self.trainer.global_step % self.trainer.log_every_n_steps == 0:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # time finished work, not queued kernels
            elapsed = time.perf_counter() - self._t0
            tokens = self._tokens * self.trainer.world_size  # all devices together
            self.log("train/tokens_per_s", tokens / elapsed, on_step=True, on_epoch=False)
            self._restart_clock()

    def _eval_step(self, batch, stage: str) -> None:
        x, y = batch
        _, loss = self(x, y)
        self.eval_loss[stage].update(loss)  # equal-sized batches: the mean of means is the mean

    def _eval_epoch_end(self, stage: str) -> None:
        loss = self.eval_loss[stage].compute()  # gathered over data-parallel ranks
        # sync_dist averages identical values: a no-op on the number, no unsynced-metric warning.
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True)
        if self.per_char:
            self.log(f"{stage}/bpc", loss / math.log(2), sync_dist=True)
        self.eval_loss[stage].reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip as nanoGPT does, for every optimiser (fused AdamW on CUDA included).

        nanoGPT clips the global norm over ``model.parameters()``, in the model's module order;
        Lightning's default takes the optimiser's parameter groups (decayed tensors first), and
        the float32 sum of the per-tensor norms then differs in the last bit (measured: one
        loss in 10 steps, final weights 6e-8 apart). Lightning's mixed-precision plugin also
        refuses to clip for an optimiser that unscales its gradients itself (fused AdamW),
        even in bf16 where nothing is scaled. nanoGPT unscales (fp16 only: a scaler exists;
        Lightning has already unscaled for an optimiser that does not do it itself) and then
        clips, which is what happens here.
        """
        if not gradient_clip_val:
            return
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.model.parameters(), gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(
            groups, lr=hp.lr, betas=tuple(hp.betas), fused=self.device.type == "cuda"
        )
        sched = NanoGPTSchedule(opt, hp.min_lr, hp.warmup_iters, hp.lr_decay_iters)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
