"""``score-bench``: what one training step of each depth variant costs, measured side by side.

    score-bench --task shakespeare_char_cpu --depth stacked score --integrator euler heun rk4
    score-bench --task esol_mlp --depth score --lightning --json bench.json
    score-bench --task shakespeare_char_cpu --depth score --checkpoint-memory

For every (depth preset, integrator) the model is built exactly as ``score-train`` builds it
(:func:`score_exp.train.build_task` on the real configs plus ``--override``), then one fixed
training batch is stepped (forward, loss, backward, gradient clipping, optimiser and per-step
scheduler step) ``--warmup`` times untimed and ``--repeats`` x ``--steps-per-repeat`` times timed.
Reported: median and min/max step time over the repeats, throughput (tokens/s for language models,
molecules/s for ESOL), peak memory, parameters and NFE, then ratios between variants that differ
in one setting only (heun/euler within a preset, score/stacked within an integrator).

Each variant runs in a fresh subprocess so its peak memory is its own; then all variants are
built in one more process and timed in round-robin blocks (``interleaved``), and the ratios use
those times, so that a machine whose speed drifts biases no variant. Peak memory: on CPU the
peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` once the model is built), on
CUDA ``torch.cuda.max_memory_allocated``. ``train MB`` is that peak minus the memory held just before
the first step (model, data, interpreter): gradients, optimiser state and activations.

``--lightning`` also steps the same model and batch through the task's LightningModule and a
minimal Trainer (no logger, checkpointing, progress bar or validation) and reports its
throughput over the bare loop's. ``--checkpoint-memory`` instead measures the peak memory of
the first preset (a shared one) at ``--checkpoint-steps`` steps with and without
``depth.checkpoint``. Timings on a busy machine are not results: run on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from score_exp import flops, run
from score_exp.errors import ConfigError, ScoreExpError

MARK = "SCORE_BENCH_RESULT "  # prefixes the worker's one JSON line on stdout


# ----------------------------------------------------------------------------- configs


def compose(task: str, overrides: list[str]):
    """The ``score-train`` config for ``task`` plus Hydra ``overrides`` (no Hydra run)."""
    return run.compose(f"task={task}", *overrides)


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(run.CONFIG_DIR) / group).glob("[!_]*.yaml"))


def _no_step_scheduler(cfg) -> list[str]:
    # ReduceLROnPlateau steps on the validation metric, which a benchmark never computes (a
    # Trainer without validation would stop on the missing metric), and a cosine schedule needs
    # a Trainer's run length; both cost nothing per step.
    sched = cfg.task.module.get("scheduler")
    return ["task.module.scheduler=none"] if sched in ("plateau", "cosine") else []


def plan(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Validate the request and return the variants to measure and notes on skipped ones.

    Raises:
        ConfigError: unknown task, preset or integrator, bad override, bad counts, or no
            valid combination at all; raised before anything is measured.
    """
    from score_exp.core import INTEGRATORS

    for name, valid, given in (
        ("task", _choices("task"), [args.task]),
        ("depth preset", _choices("depth"), args.depth),
        ("integrator", sorted(INTEGRATORS), args.integrator),
    ):
        unknown = [g for g in given if g not in valid]
        if unknown:
            raise ConfigError(f"unknown {name} {unknown[0]!r}; valid: {', '.join(valid)}")
    for name in ("repeats", "warmup", "steps_per_repeat"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    if args.checkpoint_memory:
        grid = [
            (args.depth[0], args.integrator[0], [f"depth.steps={s}", f"depth.checkpoint={c}"])
            for s in args.checkpoint_steps
            for c in ("false", "true")
        ]
    else:
        grid = [(p, i, []) for p in args.depth for i in args.integrator]
    variants, notes = [], []
    for preset, integrator, extra in grid:
        overrides = [f"depth={preset}", f"depth.integrator={integrator}", *args.override, *extra]
        cfg = compose(args.task, overrides)  # ConfigError: bad syntax, unknown key or option
        try:
            spec = run.depth_spec(cfg)
        except ConfigError as e:
            notes.append(f"skipped {preset}+{integrator}: {e}")
            continue
        if args.checkpoint_memory and not spec.share:
            raise ConfigError(
                f"--checkpoint-memory measures a shared model; depth={preset} has share=false"
            )
        label = f"{preset}+{integrator}" + (
            f" steps={spec.steps} ckpt={str(spec.checkpoint).lower()}"
            if args.checkpoint_memory
            else ""
        )
        variants.append(
            {
                "label": label,
                "preset": preset,
                "integrator": integrator,
                "steps": spec.steps,
                "checkpoint": spec.checkpoint,
                "overrides": overrides + _no_step_scheduler(cfg),
            }
        )
    if not variants:
        raise ConfigError("no valid (depth, integrator) combination: " + "; ".join(notes))
    return variants, notes


# ----------------------------------------------------------------------------- measuring (worker)


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
    train_step = run.training_step_fn(module, cfg.task.gradient_clip_val, amp)

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
        **_summary(times, items),
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
        out["lightning"] = _summary(light_t, items)
        out["lightning"]["bare_interleaved"] = _summary(bare_t, items)
        out["lightning"]["throughput_ratio"] = statistics.median(bare_t) / statistics.median(
            light_t
        )
    return out


def _summary(times: list[float], items: int) -> dict:
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


def _worker(payload: str) -> None:
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


# ----------------------------------------------------------------------------- driver


def _run_worker(job: dict, what: str):
    """Run one measuring job in a fresh ``python -m score_exp.bench --worker`` process."""
    proc = subprocess.run(
        [sys.executable, "-m", "score_exp.bench", "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len(MARK) :])


def _common_job(args: argparse.Namespace, device: str) -> dict:
    return {
        "task": args.task,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "steps_per_repeat": args.steps_per_repeat,
        "device": device,
        "threads": args.threads,
    }


def _run_variant(v: dict, args: argparse.Namespace, device: str) -> dict:
    job = {
        **_common_job(args, device),
        "overrides": v["overrides"],
        "lightning": args.lightning and not args.checkpoint_memory,
    }
    return {**v, **_run_worker(job, f"variant {v['label']}")}


def _run_interleaved(variants: list[dict], args, device: str) -> list[list[float]]:
    job = {**_common_job(args, device), "variants": [v["overrides"] for v in variants]}
    return _run_worker(job, "interleaved timing")


def _median_step(r: dict) -> float:
    """The step time ratios use: interleaved when measured, else the variant's own run."""
    return r["interleaved"]["step_s_median"] if "interleaved" in r else r["step_s_median"]


def ratios(results: list[dict]) -> list[dict]:
    """Each variant over the variant that differs from it in one setting, at its first value.

    With presets (stacked, score) and integrators (euler, heun, rk4): heun/euler and rk4/euler
    within each preset, score/stacked within each integrator; the NFE ratio sits beside each.
    """
    by_key = {(r["preset"], r["integrator"], r["steps"], r["checkpoint"]): r for r in results}
    first = {"preset": results[0]["preset"], "integrator": results[0]["integrator"]}
    out = []
    for r in results:
        for dim in ("integrator", "preset"):
            if r[dim] == first[dim]:
                continue
            key = (
                first["preset"] if dim == "preset" else r["preset"],
                first["integrator"] if dim == "integrator" else r["integrator"],
                r["steps"],
                r["checkpoint"],
            )
            ref = by_key.get(key)
            if ref is None:
                continue
            out.append(
                {
                    "name": f"{r[dim]}/{ref[dim]}",
                    "at": f"{dim}s compared at "
                    + (f"depth={r['preset']}" if dim == "integrator" else r["integrator"]),
                    "of": r["label"],
                    "over": ref["label"],
                    "step_time": _median_step(r) / _median_step(ref),
                    "throughput": _median_step(ref) / _median_step(r),
                    "interleaved": "interleaved" in r and "interleaved" in ref,
                    "nfe": r["nfe"] / ref["nfe"],
                    "params": r["params"] / ref["params"],
                }
            )
    return out


def checkpoint_growth(results: list[dict]) -> dict:
    """Peak training memory growth from the fewest to the most steps, with and without."""
    out = {}
    for ckpt in (False, True):
        rows = sorted((r for r in results if r["checkpoint"] == ckpt), key=lambda r: r["steps"])
        if len(rows) < 2:
            continue
        lo, hi = rows[0], rows[-1]
        entry = {"from_steps": lo["steps"], "to_steps": hi["steps"]}
        for field in ("train_mem_mb", "peak_mem_mb"):
            if lo[field] and hi[field] is not None:
                entry[f"{field}_growth_pct"] = 100.0 * (hi[field] / lo[field] - 1.0)
        out[f"checkpoint={str(ckpt).lower()}"] = entry
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(payload: dict) -> str:
    unit = payload["variants"][0]["unit"]
    lines = [
        f"# score-bench {payload['task']} on {payload['device']} ({payload['threads']} threads, "
        f"torch {payload['torch']}): median of {payload['repeats']} repeats x "
        f"{payload['steps_per_repeat']} steps after {payload['warmup']} warm-up steps",
        f"{'variant':<34}{'params':>12}{'nfe':>5}{'step ms':>10}{'min-max ms':>18}"
        f"{unit + '/s':>14}{'peak MB':>10}{'train MB':>10}{'interleaved ms':>16}"
        f"{'TFLOP/s':>9}{'MFU':>7}",
    ]
    for r in payload["variants"]:
        inter = 1e3 * r["interleaved"]["step_s_median"] if "interleaved" in r else None
        lines.append(
            f"{r['label']:<34}{r['params']:>12,}{r['nfe']:>5}{1e3 * r['step_s_median']:>10.2f}"
            f"{1e3 * r['step_s_min']:>9.2f}-{1e3 * r['step_s_max']:<8.2f}{r['throughput']:>14,.0f}"
            f"{_fmt(r['peak_mem_mb'], '.0f'):>10}{_fmt(r['train_mem_mb'], '.1f'):>10}"
            f"{_fmt(inter, '.2f'):>16}{_fmt(r.get('achieved_tflops'), '.3f'):>9}"
            f"{_fmt(r.get('mfu'), '.1%'):>7}"
        )
    if payload["ratios"]:
        basis = "interleaved" if all(q["interleaved"] for q in payload["ratios"]) else "own run"
        lines += [
            "",
            f"{'ratio':<18}{'of':<34}{'step time (' + basis + ')':>24}{'nfe':>6}{'params':>8}",
        ]
        for q in payload["ratios"]:
            lines.append(
                f"{q['name']:<18}{q['of']:<34}{q['step_time']:>24.3f}{q['nfe']:>6.2f}"
                f"{q['params']:>8.3f}"
            )
    if any("lightning" in r for r in payload["variants"]):
        lines += [
            "",
            f"{'Lightning vs bare (interleaved)':<34}{'bare/s':>14}{'Lightning/s':>14}{'ratio':>8}",
        ]
        for r in payload["variants"]:
            lt = r["lightning"]
            lines.append(
                f"{r['label']:<34}{lt['bare_interleaved']['throughput']:>14,.0f}"
                f"{lt['throughput']:>14,.0f}{lt['throughput_ratio']:>8.3f}"
            )
    for name, g in payload.get("checkpoint_memory", {}).items():
        lines.append(
            f"{name}: train memory {g['from_steps']} -> {g['to_steps']} steps: "
            f"{_fmt(g.get('train_mem_mb_growth_pct'), '+.1f')}% "
            f"(peak incl. process: {_fmt(g.get('peak_mem_mb_growth_pct'), '+.1f')}%)"
        )
    r0 = payload["variants"][0]
    if "flops_note" in r0:  # how the FLOPs were counted and which peak the MFU is of
        lines.append(f"FLOPs: {r0['flops_note']}; MFU: {r0['mfu_note']}")
    lines += [f"note: {n}" for n in payload["notes"]]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="score-bench",
        description="Training-step cost of depth variants (see `score_exp/bench.py`).",
    )
    p.add_argument("--task", default="shakespeare_char_cpu")
    p.add_argument("--depth", nargs="+", default=["stacked", "score"], help="depth presets")
    p.add_argument("--integrator", nargs="+", default=["euler"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--steps-per-repeat", type=int, default=10)
    p.add_argument(
        "--override", nargs="+", action="extend", default=[], help="Hydra overrides (k=v)"
    )
    p.add_argument("--lightning", action="store_true", help="also time through Trainer.fit")
    p.add_argument(
        "--checkpoint-memory",
        action="store_true",
        help="peak memory of the first (shared) preset vs steps, depth.checkpoint false/true",
    )
    p.add_argument("--checkpoint-steps", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads per variant")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``score-bench``."""
    args = parser().parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            raise ConfigError(f"device {device!r} is not available; use cpu or cuda")
        if args.checkpoint_memory and len(args.checkpoint_steps) < 2:
            raise ConfigError("--checkpoint-steps needs at least two step counts")
        variants, notes = plan(args)
    except ScoreExpError as e:
        print(f"score-bench: error: {e}", file=sys.stderr)
        sys.exit(2)
    results = []
    for v in variants:
        print(f"measuring {v['label']} ...", file=sys.stderr, flush=True)
        try:
            results.append(_run_variant(v, args, device))
        except RuntimeError as e:
            print(f"score-bench: error: {e}", file=sys.stderr)
            sys.exit(1)
    if not args.checkpoint_memory and len(results) > 1:
        print("measuring all variants interleaved ...", file=sys.stderr, flush=True)
        try:
            times = _run_interleaved(variants, args, device)
        except RuntimeError as e:
            print(f"score-bench: error: {e}", file=sys.stderr)
            sys.exit(1)
        for r, t in zip(results, times, strict=True):
            r["interleaved"] = _summary(t, r["items_per_step"])
    payload = {
        "task": args.task,
        "device": device,
        "threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "steps_per_repeat": args.steps_per_repeat,
        "overrides": args.override,
        "variants": results,
        "ratios": [] if args.checkpoint_memory else ratios(results),
        "notes": notes,
    }
    if args.checkpoint_memory:
        payload["checkpoint_memory"] = checkpoint_growth(results)
    print(report(payload))
    if args.json:
        from score_exp.io import atomic_write_json

        atomic_write_json(args.json, payload)
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
