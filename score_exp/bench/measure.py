"""``score-bench``'s measuring side: one variant built by the builder, its training step timed.

Runs in the worker processes that ``score-bench`` starts (``python -m score_exp.bench.cli --worker``),
so that each variant's peak memory is its own. See :mod:`score_exp.bench.cli` for what is reported.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from score_exp import config, run
from score_exp.bench import flops
from score_exp.tasks.training_step import training_step_fn

MARK = "SCORE_BENCH_RESULT "  # prefixes the worker's one JSON line on stdout


def compose(task: str, overrides: list[str]):
    """The ``score-train`` config for ``task`` plus Hydra ``overrides`` (no Hydra run)."""
    return config.compose(f"task={task}", *overrides)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Memory:
    """Peak memory of the code run between :meth:`start` and :meth:`stop`, in MB."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "cpu_peak_rss" if _reset_peak_rss() else "cpu_peak_rss_since_start"
            rss = _status_kb("VmRSS")
            self.base = rss / 1024 if rss is not None else None

    def stop(self) -> dict:
        import torch

        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _status_kb("VmHWM")
            peak = hwm / 1024 if hwm is not None else None
        train = None
        if peak is not None and self.base is not None and self.kind != "cpu_peak_rss_since_start":
            train = max(0.0, peak - self.base)
        return {"memory_kind": self.kind, "peak_mem_mb": peak, "train_mem_mb": train}


def _to(batch, device):
    if hasattr(batch, "to"):
        return batch.to(device)
    return type(batch)(t.to(device) for t in batch)


def _stepper(task: str, overrides: list[str], device: str) -> dict:
    """Build one variant as ``score-train`` does; return its training ``step`` and context."""
    from contextlib import nullcontext

    import lightning as L
    import torch

    cfg = compose(task, overrides)
    L.seed_everything(cfg.seed, verbose=False)
    dev = torch.device(device)
    datamodule, model, module, spec = run.build(cfg, "fit")
    batch = _to(next(iter(datamodule.train_dataloader())), dev)
    module.to(dev).train()
    if hasattr(datamodule, "tokenizer"):  # a language model: (idx, targets) windows
        items, unit = batch[0].numel(), "tokens"
    else:
        items = int(batch.num_graphs) if hasattr(batch, "num_graphs") else batch[-1].numel()
        unit = "molecules"

    precision = str(cfg.trainer.get("precision", "32-true"))
    amp = (
        torch.autocast(dev.type, dtype=torch.bfloat16)
        if precision.startswith("bf16") and dev.type == "cuda"
        else nullcontext()
    )
    train_step = training_step_fn(module, cfg.task.gradient_clip_val, amp)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    # The same work as a run's step: the module's training_step (its loss), backward, clip,
    # optimiser and per-step scheduler step, zero_grad.
    def step() -> None:
        train_step(batch)

    return {"cfg": cfg, "spec": spec, "dev": dev, "model": model, "module": module,
            "batch": batch, "items": items, "unit": unit, "step": step, "sync": sync}  # fmt: skip


def _time_block(step, sync, steps: int) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) / steps


def measure(
    task: str,
    overrides: list[str],
    warmup: int,
    repeats: int,
    steps_per_repeat: int,
    lightning: bool,
    device: str,
) -> dict:
    """Build one variant as ``score-train`` does and time its training step (see module doc)."""
    v = _stepper(task, overrides, device)
    cfg, spec, dev, model, module, batch = (
        v[k] for k in ("cfg", "spec", "dev", "model", "module", "batch")
    )
    step, sync, items, unit = v["step"], v["sync"], v["items"], v["unit"]
    memory = _Memory(dev)
    memory.start()
    for _ in range(warmup):
        step()
    times = [_time_block(step, sync, steps_per_repeat) for _ in range(repeats)]
    out: dict[str, Any] = {
        "params": run.trainable_params(model),
        "nfe": spec.nfe,
        "unit": unit,
        "items_per_step": items,
        **summary(times, items),
        **memory.stop(),
    }
    seq_len = batch[0].shape[1] if unit == "tokens" else None
    out.update(flops.bench_fields(model, seq_len, out["throughput"], dev))
    if lightning:
        # Bare and Lightning blocks alternate, so drifts of the machine (clock, cache, other
        # tenants) hit both sides of the ratio alike; the ratio uses these interleaved bare times.
        bare_t, light_t = [], []
        for _ in range(repeats):
            bare_t.append(_time_block(step, sync, steps_per_repeat))
            light_t.append(_lightning_block(cfg, module, batch, dev, warmup, steps_per_repeat))
        out["lightning"] = summary(light_t, items)
        out["lightning"]["bare_interleaved"] = summary(bare_t, items)
        out["lightning"]["throughput_ratio"] = statistics.median(bare_t) / statistics.median(
            light_t
        )
    return out


def summary(times: list[float], items: int) -> dict:
    med = statistics.median(times)
    return {
        "step_s": times,
        "step_s_median": med,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "throughput": items / med,
    }


def _lightning_block(cfg, module, batch, dev, warmup, steps) -> float:
    """Mean step time of the same module and batch under ``Trainer.fit`` (after ``warmup`` steps).

    Timed from one batch end to the next: everything Lightning does per step, between steps
    included; the Trainer's set-up before the first step is not.
    """
    import tempfile

    import lightning as L
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    class Repeat(IterableDataset):
        def __iter__(self):
            while True:  # endless: the run ends at max_steps, never at an epoch boundary
                yield batch

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.t: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx) -> None:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            self.t.append(time.perf_counter())

    clock = Clock()
    warmup = max(warmup, 1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator=dev.type,
            devices=1,
            precision=cfg.trainer.get("precision", "32-true"),
            max_steps=warmup + steps,
            max_epochs=-1,
            gradient_clip_val=cfg.task.gradient_clip_val,
            log_every_n_steps=cfg.task.log_every_n_steps,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp,
            callbacks=[clock],
        )
        # Batches are already on the device: a pass-through collate, no copies.
        loader = DataLoader(Repeat(), batch_size=None, collate_fn=lambda b: b)
        trainer.fit(module, train_dataloaders=loader)
    t = clock.t
    return (t[warmup - 1 + steps] - t[warmup - 1]) / steps


def interleaved(
    task: str,
    variants: list[list[str]],
    warmup: int,
    repeats: int,
    steps_per_repeat: int,
    device: str,
) -> list[list[float]]:
    """Step times of several variants built in ONE process, timed in round-robin blocks.

    On a machine whose speed drifts (shared VMs, thermal limits), variants measured one after
    the other see different machines; alternating their blocks gives every variant the same
    share of each phase, so ratios of these times are the fair ones.
    """
    built = [_stepper(task, overrides, device) for overrides in variants]
    for v in built:
        for _ in range(warmup):
            v["step"]()
    times: list[list[float]] = [[] for _ in built]
    for _ in range(repeats):
        for i, v in enumerate(built):
            times[i].append(_time_block(v["step"], v["sync"], steps_per_repeat))
    return times


def worker(payload: str) -> None:
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)  # no banners on the JSON channel
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    job = json.loads(payload)
    threads = job.pop("threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    fn = interleaved if "variants" in job else measure
    print(MARK + json.dumps(fn(**job)), flush=True)
