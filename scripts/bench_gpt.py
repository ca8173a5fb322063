"""Training throughput of the nanoGPT task per depth preset: median tokens/s over several repeats.

    python scripts/bench_gpt.py                                   # CPU preset, stacked vs score
    python scripts/bench_gpt.py --task shakespeare_char --device cuda --depth stacked score skip05

Each repeat times ``--steps`` full training iterations (forward, backward, gradient clipping,
fused-on-CUDA AdamW step) on random windows of Tiny Shakespeare after ``--warmup`` untimed ones, with
the model, optimiser and batch shapes that ``score-train task=<task> depth=<preset>`` uses; on CUDA
under bf16 autocast as ``trainer=gpu``. Prints one line per preset: parameters, median and spread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from score_exp.tasks.lm import LanguageModelModule
from score_exp.train import depth_spec

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def bench(task: str, preset: str, device: str, steps: int, warmup: int, repeats: int) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"task={task}", f"depth={preset}"])
    torch.manual_seed(0)
    dm = instantiate(cfg.task.data)
    dm.setup("fit")
    model = instantiate(cfg.task.model, _partial_=True)(
        depth=depth_spec(cfg), **dm.model_kwargs()
    ).to(device)
    module = LanguageModelModule(
        model, **{k: v for k, v in cfg.task.module.items() if k != "_target_"}
    )
    module.to(device)
    opt = module.configure_optimizers()["optimizer"]
    batches = iter(dm.train_dataloader())
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()

    def step() -> None:
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        with amp:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.task.gradient_clip_val)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    model.train()
    tokens = cfg.task.data.batch_size * cfg.task.data.block_size * steps
    rates = []
    for _ in range(warmup):
        step()
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        rates.append(tokens / (time.perf_counter() - t0))
    return {
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokens_per_iter": tokens // steps,
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="shakespeare_char_cpu")
    p.add_argument("--depth", nargs="+", default=["stacked", "score"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20, help="timed iterations per repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(
        f"# {args.task} on {args.device} (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    print(f"# median of {args.repeats} repeats x {args.steps} training iterations")
    for preset in args.depth:
        r = bench(args.task, preset, args.device, args.steps, args.warmup, args.repeats)
        print(
            f"{preset:16s} params {r['params']:>11,}  tokens/s {r['median']:>10,.0f} "
            f"(min {r['min']:,.0f}, max {r['max']:,.0f})  "
            f"ms/iter {1e3 * r['tokens_per_iter'] / r['median']:.1f}"
        )


if __name__ == "__main__":
    main()
