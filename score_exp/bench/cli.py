"""``score-bench``: what one training step of each depth variant costs, measured side by side.

    score-bench --task shakespeare_char_cpu --depth stacked score --integrator euler heun rk4
    score-bench --task esol_mlp --depth score --lightning --json bench.json
    score-bench --task shakespeare_char_cpu --depth score --checkpoint-memory
    score-bench --task shakespeare_char_cpu --depth score --variant ancre depth.connect=ancre

For every (depth preset, integrator) the model is built exactly as ``score-train`` builds it
(:func:`score_exp.run.build` on the real configs plus ``--override``), then one fixed training
batch is stepped as a run steps it (:func:`score_exp.tasks.training_step.training_step_fn`: the module's own
``training_step`` and ``configure_optimizers``, backward, gradient clipping, optimiser and
per-step scheduler step) ``--warmup`` times untimed and ``--repeats`` x ``--steps-per-repeat``
times timed (``score_exp/bench/measure.py``; the tables: ``score_exp/bench/report.py``).
Reported: median and min/max step time over the repeats, throughput (tokens/s for language models,
molecules/s for ESOL), peak memory, parameters and NFE, then ratios between variants that differ
in one setting only (heun/euler within a preset, score/stacked within an integrator, a
``--variant`` over the same preset and integrator without its overrides).

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
import subprocess
import sys
from pathlib import Path

from score_exp import config, run
from score_exp.bench.measure import MARK, compose, summary
from score_exp.bench.report import checkpoint_growth, ratios, report
from score_exp.errors import ConfigError, ScoreExpError
from score_exp.runs.files import check_output_dir

# ----------------------------------------------------------------------------- configs


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(config.CONFIG_DIR) / group).glob("[!_]*.yaml"))


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

    named = _named_variants(getattr(args, "variant", None))
    if args.checkpoint_memory:
        grid = [
            (args.depth[0], args.integrator[0], "", [f"depth.steps={s}", f"depth.checkpoint={c}"])
            for s in args.checkpoint_steps
            for c in ("false", "true")
        ]
    else:
        grid = [(p, i, n, o) for p in args.depth for i in args.integrator for n, o in named]
    variants, notes = [], []
    for preset, integrator, name, extra in grid:
        overrides = [f"depth={preset}", f"depth.integrator={integrator}", *args.override, *extra]
        cfg = compose(args.task, overrides)  # ConfigError: bad syntax, unknown key or option
        _check_data(cfg)  # the data module's values (batch_size, ...), before any measurement
        try:
            spec = config.depth_spec(cfg)
        except ConfigError as e:
            notes.append(f"skipped {preset}+{integrator}{'+' + name if name else ''}: {e}")
            continue
        if args.checkpoint_memory and not spec.share:
            raise ConfigError(
                f"--checkpoint-memory measures a shared model; depth={preset} has share=false"
            )
        label = (
            f"{preset}+{integrator}"
            + (f"+{name}" if name else "")
            + (
                f" steps={spec.steps} ckpt={str(spec.checkpoint).lower()}"
                if args.checkpoint_memory
                else ""
            )
        )
        variants.append(
            {
                "label": label,
                "preset": preset,
                "integrator": integrator,
                "variant": name or "base",
                "steps": spec.steps,
                "checkpoint": spec.checkpoint,
                "overrides": overrides + _no_step_scheduler(cfg),
            }
        )
    if not variants:
        raise ConfigError("no valid (depth, integrator) combination: " + "; ".join(notes))
    return variants, notes


def _check_json_path(path: Path) -> None:
    """``--json PATH`` can be written: not a folder, and its folder is (or can be) made."""
    if path.is_dir():
        raise ConfigError(f"--json {path} is a folder; give a file name")
    check_output_dir(path.parent, "--json")


def _check_data(cfg) -> None:
    """Build (not prepare) the task's data module: its constructor checks its values.

    Raises:
        ConfigError: a bad ``task.data`` value.
    """
    run.data_module(cfg)


def _named_variants(given: list[list[str]] | None) -> list[tuple[str, list[str]]]:
    """``--variant NAME K=V ...`` options -> [("", []), (NAME, [K=V, ...]), ...].

    The unnamed base (no extra overrides) always comes first: it is what ratios compare against.
    """
    out: list[tuple[str, list[str]]] = [("", [])]
    for v in given or []:
        name, *overrides = v
        if "=" in name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"--variant takes a NAME first, then overrides; got {name!r}")
        if name in {n for n, _ in out} or name == "base":
            raise ConfigError(f"--variant {name!r} is given twice (or is the reserved 'base')")
        if not overrides or any("=" not in o for o in overrides):
            raise ConfigError(f"--variant {name} needs overrides k=v after its name")
        out.append((name, overrides))
    return out


# ----------------------------------------------------------------------------- driver


def _run_worker(job: dict, what: str):
    """Run one measuring job in a fresh ``python -m score_exp.bench.cli --worker`` process."""
    proc = subprocess.run(
        [sys.executable, "-m", "score_exp.bench.cli", "--worker", json.dumps(job)],
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="score-bench",
        description="Training-step cost of depth variants (see `score_exp/bench/cli.py`).",
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
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        metavar=("NAME", "K=V"),
        help="another variant of every preset: NAME then overrides (repeatable); "
        "ratios compare it with the preset without them",
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
        from score_exp.bench.measure import worker

        worker(args.worker)
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
            raise ConfigError(f"device {device!r} is not available; use cpu or cuda")
        if args.checkpoint_memory and len(args.checkpoint_steps) < 2:
            raise ConfigError("--checkpoint-steps needs at least two step counts")
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        if args.json is not None:
            _check_json_path(args.json)
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
            r["interleaved"] = summary(t, r["items_per_step"])
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
        from score_exp.runs.files import atomic_write_json

        atomic_write_json(args.json, payload)
        print(f"json: {args.json}")


if __name__ == "__main__":
    main()
