"""Time one training epoch of a molecule regression task: median and spread over several repeats.

    python scripts/bench_epoch.py                                   # task=esol_gnn, score025 vs stacked
    python scripts/bench_epoch.py --task esol_mlp --depth score stacked --repeats 7
    python scripts/bench_epoch.py --override task.model.conv=gine --threads 1

Each repeat is one full pass over the training split (forward, loss, backward, AdamW step) with
the model, batch size and data pipeline that ``score-train task=<task> depth=<preset>`` uses,
after ``--warmup`` untimed epochs. Validation and Lightning's bookkeeping are not included.
Prints one line per preset with parameters, the median epoch time, min-max, and molecules/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from score_exp.train import depth_spec

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def bench(task: str, preset: str, overrides: list[str], warmup: int, repeats: int) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", f"depth={preset}", *overrides])
    torch.manual_seed(0)
    dm = instantiate(cfg.task.data)
    dm.prepare_data()
    dm.setup("fit")
    model = instantiate(cfg.task.model, _partial_=True)(depth=depth_spec(cfg), **dm.model_kwargs())
    module = instantiate(cfg.task.module, model=model, **dm.module_kwargs())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.task.module.lr)
    loader = dm.train_dataloader()

    def epoch() -> float:
        t0 = time.perf_counter()
        for batch in loader:
            pred, y = module(batch)
            loss = torch.nn.functional.mse_loss(pred, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return time.perf_counter() - t0

    model.train()
    for _ in range(warmup):
        epoch()
    times = [epoch() for _ in range(repeats)]
    n = len(dm.datasets["train"])
    med = statistics.median(times)
    return {
        "preset": preset,
        "params": sum(p.numel() for p in model.parameters()),
        "nfe": model.depth.nfe,
        "median_s": med,
        "min_s": min(times),
        "max_s": max(times),
        "molecules_per_s": n / med,
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
        f"task={args.task} threads={torch.get_num_threads()} repeats={args.repeats} {' '.join(args.override)}"
    )
    print(f"{'depth':<16}{'params':>12}{'nfe':>5}{'median s':>11}{'min-max s':>16}{'mol/s':>9}")
    for preset in args.depth:
        r = bench(args.task, preset, args.override, args.warmup, args.repeats)
        print(
            f"{preset:<16}{r['params']:>12,}{r['nfe']:>5}{r['median_s']:>11.2f}"
            f"{r['min_s']:>8.2f}-{r['max_s']:<7.2f}{r['molecules_per_s']:>9.0f}"
        )


if __name__ == "__main__":
    main()
