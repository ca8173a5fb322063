"""Time one training epoch of a task: median and spread over several repeats.

    python scripts/bench_epoch.py                                   # task=esol_gnn, score025 vs stacked
    python scripts/bench_epoch.py --task esol_mlp --depth score stacked --repeats 7
    python scripts/bench_epoch.py --override task.model.conv=gine --threads 1

Each repeat is one full pass over the training loader, stepped exactly as a run steps it
(:func:`score_exp.tasks.training_step.training_step_fn`: the module's own ``training_step`` and optimiser), on
the task built by :func:`score_exp.run.build` from the real configs, after ``--warmup`` untimed
epochs. Validation and Lightning's bookkeeping are not included (``score-bench --lightning``
measures those). Prints one line per preset: parameters, NFE, median and min-max epoch time, items/s.
The step cost of one fixed batch, memory and ratios: ``score-bench``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from score_exp import config, run
from score_exp.tasks.training_step import training_step_fn


def bench(task: str, preset: str, overrides: list[str], warmup: int, repeats: int) -> dict:
    cfg = config.compose(f"task={task}", f"depth={preset}", *overrides)
    L.seed_everything(cfg.seed, verbose=False)
    datamodule, model, module, spec = run.build(cfg, "fit")
    step = training_step_fn(module, cfg.task.gradient_clip_val)
    loader = datamodule.train_dataloader()

    def epoch() -> tuple[float, int]:
        t0, items = time.perf_counter(), 0
        for i, batch in enumerate(loader):
            step(batch, i)
            items += int(batch.num_graphs) if hasattr(batch, "num_graphs") else len(batch[-1])
        return time.perf_counter() - t0, items

    module.train()
    for _ in range(warmup):
        epoch()
    times, items = zip(*(epoch() for _ in range(repeats)), strict=True)
    med = statistics.median(times)
    return {
        "params": run.trainable_params(model),
        "nfe": spec.nfe,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "items_per_s": items[0] / med,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="esol_gnn")
    ap.add_argument("--depth", nargs="+", default=["score025", "stacked"])
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"task={args.task} threads={torch.get_num_threads()} repeats={args.repeats} "
        f"{' '.join(args.override)}"
    )
    print(f"{'depth':<16}{'params':>12}{'nfe':>5}{'median s':>11}{'min-max s':>16}{'items/s':>9}")
    for preset in args.depth:
        r = bench(args.task, preset, args.override, args.warmup, args.repeats)
        print(
            f"{preset:<16}{r['params']:>12,}{r['nfe']:>5}{r['median_s']:>11.2f}"
            f"{r['min_s']:>8.2f}-{r['max_s']:<7.2f}{r['items_per_s']:>9.0f}"
        )


if __name__ == "__main__":
    main()
