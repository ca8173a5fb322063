"""One rank of a 2-process DDP run (gloo, CPU) in which rank 1 alone is sent SIGTERM at the end
of the first validation, just before the metric sync: ``python ddp_sigterm_probe.py RANK PORT
{lightning,ours}``. Prints one line ``rank R: <how it ended>``. Run by tests/test_ddp_sigterm.py.

``lightning``: Lightning's own SIGTERM handler, which broadcasts from inside the handler;
``ours``: :func:`score_exp.tasks.distributed.stop_ranks_together`. The process group times out
after 20 s, so a deadlock ends as a timeout instead of hanging the test.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Probe(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.layer(x).view(-1), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", nn.functional.mse_loss(self.layer(x).view(-1), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class SigtermRank1(L.Callback):
    """Rank 1 signals itself where rank 0 goes on into the metric sync (a collective)."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 1 and trainer.current_epoch == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, before the next line


def main() -> None:
    rank, port, handler = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", NODE_RANK="0")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randn(64))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=20)),
        max_epochs=3, callbacks=[SigtermRank1()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    if handler == "ours":
        from score_exp.tasks.distributed import stop_ranks_together

        stop_ranks_together(trainer)
    loader = DataLoader(data, batch_size=8)
    try:
        trainer.fit(Probe(), loader, loader)
        how = f"finished at epoch {trainer.current_epoch}"
    except SIGTERMException:
        how = f"SIGTERMException at epoch {trainer.current_epoch} step {trainer.global_step}"
    except BaseException as e:  # the probe reports how the rank ended, whatever it was
        how = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    print(f"rank {rank}: {how}", flush=True)
    os._exit(0)  # no process-group teardown that could wait on a dead peer


if __name__ == "__main__":
    main()
