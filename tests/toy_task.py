"""A task that is not part of the framework: a synthetic regression, registered by tests/test_run.py.

It uses only the documented extension points (README "Add a task"): a data module honouring
:class:`score_exp.run.TaskData`, a model on the core's :class:`~score_exp.core.RecurrentDepth`
taking ``depth=``, and a config file in a directory given to Hydra (``--config-dir``,
``tests/toy/task/toy.yaml``). The LightningModule is the framework's own regression module.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from score_exp.core import DepthSpec, RecurrentDepth


class ToyRegressionData(L.LightningDataModule):
    """``y = sin(x @ w)`` plus noise, ``n`` samples of ``features`` inputs, split 80/10/10."""

    def __init__(self, n: int = 256, features: int = 8, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.n, self.features, self.batch_size, self.seed = n, features, batch_size, seed

    def prepare_data(self) -> None:  # nothing to download
        pass

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.n, self.features, generator=g)
        y = torch.sin(x @ torch.randn(self.features, generator=g)) + 0.1 * torch.randn(
            self.n, generator=g
        )
        a, b = int(0.8 * self.n), int(0.9 * self.n)
        self.splits = {"train": (0, a), "val": (a, b), "test": (b, self.n)}
        self.data = {k: TensorDataset(x[i:j], y[i:j]) for k, (i, j) in self.splits.items()}

    def model_kwargs(self) -> dict:
        return {"in_features": self.features}

    def module_kwargs(self) -> dict:
        return {}  # the target is already standardised-ish: mean 0, std 1

    def split_record(self) -> dict:
        return {"splits": self.splits, "seed": self.seed}

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.data["train"], self.batch_size, shuffle=True, generator=g)

    def val_dataloader(self):
        return DataLoader(self.data["val"], self.batch_size)

    def test_dataloader(self):
        return DataLoader(self.data["test"], self.batch_size)


class ToyModel(nn.Module):
    """``Linear -> RecurrentDepth of tanh(Linear) blocks -> Linear``."""

    def __init__(self, depth: DepthSpec, in_features: int, hidden: int = 16):
        super().__init__()
        self.encoder = nn.Linear(in_features, hidden)
        self.depth = RecurrentDepth(
            lambda: nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()), depth
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):  # (B, in_features) -> (B, 1)
        return self.head(self.depth(self.encoder(x)))
