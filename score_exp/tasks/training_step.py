"""One optimisation step of a LightningModule exactly as a run does it, without a Trainer
(benchmarks time it: ``score-bench``, ``scripts/bench_epoch.py``)."""

from __future__ import annotations


def training_step_fn(module, gradient_clip_val: float | None = None, autocast=None):
    """``step(batch, batch_idx) -> loss``: one optimisation step exactly as a run does it.

    The module's own ``configure_optimizers()`` and ``training_step()`` (its loss), then
    backward, gradient clipping, optimiser step, per-step scheduler step and ``zero_grad``, as
    Lightning's automatic optimisation does, without a Trainer: benchmarks time this. Inside
    ``training_step``, ``self.log`` does nothing and ``self.optimizers()`` is the optimiser.

    Args:
        module: a built :class:`TaskModule` (on its device, in train mode).
        gradient_clip_val: clip the gradient norm to this (``task.gradient_clip_val``); falsy: no.
        autocast: a context manager for the forward (e.g. bf16 autocast); default none.
    """
    import contextlib

    import torch

    conf = module.configure_optimizers()
    sched = None
    if isinstance(conf, dict):
        lr_sched = conf.get("lr_scheduler")
        if lr_sched and lr_sched.get("interval") == "step":
            sched = lr_sched["scheduler"]
        conf = conf["optimizer"]
    opt = conf

    @contextlib.contextmanager
    def outside_trainer():
        module.log = module.log_dict = lambda *args, **kwargs: None
        module.optimizers = lambda *args, **kwargs: opt
        try:
            yield
        finally:
            del module.log, module.log_dict, module.optimizers

    def step(batch, batch_idx: int = 0):
        with outside_trainer(), autocast or contextlib.nullcontext():
            loss = module.training_step(batch, batch_idx)
        loss.backward()
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(module.parameters(), gradient_clip_val)
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step.optimizer, step.scheduler = opt, sched
    return step
