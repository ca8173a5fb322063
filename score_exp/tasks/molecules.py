"""Lightning data modules for molecule CSVs (ESOL by default)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from score_exp.data.molecules import (
    ESOL_SMILES_COLUMN,
    ESOL_TARGET_COLUMN,
    SPLIT_KINDS,
    MoleculeTable,
    check_fractions,
    compute_descriptors,
    make_split,
    read_molecule_csv,
)
from score_exp.data.registry import cache_dir, fetch
from score_exp.data.scaler import FeatureScaler
from score_exp.errors import DataError, check_choice, check_int, check_number, check_seed
from score_exp.tasks.distributed import (
    GlobalBatchSampler,
    check_num_workers,
    eval_sampler,
    pin_memory,
    world_of,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MIN_SPLIT_SIZE = 2  # molecules per split: R² (and a target std) need two


class MoleculeDataModule(L.LightningDataModule):
    """Reads a molecule CSV, splits it and standardises the target on the training split.

    Subclasses turn the molecules into model inputs in :meth:`build`.

    Args:
        path: a CSV of your own; ``None`` uses the registered file ``registry_key``.
        registry_key: data-registry key used when ``path`` is None (``esol``).
        smiles_column, target_column: CSV column names.
        split: ``random`` (seeded) or ``scaffold`` (Bemis-Murcko).
        split_fractions: train/val/test fractions.
        split_seed: seed of the random split.
        batch_size: the GLOBAL training batch; each of N data-parallel processes takes
            ``batch_size / N`` (a ConfigError when it does not divide).
        num_workers: loader worker processes (0: batches are built in the training process;
            kept alive across epochs when > 0).
        pin_memory: page-locked batches for faster host-to-GPU copies; ``None`` = when CUDA
            is available.
        seed: seed of the training order (epoch ``e`` is a permutation keyed by ``(seed, e)``,
            the same for any number of processes: :class:`GlobalBatchSampler`).
    """

    def __init__(
        self,
        path: str | None = None,
        registry_key: str = "esol",
        smiles_column: str = ESOL_SMILES_COLUMN,
        target_column: str = ESOL_TARGET_COLUMN,
        split: str = "random",
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        # Every value checked here, before the CSV is read or a descriptor computed.
        check_num_workers(num_workers)
        check_int("task.data.batch_size", batch_size, 1)
        check_choice("task.data.split", split, SPLIT_KINDS)
        check_fractions(split_fractions, "task.data.split_fractions")
        check_seed(split_seed, "task.data.split_seed")
        check_seed(seed, "task.data.seed")
        self.seed, self.pin_memory = seed, pin_memory
        self.path = path
        self.registry_key = registry_key
        self.smiles_column, self.target_column = smiles_column, target_column
        self.split, self.split_fractions, self.split_seed = (
            split,
            tuple(split_fractions),
            split_seed,
        )
        self.batch_size, self.num_workers = batch_size, num_workers
        self.table: MoleculeTable | None = None
        self.indices: dict[str, np.ndarray] = {}
        self.target_mean, self.target_std = 0.0, 1.0
        self.datasets: dict = {}

    def resolve_path(self) -> Path:
        return Path(self.path).expanduser() if self.path else fetch(self.registry_key)

    def prepare_data(self) -> None:
        self.resolve_path()  # fetch/verify once (rank 0 under DDP)

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return  # idempotent: train.py sets up before building the model, Lightning again
        table = read_molecule_csv(self.resolve_path(), self.smiles_column, self.target_column)
        self.indices = make_split(self.split, table.smiles, self.split_seed, self.split_fractions)
        # Before any featurisation or training: a split too small to score (R² needs two
        # molecules) would otherwise fail at the first validation.
        sizes = {name: len(self.indices[name]) for name in SPLITS}
        small = [name for name in SPLITS if sizes[name] < MIN_SPLIT_SIZE]
        if small:
            raise DataError(
                f"{table.source}: {len(table)} valid molecules split {self.split} with "
                f"task.data.split_fractions={list(self.split_fractions)} give "
                f"{', '.join(f'{sizes[n]} {n}' for n in SPLITS)}; every split needs at least "
                f"{MIN_SPLIT_SIZE} molecules (R² needs two): use a larger CSV"
            )
        y_train = table.y[self.indices["train"]]
        self.target_mean, self.target_std = float(y_train.mean()), float(y_train.std() or 1.0)
        self.table = table
        self.datasets = self.build(table, self.indices)

    def build(self, table: MoleculeTable, indices: dict[str, np.ndarray]) -> dict:
        """Return ``{"train": ds, "val": ds, "test": ds}`` of model inputs (subclass hook)."""
        raise NotImplementedError

    def scaled_targets(self, idx: np.ndarray) -> torch.Tensor:
        y = (self.table.y[idx] - self.target_mean) / self.target_std
        return torch.as_tensor(y, dtype=torch.float32)

    def split_record(self) -> dict:
        """Split indices for the run directory: positions in the valid-molecule table and CSV rows."""
        return {
            "split": self.split,
            "seed": self.split_seed,
            "fractions": list(self.split_fractions),
            "data": self.table.summary(),
            **{f"{k}_idx": v.tolist() for k, v in self.indices.items()},
            **{f"{k}_csv_rows": self.table.rows[v].tolist() for k, v in self.indices.items()},
        }

    def module_kwargs(self) -> dict:
        return {"target_mean": self.target_mean, "target_std": self.target_std}

    def model_kwargs(self) -> dict:
        return {}

    def loader_kwargs(self, name: str) -> dict:
        """Batch size, order and workers of a split's loader, for this process."""
        common = {
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": pin_memory(self.pin_memory),
        }
        if name == "train":
            rank, world = world_of(self.trainer)
            batches = GlobalBatchSampler(
                len(self.datasets[name]), self.batch_size, self.seed, rank, world
            )
            return {"batch_sampler": batches, **common}
        # Evaluation batches do not change the metrics: the global size, each example once.
        sampler = eval_sampler(self.datasets[name], self.trainer)
        return {"batch_size": self.batch_size, "sampler": sampler, **common}

    def _loader(self, name: str) -> DataLoader:
        return DataLoader(self.datasets[name], **self.loader_kwargs(name))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class DescriptorDataModule(MoleculeDataModule):
    """Molecules as RDKit 2-D descriptor vectors (computed once, cached on disk).

    Descriptor columns are filtered, imputed and standardised on the training split only
    (:class:`~score_exp.data.scaler.FeatureScaler`).
    """

    def __init__(self, *args, clip: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.clip = check_number("task.data.clip", clip)
        self.scaler: FeatureScaler | None = None

    def build(self, table, indices):
        X = compute_descriptors(table.smiles, cache=cache_dir())
        self.scaler = FeatureScaler.fit(X[indices["train"]], clip=self.clip)
        log.info(
            "descriptors: %d of %d columns kept after train-split filtering",
            self.scaler.n_features,
            X.shape[1],
        )
        return {
            name: TensorDataset(
                torch.from_numpy(self.scaler.transform(X[idx])), self.scaled_targets(idx)
            )
            for name, idx in indices.items()
        }

    def model_kwargs(self) -> dict:
        return {"in_features": self.scaler.n_features}


class GraphDataModule(MoleculeDataModule):
    """Molecules as PyG graphs (AttentiveFP featurisation, computed once and cached on disk).

    Args:
        descriptors: also attach the standardised RDKit descriptor vector of each molecule
            (``desc``, fitted on the training split) for models that concatenate it.
        clip: clipping of standardised descriptors.
    """

    def __init__(self, *args, descriptors: bool = False, clip: float = 10.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.descriptors, self.clip = descriptors, check_number("task.data.clip", clip)
        self.scaler: FeatureScaler | None = None

    def build(self, table, indices):
        from torch_geometric.data import Data

        from score_exp.data.graphs import featurize

        graphs = featurize(table.smiles, cache=cache_dir())
        desc = None
        if self.descriptors:
            X = compute_descriptors(table.smiles, cache=cache_dir())
            self.scaler = FeatureScaler.fit(X[indices["train"]], clip=self.clip)
            desc = torch.from_numpy(self.scaler.transform(X))  # (n_molecules, n_kept)
        out = {}
        for name, idx in indices.items():
            y = self.scaled_targets(idx)
            out[name] = [
                Data(
                    **graphs[i],
                    y=y[k].view(1),
                    **({"desc": desc[i].view(1, -1)} if desc is not None else {}),
                )
                for k, i in enumerate(idx)
            ]
        return out

    def model_kwargs(self) -> dict:
        from score_exp.data.graphs import ATOM_FEATURES, BOND_FEATURES

        return {
            "atom_features": ATOM_FEATURES,
            "edge_features": BOND_FEATURES,
            "descriptor_features": self.scaler.n_features if self.scaler is not None else 0,
        }

    def _loader(self, name: str):
        from torch_geometric.loader import DataLoader as GraphLoader

        return GraphLoader(self.datasets[name], **self.loader_kwargs(name))
