"""Tiny Shakespeare as a language-modelling task's data: random training windows (nanoGPT's
``get_batch``, seeded and rank-aware) and the fixed evaluation windows of ``estimate_loss``.

Training is iteration-based (``max_steps``); the training stream is an endless, seeded sequence of
random windows. Every evaluation (and every run, whatever its seed) scores the same fixed set of
``eval_iters`` batches. Tiny Shakespeare has no test split: ``test`` is the validation split again.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from score_exp.data.registry import fetch
from score_exp.data.shakespeare import TOKENIZERS, TokenFiles, Tokenizer, prepare_tokens
from score_exp.errors import (
    ConfigError,
    DataError,
    check_choice,
    check_int,
    check_seed,
)
from score_exp.models.limits import MAX_SEQ_LEN
from score_exp.tasks.distributed import (
    check_num_workers,
    eval_sampler,
    per_device_batch,
    pin_memory,
    world_of,
)


def window_batch(data: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets, each ``(B, block_size)`` int64, for windows at ``starts``."""
    idx = starts[:, None] + np.arange(block_size + 1)  # (B, T + 1)
    chunk = torch.from_numpy(data[idx].astype(np.int64))  # (B, T + 1)
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class RandomWindows(IterableDataset):
    """An endless stream of batches of windows at uniformly random offsets (nanoGPT's get_batch).

    Batch ``i`` of the stream draws its offsets from a generator keyed by ``(seed, i)``, so the
    stream is the same on every run with that seed. Under data parallelism, rank ``r`` of ``n``
    takes batches ``k * n + r`` (nanoGPT seeds each rank differently for the same reason); with
    several loader workers, worker ``w`` takes every ``n_workers``-th of those from ``w`` on, so
    the stream does not depend on the number of workers. ``start`` is the number of optimiser
    steps already taken: a resumed run continues the stream where it stopped.
    """

    def __init__(
        self,
        data: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.data, self.block_size, self.batch_size = data, block_size, batch_size
        self.seed, self.start, self.rank, self.world_size = seed, start, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        high = len(self.data) - self.block_size  # exclusive: the last target must exist
        k = self.start + worker  # this rank's k-th batch
        while True:
            rng = np.random.default_rng([self.seed, k * self.world_size + self.rank])
            yield window_batch(self.data, rng.integers(0, high, self.batch_size), self.block_size)
            k += n_workers


class FixedWindows(Dataset):
    """``n_batches`` batches of random windows whose offsets are drawn once from ``seed``."""

    def __init__(
        self, data: np.ndarray, block_size: int, batch_size: int, n_batches: int, seed: int
    ):
        self.data, self.block_size = data, block_size
        rng = np.random.default_rng(seed)
        self.starts = rng.integers(0, len(data) - block_size, (n_batches, batch_size))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return window_batch(self.data, self.starts[i], self.block_size)


class ShakespeareDataModule(L.LightningDataModule):
    """Tiny Shakespeare (or any UTF-8 text) as token memmaps, batched as nanoGPT does.

    Args:
        path: a text file of your own; ``None`` uses the registered file ``registry_key``.
        registry_key: data-registry key used when ``path`` is None (``shakespeare``).
        tokenizer: ``char`` (nanoGPT's shakespeare_char) or ``gpt2`` (tiktoken GPT-2 BPE).
        block_size: context length of a training window.
        batch_size: windows per GLOBAL training batch; each of N data-parallel processes draws
            ``batch_size / N`` (a ConfigError when it does not divide). Validation batches keep
            the global size, so the validation windows never depend on the number of devices.
        eval_iters: batches in the fixed validation set (nanoGPT's ``eval_iters``).
        train_fraction: leading fraction of the characters used for training (nanoGPT: 0.9).
        seed: seed of the training stream.
        eval_seed: seed of the validation windows; fixed by default so that runs with
            different seeds are scored on the same windows.
        num_workers: loader worker processes (the training stream does not depend on it).
        pin_memory: page-locked batches for faster host-to-GPU copies; ``None`` = when CUDA
            is available.
    """

    def __init__(
        self,
        path: str | None = None,
        registry_key: str = "shakespeare",
        tokenizer: str = "char",
        block_size: int = 256,
        batch_size: int = 64,
        eval_iters: int = 200,
        train_fraction: float = 0.9,
        seed: int = 0,
        eval_seed: int = 1337,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        # Every value checked here, before the text is read or tokenised.
        check_num_workers(num_workers)
        for name, value in (
            ("block_size", block_size),
            ("batch_size", batch_size),
            ("eval_iters", eval_iters),
        ):
            check_int(f"task.data.{name}", value, 1)
        check_int("task.data.block_size", block_size, 1, MAX_SEQ_LEN)  # a sane context
        check_choice("task.data.tokenizer", tokenizer, TOKENIZERS)
        if not (isinstance(train_fraction, (int, float)) and 0 < train_fraction < 1):
            raise ConfigError(f"task.data.train_fraction must be in (0, 1), got {train_fraction!r}")
        check_seed(seed, "task.data.seed")
        check_seed(eval_seed, "task.data.eval_seed")
        self.path, self.registry_key, self.tokenizer_name = path, registry_key, tokenizer
        self.block_size, self.batch_size, self.eval_iters = block_size, batch_size, eval_iters
        self.train_fraction, self.seed, self.eval_seed = train_fraction, seed, eval_seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.files: TokenFiles | None = None
        self.data: dict[str, np.ndarray] = {}

    def resolve_path(self) -> Path:
        return Path(self.path).expanduser() if self.path else fetch(self.registry_key)

    def prepare_data(self) -> None:
        prepare_tokens(self.resolve_path(), self.tokenizer_name, train_fraction=self.train_fraction)

    def setup(self, stage: str | None = None) -> None:
        if self.files is not None:
            return  # idempotent: train.py sets up before building the model, Lightning again
        files = prepare_tokens(
            self.resolve_path(), self.tokenizer_name, train_fraction=self.train_fraction
        )
        data = {split: files.load(split) for split in ("train", "val")}
        for split, tokens in data.items():
            if len(tokens) <= self.block_size + 1:
                raise DataError(
                    f"the {split} split has {len(tokens)} tokens, too few for windows of "
                    f"block_size={self.block_size} (+1 target); use a longer text or a smaller "
                    "block_size"
                )
        self.files, self.data = files, data

    @property
    def tokenizer(self) -> Tokenizer:
        return self.files.tokenizer()

    @property
    def vocab(self) -> dict:
        """The vocabulary metadata (``meta.json``) without its provenance fields."""
        keep = ("tokenizer", "vocab_size", "itos", "eot")
        return {k: v for k, v in self.files.meta.items() if k in keep}

    def split_record(self) -> dict:
        meta = self.files.meta
        return {
            "split": f"first {self.train_fraction:g} of the text = train, the rest = val (= test)",
            "source": meta["source"],
            "source_sha256": meta["source_sha256"],
            "tokenizer": meta["tokenizer"],
            "vocab_size": meta["vocab_size"],
            "n_chars": meta["n_chars"],
            "n_train_tokens": meta["n_train"],
            "n_val_tokens": meta["n_val"],
            "token_files": str(self.files.root),
            "train_seed": self.seed,
            "eval_seed": self.eval_seed,
            "eval_iters": self.eval_iters,
        }

    def model_kwargs(self) -> dict:
        return {"vocab_size": self.files.meta["vocab_size"], "block_size": self.block_size}

    def module_kwargs(self) -> dict:
        return {"vocab": self.vocab}

    def _loader(self, dataset, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # the datasets yield whole batches
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=pin_memory(self.pin_memory),
        )

    def train_dataloader(self) -> DataLoader:
        t = self.trainer  # Lightning builds the loader after restoring a checkpoint
        rank, world = world_of(t)
        start = t.global_step if t is not None else 0
        bs, T = per_device_batch(self.batch_size, world), self.block_size
        return self._loader(RandomWindows(self.data["train"], T, bs, self.seed, start, rank, world))

    def val_dataloader(self) -> DataLoader:
        bs, T = self.batch_size, self.block_size
        windows = FixedWindows(self.data["val"], T, bs, self.eval_iters, self.eval_seed)
        return self._loader(windows, eval_sampler(windows, self.trainer))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()  # nanoGPT has no test split
