"""Data parallelism helpers: the per-device share of a global batch, evaluation samplers."""

from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler

from score_exp.errors import ConfigError, check_int


def per_device_batch(global_batch: int, world_size: int) -> int:
    """Each device's batch when ``global_batch`` is split over ``world_size`` processes.

    ``task.data.batch_size`` is the GLOBAL batch (all devices together), so a run means the
    same optimisation whether it uses 1 process or 8.

    Raises:
        ConfigError: the global batch does not divide evenly over the devices.
    """
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if global_batch % world_size:
        raise ConfigError(
            f"task.data.batch_size={global_batch} is the global batch and must divide evenly over "
            f"{world_size} processes (devices x nodes); use a multiple of {world_size}"
        )
    return global_batch // world_size


def check_num_workers(num_workers) -> int:
    """``task.data.num_workers`` validated: an integer >= 0 (a ConfigError otherwise)."""
    return check_int("task.data.num_workers", num_workers, 0)


def pin_memory(setting: bool | None) -> bool:
    """Page-locked loader batches: faster, asynchronous host-to-GPU copies; useless without CUDA.

    ``None`` (the configs' default) pins exactly when a CUDA device is available.
    """
    import torch

    return torch.cuda.is_available() if setting is None else bool(setting)


def world_of(trainer) -> tuple[int, int]:
    """``(rank, world_size)`` of the Trainer a data module is attached to, or ``(0, 1)``."""
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


def eval_sampler(dataset, trainer):
    """Under data parallelism, a sampler that gives every evaluation example to one rank ONCE.

    Lightning's default DistributedSampler pads the last batch with repeated examples so every
    rank runs equally many batches; the repeats would bias the synchronised test metrics. Ranks
    may run one batch fewer here, which is safe in evaluation (no gradient all-reduce). None on
    one process (the loader's own sequential order).
    """
    rank, world = world_of(trainer)
    if world == 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)


class GlobalBatchSampler(Sampler):
    """Shuffled global batches, each split evenly over the data-parallel ranks.

    Epoch ``e`` permutes the ``n`` examples with a generator keyed by ``(seed, e)``, cuts the
    permutation into global batches of ``global_batch`` and gives rank ``r`` the ``r``-th of
    ``world`` equal slices of each. At every step the ranks' batches together form the same
    global batch whatever the number of processes, so DDP takes the optimisation steps of one
    process (up to float summation order and dropout masks). A short last global batch is cut to
    a multiple of ``world`` (at most ``world - 1`` examples left out per epoch) so that every
    rank steps together.

    Args:
        n: examples in the dataset.
        global_batch: examples per optimisation step, all ranks together.
        seed: seed of the shuffling (the run's seed).
        rank, world: this process's rank and the number of processes.
        shuffle: permute each epoch (False: dataset order).
    """

    def __init__(
        self, n: int, global_batch: int, seed: int, rank: int = 0, world: int = 1, shuffle=True
    ):
        self.per_rank = per_device_batch(global_batch, world)
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world, self.shuffle, self.epoch = rank, world, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start: a new permutation per epoch."""
        self.epoch = epoch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        for start in range(0, self.n, self.global_batch):
            chunk = order[start : start + self.global_batch]
            k = len(chunk) // self.world
            if k == 0:
                return
            yield chunk[self.rank * k : (self.rank + 1) * k].tolist()

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full + (rest >= self.world)


# ----------------------------------------------------------------------------- stop signals


def stop_ranks_together(trainer) -> None:
    """A SIGTERM under data parallelism: noted by the rank that receives it, acted on by all
    ranks together at the next training batch. No collective ever runs inside a signal handler.

    Lightning (2.6) broadcasts from rank 0 *inside* its SIGTERM handler. A handler runs wherever
    the main thread happens to be, so a rank signalled between two collectives calls a broadcast
    that its peers do not: measured on a 2-node Slurm job, one rank sat in that broadcast and the
    other in the ``barrier`` of the metric sync (gloo, mismatched collectives) until Slurm's
    SIGKILL, with no ``interrupted`` record. Here the handler only notes the signal (and forwards
    it to the ranks Lightning's local launcher started); at the start of each training batch, a
    point every rank reaches in the same order, the ranks ``all_reduce`` their notes (``MAX``:
    rank 0's signal and any other rank's count alike) and all raise Lightning's
    ``SIGTERMException`` there, so the run ends ``interrupted`` on every rank with its
    checkpoint. A signal during validation or testing waits for the next batch or
    :data:`score_exp.runs.stop.TRAIN_GRACE_S`, whichever comes first. One process: unchanged.
    """
    if trainer.world_size <= 1 or not hasattr(
        trainer.fit_loop.epoch_loop, "_broadcast_sigterm_tensor"
    ):
        return  # one process, or a Lightning without the per-batch sync (nor the broadcast)
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    connector, noted = trainer._signal_connector, {"signal": False}

    def note_sigterm(signum, frame) -> None:  # replaces _SignalConnector._sigterm_notifier_fn
        launcher = trainer.strategy.launcher
        if not noted["signal"] and launcher is not None:
            launcher.kill(signum)  # local DDP: rank 0 forwards it to the ranks it started
        noted["signal"] = True

    def stop_together() -> None:  # replaces TrainingEpochLoop._broadcast_sigterm_tensor
        flag = torch.tensor([int(noted["signal"])], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            connector.received_sigterm = True
            raise SIGTERMException()

    connector._sigterm_notifier_fn = note_sigterm
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = stop_together
