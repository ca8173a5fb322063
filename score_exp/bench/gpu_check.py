"""``make gpu-check``: everything a GPU machine should measure, in one command.

    python -m score_exp.bench.gpu_check             # on a CUDA machine (make gpu-check)
    python -m score_exp.bench.gpu_check --dry-run   # the same orchestration on CPU, tiny budgets

Steps, each a fresh subprocess whose output goes to ``<out>/logs/``; a failing step is recorded
and the others still run:

1. ``tests``: ``pytest -m cuda`` (the CUDA-marked tests, ``tests/test_cuda.py``).
2. ``train_stacked``, ``train_score``: nanoGPT's GPU preset (``task=shakespeare_char
   trainer=gpu``, 5000 iterations, bf16, ``task.model.compile=true``) for ``depth=stacked``
   (nanoGPT itself) and ``depth=score``: best val loss, wall time, tokens/s (median of the
   logged intervals after the first, which holds the compilation), model FLOPs per token
   (:mod:`score_exp.bench.flops`), MFU against the device's bf16 dense peak, and the number of
   recompilations (``TORCH_LOGS=recompiles``; 1 is inherent: training -> validation).
3. ``esol_mlp``, ``esol_gnn``, ``esol_attentivefp``: the molecule tasks on CUDA for a few epochs
   (:data:`MOLECULE_EPOCHS`): the MLP (``depth=score``), the MPNN (PyG on CUDA, ``score025``) and
   PyG's AttentiveFP reference (``task/model=attentivefp``): best val, test RMSE, wall time.
4. ``bench``: ``score-bench`` on CUDA (stacked vs score, bf16, compiled), with MFU.
5. ``ddp``: a 2-GPU DDP smoke run of the CPU preset when 2+ GPUs exist (skipped otherwise).

Writes ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``. Without CUDA (and without
``--dry-run``) it exits with one line and code 2. ``--dry-run`` runs every step on CPU with tiny
budgets (the CPU preset, eager, DDP over 2 gloo processes): it proves the orchestration, not
the GPU. Exit code 1 when a step failed, else 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from score_exp.runs.record import RunFolder, RunRecord

REPO = Path(__file__).resolve().parents[2]
RECOMPILING = re.compile(r"Recompiling function")
# nanoGPT's README: the GPU preset reaches val 1.4697 in about 3 minutes on one A100.
TARGET_VAL, TARGET_WALL_S = 1.50, 180.0
# score-bench's per-variant fields kept in the summary
BENCH_FIELDS = ("label", "params", "nfe", "step_s_median", "throughput", "unit",
                "achieved_tflops", "mfu", "mfu_note")  # fmt: skip
# The molecule tasks: (step name, overrides). A few epochs each on the GPU (1 in a dry run).
MOLECULES = (
    ("esol_mlp", ["task=esol_mlp", "depth=score"]),
    ("esol_gnn", ["task=esol_gnn", "depth=score025"]),
    ("esol_attentivefp", ["task=esol_gnn", "task/model=attentivefp"]),
)
MOLECULE_EPOCHS = 20


def plan(dry_run: bool, max_steps: int | None, n_gpus: int) -> list[dict]:
    """The steps to run: name, command (``python -m ...`` arguments) and what to read back."""
    py = [sys.executable, "-m"]
    if dry_run:
        train = ["task=shakespeare_char_cpu", "task.max_steps=20", "task.val_check_interval=10",
                 "task.data.eval_iters=2", "task.log_every_n_steps=5"]  # fmt: skip
        bench = ["--task", "shakespeare_char_cpu", "--device", "cpu", "--repeats", "2",
                 "--warmup", "1", "--steps-per-repeat", "2", "--threads", "1"]  # fmt: skip
        ddp = ["trainer=ddp_cpu", "task.max_steps=10", "task.val_check_interval=5",
               "task.data.eval_iters=4"]  # fmt: skip
        tests = ["tests/test_cuda.py"]
        molecules = ["trainer.max_epochs=1"]
        width = {"esol_mlp": "task.model.hidden=16", "esol_gnn": "task.model.hidden=16",
                 "esol_attentivefp": "task.model.hidden_channels=16"}  # fmt: skip
    else:
        train = ["task=shakespeare_char", "trainer=gpu", "task.model.compile=true"]
        if max_steps is not None:
            train.append(f"task.max_steps={max_steps}")
        bench = ["--task", "shakespeare_char", "--device", "cuda", "--warmup", "10",
                 "--override", "trainer=gpu", "task.model.compile=true"]  # fmt: skip
        ddp = ["trainer=ddp", "trainer.devices=2", "task.max_steps=200",
               "task.val_check_interval=100", "task.data.eval_iters=4"]  # fmt: skip
        tests = ["tests"]
        molecules = ["trainer=gpu", f"trainer.max_epochs={MOLECULE_EPOCHS}"]
        width = {}
    quiet = ["trainer.enable_progress_bar=false"]
    steps = [{"name": "tests", "kind": "tests", "cmd": [*py, "pytest", "-m", "cuda", "-q", *tests]}]
    for preset in ("stacked", "score"):
        steps.append(
            {
                "name": f"train_{preset}",
                "kind": "train",
                "cmd": [*py, "score_exp.cli.train", *train, f"depth={preset}", *quiet],
                "run_dir": f"runs/{preset}",
            }
        )
    for name, overrides in MOLECULES:
        extra = [width[name]] if name in width else []
        steps.append(
            {
                "name": name,
                "kind": "molecules",
                "cmd": [*py, "score_exp.cli.train", *overrides, *molecules, *extra, *quiet],
                "run_dir": f"runs/{name}",
            }
        )
    bench_cmd = [*py, "score_exp.bench.cli", *bench, "--depth", "stacked", "score"]
    steps.append({"name": "bench", "kind": "bench", "cmd": bench_cmd})
    ddp_step = {
        "name": "ddp",
        "kind": "ddp",
        "cmd": [*py, "score_exp.cli.train", "task=shakespeare_char_cpu", "depth=score"]
        + ddp
        + quiet,
        "run_dir": "runs/ddp",
    }
    if not dry_run and n_gpus < 2:
        ddp_step["skip"] = f"needs 2+ GPUs, found {n_gpus}"
    steps.append(ddp_step)
    return steps


def _run(step: dict, out: Path, timeout: float) -> dict:
    """Run one step's command; its output goes to ``out/logs/<name>.log``."""
    cmd = list(step["cmd"])
    if "run_dir" in step:
        cmd.append(f"hydra.run.dir={out / step['run_dir']}")
    if step["kind"] == "bench":
        cmd += ["--json", str(out / "bench.json")]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if step["kind"] == "train":
        env["TORCH_LOGS"] = "recompiles"  # one "Recompiling function" line per recompilation
    log = out / "logs" / f"{step['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, stdout, stderr = (
            None,
            _text(e.stdout),
            _text(e.stderr) + f"\ntimed out after {timeout}s",
        )
    seconds = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n\n{stdout}\n--- stderr ---\n{stderr}")
    result = {
        "status": "ok" if rc == 0 else "failed",
        "returncode": rc,
        "seconds": round(seconds, 1),
        "command": " ".join(cmd),
        "log": str(log.relative_to(out)),
    }
    if rc != 0:
        result["error"] = (stderr.strip().splitlines() or ["(no output)"])[-1][:500]
    if step["kind"] == "train":
        result["recompiles"] = len(RECOMPILING.findall(stderr))
    if step["kind"] == "tests":
        result["summary"] = (stdout.strip().splitlines() or [""])[-1]
    return result


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _tokens_per_s(run_dir: Path) -> float | None:
    """Median of the logged ``train/tokens_per_s`` after the first interval (compilation)."""
    path = RunFolder(run_dir).metrics
    if not path.exists():
        return None
    with open(path) as f:
        values = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f)
                  if r.get("train/tokens_per_s")]  # fmt: skip
    values = values[1:] or values
    return statistics.median(values) if values else None


