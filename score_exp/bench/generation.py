"""Generation benchmarks (issue 31): what the KV cache and the per-token modes buy.

``cost``: the cost of one new token against the context length, with the cache (one token's
depth: flat, up to attention's linear read) and without it (nanoGPT's re-run of the whole
context: growing), on a random model of a given shape (costs do not depend on the weights).
Medians of ``--repeats`` interleaved runs (this VM drifts)::

    python -m score_exp.bench.generation cost --n_embd 128 --n_head 4 --steps 4 --block_size 512

``table``: for trained language-model runs (one per seed), each decoding mode's loss (the split
decoded one token at a time under the mode's rule, teacher-forced), mean steps per token and
sampling speed (tokens/s of ``--tokens`` tokens, batch 1, the median of ``--repeats`` rounds
interleaved over the modes), as a Markdown table of means and
standard deviations over the runs::

    python -m score_exp.bench.generation table RUN_DIR [RUN_DIR ...] [--warm RUN_DIR ...]

``--warm`` runs (trained with ``depth.inject=add``: warm start needs injection) add the
warm-start rows beside their own fixed-depth row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from score_exp.models.generation import Decoder, Stats, plain_generate, teacher_forced_loss

# name -> (Decoder kwargs, per-token exit (halt, eps) or None, KV cache on)
MODES: dict[str, tuple[dict, tuple[str, float] | None, bool]] = {
    "fixed depth, no cache": ({}, None, False),
    "fixed depth, KV cache": ({}, None, True),
    "exit kl < 0.03": ({}, ("kl", 0.03), True),
    "exit kl < 0.1": ({}, ("kl", 0.1), True),
    "exit kl < 0.3": ({}, ("kl", 0.3), True),
    "exit kl < 0.3, skipped steps: final state's K/V": ({"exit_kv": "final"}, ("kl", 0.3), True),
    "exit state < 0.5": ({}, ("state", 0.5), True),
    "kv_slots=2": ({"kv_slots": 2}, None, True),
    "kv_slots=1": ({"kv_slots": 1}, None, True),
    "speculative_steps=2": ({"speculative_steps": 2}, None, True),
    "speculative_steps=1": ({"speculative_steps": 1}, None, True),
}
WARM_MODES = {
    "fixed depth, KV cache": ({}, None, True),
    "warm_start": ({"warm_start": True}, None, True),
}


def cost(args: argparse.Namespace) -> None:
    from score_exp.core import DepthSpec
    from score_exp.models import GPT

    torch.manual_seed(0)
    spec = DepthSpec(steps=args.steps, dt=0.5, integrator=args.integrator)
    model = GPT(65, args.block_size, spec, n_head=args.n_head, n_embd=args.n_embd).eval()
    dec = Decoder(model)
    lengths = [n for n in args.lengths if n < args.block_size]
    x = torch.randint(0, 65, (1, args.block_size))
    times: dict[tuple[int, str], list[float]] = {(n, m): [] for n in lengths for m in ("kv", "no")}
    caches = {}
    with torch.no_grad():
        for n in lengths:
            caches[n] = dec.new_cache(1)
            dec.feed(caches[n], x[:, :n])  # n tokens held
        for _ in range(args.repeats):  # interleaved: every length and mode in each round
            for n in lengths:
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    dec.feed(caches[n], x[:, n : n + 1])  # the token after n held ones
                    caches[n].truncate(n)
                times[n, "kv"].append((time.perf_counter() - t0) / args.inner)
                t0 = time.perf_counter()
                for _ in range(args.inner):
                    model(x[:, : n + 1])  # the whole context again
                times[n, "no"].append((time.perf_counter() - t0) / args.inner)
    print(f"# one new token after n tokens: {spec.steps} steps ({args.integrator}), "
          f"n_embd {args.n_embd}, {torch.get_num_threads()} thread(s); median (min) of "
          f"{args.repeats} interleaved runs of {args.inner} tokens")  # fmt: skip
    print("| context n | ms/token, KV cache | ms/token, no cache | no cache / cache (medians) |")
    print("|---:|---:|---:|---:|")
    for n in lengths:
        kv, no = (statistics.median(times[n, m]) * 1e3 for m in ("kv", "no"))
        kv_min, no_min = (min(times[n, m]) * 1e3 for m in ("kv", "no"))
        print(f"| {n} | {kv:.2f} ({kv_min:.2f}) | {no:.2f} ({no_min:.2f}) | {no / kv:.1f}x |")


def measure(run_dir: Path, modes: dict, args: argparse.Namespace) -> dict[str, dict]:
    """Each mode's loss, mean steps per token, tokens/s (and acceptance) on one run."""
    from score_exp.run import load_run

    loaded = load_run(run_dir, None, "predict", model_overrides={"compile": False})
    model, datamodule = loaded.task.model.eval(), loaded.task.datamodule
    tokenizer = datamodule.tokenizer
    datamodule.setup("test")
    batches = list(datamodule.val_dataloader())[: args.batches]
    prompt = torch.tensor([tokenizer.encode("\n")])
    out: dict[str, dict] = {}
    speeds: dict[str, list[float]] = {name: [] for name in modes}
    for r in range(args.repeats + 1):  # round 0: the loss; then interleaved timings
        for name, (kwargs, exit_, kv) in modes.items():
            halt, eps = exit_ if exit_ else (None, None)
            ctx = model.depth.discretised(halt=halt, adaptive_eps=eps) if exit_ else nullcontext()
            with ctx:
                dec = Decoder(model, **kwargs)
                if r == 0:
                    # Speculative decoding's text follows the full depth's law: its loss is the
                    # fixed depth's, and so are its steps per kept token.
                    spec_mode = "speculative_steps" in kwargs
                    loss_stats = Stats()
                    loss = teacher_forced_loss(Decoder(model) if spec_mode else dec, batches,
                                               loss_stats)  # fmt: skip
                    out[name] = {"loss": loss, "steps": loss_stats.mean_steps}
                    continue
                gen, g = Stats(), torch.Generator().manual_seed(args.seed)
                if kv:
                    dec.generate(prompt, args.tokens, 0.8, args.top_k, g, gen)
                else:
                    plain_generate(model, prompt, args.tokens, 0.8, args.top_k, g, gen)
            speeds[name].append(gen.tokens / gen.seconds)
            out[name]["accept"] = gen.accepted / gen.drafted if gen.drafted else None
            out[name]["cache_mib"] = gen.cache_bytes / 2**20
    for name in modes:
        out[name]["tok_s"] = statistics.median(speeds[name])
        print(f"{run_dir.name} {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def _cell(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def measured(run_dir: Path, modes: dict, args: argparse.Namespace) -> dict[str, dict]:
    """:func:`measure`, kept in ``--keep`` (one JSON per run and mode set) and read back on a
    re-run, so runs that finish later add their rows without re-measuring the others."""
    if args.keep is None:
        return measure(run_dir, modes, args)
    name = f"{run_dir.resolve()}".strip("/").replace("/", "_") + f"_{len(modes)}.json"
    path = Path(args.keep) / name
    if path.is_file():
        return json.loads(path.read_text())
    out = measure(run_dir, modes, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def table(args: argparse.Namespace) -> None:
    rows: list[tuple[str, list[dict]]] = []
    results = [measured(Path(r), MODES, args) for r in args.runs]
    base = "fixed depth, KV cache"  # speed ratios within a run: its modes were interleaved
    for r in results:
        for name in MODES:
            r[name]["speed"] = r[name]["tok_s"] / r[base]["tok_s"]
    rows += [(name, [r[name] for r in results]) for name in MODES]
    if args.warm:
        warm = [measured(Path(r), WARM_MODES, args) for r in args.warm]
        for r in warm:
            for name in WARM_MODES:
                r[name]["speed"] = r[name]["tok_s"] / r[base]["tok_s"]
        rows += [(f"inject=add: {name}", [r[name] for r in warm]) for name in WARM_MODES]
    print(f"# {len(args.runs)} run(s){f' + {len(args.warm)} inject=add' if args.warm else ''}; "
          f"loss: {args.batches} validation batches decoded token by token; tokens/s: "
          f"{args.tokens} tokens, batch 1, top_k={args.top_k}, {torch.get_num_threads()} "
          f"thread(s), median of {args.repeats} interleaved rounds; mean ± sd over runs; speed: "
          "tokens/s over the same run's fixed depth with the KV cache")  # fmt: skip
    print(
        "| mode | val loss | steps per token | tokens/s | speed vs KV cache | acceptance | KV cache MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rs in rows:
        acc = [r["accept"] for r in rs if r["accept"] is not None]
        print(
            f"| {name} | {_cell([r['loss'] for r in rs], 4)} | {_cell([r['steps'] for r in rs], 2)}"
            f" | {_cell([r['tok_s'] for r in rs], 0)} | {_cell([r['speed'] for r in rs], 2)}x"
            f" | {_cell(acc, 2) if acc else ''}"
            f" | {rs[0]['cache_mib']:.3f} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m score_exp.bench.generation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cost", help="per-token cost against the context length")
    c.add_argument("--n_embd", type=int, default=128)
    c.add_argument("--n_head", type=int, default=4)
    c.add_argument("--steps", type=int, default=4)
    c.add_argument("--integrator", default="euler")
    c.add_argument("--block_size", type=int, default=512)
    c.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 511])
    c.add_argument("--repeats", type=int, default=15)
    c.add_argument("--inner", type=int, default=10, help="tokens timed together per run")
    t = sub.add_parser("table", help="loss, steps per token and tokens/s of each decoding mode")
    t.add_argument("runs", nargs="+", help="run folders of a trained GPT (one per seed)")
    t.add_argument("--warm", nargs="*", default=[], help="runs trained with depth.inject=add")
    t.add_argument("--batches", type=int, default=20, help="validation batches for the loss")
    t.add_argument("--tokens", type=int, default=300, help="tokens sampled for tokens/s")
    t.add_argument("--top_k", type=int, default=200)
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds (median)")
    t.add_argument("--keep", help="a folder that keeps each run's figures (re-runs read them)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one token at a time: one thread is the fastest on a shared CPU
    cost(args) if args.cmd == "cost" else table(args)


if __name__ == "__main__":
    main()