def _flops_per_token(run_dir: Path) -> dict:
    """The run's model FLOPs per token, its model rebuilt from its config as score-train built it."""
    from score_exp.bench.flops import gpt_flops_per_token
    from score_exp.run import build, run_config

    cfg = run_config(run_dir)
    model = build(cfg, "fit", model_overrides={"compile": False}).model
    return gpt_flops_per_token(model, cfg.task.data.block_size)


def read_run(result: dict, run_dir: Path) -> RunRecord | None:
    """Add a run's status, params, nfe, best val, test metrics and wall time to ``result``;
    return its record (None when it wrote none)."""
    folder = RunFolder(run_dir)
    if not folder.results.exists():
        return None
    r = RunRecord.load(folder)
    result["run_status"] = r.status
    if not r.ok:
        result["status"] = "failed"
        result.setdefault("error", r.error or f"run status {r.status}")
    result.update(params=r.params, nfe=r.nfe, best_val=r.best_value, test=r.test)
    result["wall_time_s"] = r.wall_time_s
    return r


def read_train(result: dict, run_dir: Path, device_type: str, device_name: str) -> None:
    """Add a training run's figures (best val, wall time, tokens/s, FLOPs, MFU) to ``result``."""
    from score_exp.bench.flops import mfu

    if read_run(result, run_dir) is None:
        return
    result["tokens_per_s"] = _tokens_per_s(run_dir)
    flops = _flops_per_token(run_dir)
    result["flops_per_token"] = flops["train"]
    if result["tokens_per_s"] is not None:
        result.update(mfu(flops["train"], result["tokens_per_s"], device_type, device_name))


def read_bench(result: dict, path: Path) -> None:
    if not path.exists():
        return
    payload = json.loads(path.read_text())
    result["variants"] = [{k: v.get(k) for k in BENCH_FIELDS} for v in payload["variants"]]


def targets(summary: dict) -> dict:
    """nanoGPT's target for the stacked GPU preset: best val <= 1.50 in under 3 minutes."""
    s = summary["steps"].get("train_stacked", {})
    val, wall = s.get("best_val"), s.get("wall_time_s")
    return {
        "stacked_best_val": val,
        "stacked_wall_time_s": wall,
        "best_val_target": TARGET_VAL,
        "wall_time_target_s": TARGET_WALL_S,
        "met": None
        if summary["dry_run"] or val is None or wall is None
        else bool(val <= TARGET_VAL and wall < TARGET_WALL_S),
    }


def _f(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(summary: dict) -> str:
    s = summary["steps"]
    lines = [
        f"# gpu-check {'(dry run on CPU: tiny budgets, no GPU figures)' if summary['dry_run'] else ''}",
        "",
        f"{summary['started']} | device: {summary['device']} | torch {summary['torch']} | "
        f"CUDA {summary['cuda']} | GPUs: {summary['n_gpus']}",
        "",
        "| step | status | seconds | notes |",
        "|---|---|---|---|",
    ]
    for name, r in s.items():
        note = r.get("skipped") or r.get("error") or r.get("summary") or ""
        lines.append(f"| {name} | {r['status']} | {_f(r.get('seconds'), '.0f')} | {note} |")
    mols = {k: v for k, v in s.items() if k in dict(MOLECULES) and "best_val" in v}
    if mols:
        lines += ["", "| molecules | params | nfe | best val rmse | test rmse | wall s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in mols.items():
            lines.append(
                f"| {name} | {_f(r.get('params'), ',')} | {r.get('nfe')} | "
                f"{_f(r.get('best_val'), '.4f')} | {_f((r.get('test') or {}).get('rmse'), '.4f')} "
                f"| {_f(r.get('wall_time_s'), '.0f')} |"
            )
    train = {k: v for k, v in s.items() if k.startswith("train_") and "best_val" in v}
    if train:
        lines += [
            "",
            "| run | params | nfe | best val | wall s | tokens/s | FLOPs/token | TFLOP/s | MFU "
            "| recompiles |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in train.items():
            lines.append(
                f"| {name[6:]} | {_f(r.get('params'), ',')} | {r.get('nfe')} | "
                f"{_f(r.get('best_val'), '.4f')} | {_f(r.get('wall_time_s'), '.0f')} | "
                f"{_f(r.get('tokens_per_s'), ',.0f')} | {_f(r.get('flops_per_token'), '.3g')} | "
                f"{_f(r.get('achieved_tflops'), '.2f')} | {_f(r.get('mfu'), '.1%')} | "
                f"{r.get('recompiles')} |"
            )
        note = next((r["mfu_note"] for r in train.values() if "mfu_note" in r), None)
        if note:
            lines.append(f"\nMFU peak: {note}")
    for v in s.get("bench", {}).get("variants", []):
        if v is s["bench"]["variants"][0]:
            lines += [
                "",
                "| score-bench | step ms | throughput | TFLOP/s | MFU |",
                "|---|---|---|---|---|",
            ]
        lines.append(
            f"| {v['label']} | {_f(1e3 * v['step_s_median'], '.2f')} | "
            f"{_f(v['throughput'], ',.0f')} {v['unit']}/s | {_f(v['achieved_tflops'], '.2f')} | "
            f"{_f(v['mfu'], '.1%')} |"
        )
    t = summary["targets"]
    if t["met"] is not None:
        lines += [
            "",
            f"Target (stacked: best val <= {t['best_val_target']} in < {t['wall_time_target_s']:.0f}"
            f" s): {'met' if t['met'] else 'MISSED'} (val {_f(t['stacked_best_val'], '.4f')}, "
            f"{_f(t['stacked_wall_time_s'], '.0f')} s)",
        ]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gpu-check",
        description="Run the CUDA tests, nanoGPT's GPU preset (stacked and SCORE), the ESOL MLP, "
        "GNN and AttentiveFP for a few epochs, score-bench and a 2-GPU DDP smoke run; write "
        "gpu_check.json and gpu_check.md (see score_exp/bench/gpu_check.py).",
    )
    p.add_argument("--dry-run", action="store_true", help="every step on CPU with tiny budgets")
    p.add_argument("--out", type=Path, default=None, help="default: outputs/gpu_check/<time>")
    p.add_argument("--max-steps", type=int, default=None, help="GPU preset iterations (5000)")
    p.add_argument(
        "--only", nargs="+", default=None, help="run these steps only (tests train_stacked ...)"
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per step")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 all ok, 1 a step failed, 2 no CUDA)."""
    args = parser().parse_args(argv)
    import torch

    from score_exp.runs.files import atomic_write_json, atomic_write_text

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu-check: error: no CUDA device (torch.cuda.is_available() is False); run it on a "
            "GPU machine, or add --dry-run for the CPU smoke run",
            file=sys.stderr,
        )
        return 2
    if args.max_steps is not None and args.max_steps < 1:
        print(f"gpu-check: error: --max-steps must be >= 1, got {args.max_steps}", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available() and not args.dry_run
    n_gpus = torch.cuda.device_count() if cuda else 0
    device_type = "cuda" if cuda else "cpu"
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    started = datetime.now()
    out = args.out or REPO / "outputs" / "gpu_check" / started.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(args.dry_run, args.max_steps, n_gpus)
    if args.only:
        unknown = sorted(set(args.only) - {s["name"] for s in steps})
        if unknown:
            print(f"gpu-check: error: unknown step {unknown[0]!r}", file=sys.stderr)
            return 2
        steps = [s for s in steps if s["name"] in args.only]
    summary: dict[str, Any] = {
        "dry_run": args.dry_run,
        "started": started.isoformat(timespec="seconds"),
        "device": device_name,
        "n_gpus": n_gpus,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "out": str(out),
        "steps": {},
    }
    for step in steps:
        if "skip" in step:
            summary["steps"][step["name"]] = {"status": "skipped", "skipped": step["skip"]}
            continue
        print(f"gpu-check: {step['name']} ...", file=sys.stderr, flush=True)
        result = _run(step, out, args.timeout)
        if step["kind"] == "train":
            read_train(result, out / step["run_dir"], device_type, device_name)
        elif step["kind"] == "molecules":
            read_run(result, out / step["run_dir"])
        elif step["kind"] == "ddp":
            read_train(result, out / step["run_dir"], "cpu", "cpu")  # a smoke run: no MFU
        elif step["kind"] == "bench":
            read_bench(result, out / "bench.json")
        summary["steps"][step["name"]] = result
    summary["targets"] = targets(summary)
    atomic_write_json(out / "gpu_check.json", summary)
    text = markdown(summary)
    atomic_write_text(out / "gpu_check.md", text)
    print(text)
    print(f"gpu-check: {out / 'gpu_check.json'} and gpu_check.md")
    return 1 if any(r["status"] == "failed" for r in summary["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
