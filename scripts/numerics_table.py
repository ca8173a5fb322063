"""The bit-identity table of the numerics modes, and the portable mode's cost, on this machine.

The same short score-train run (ESOL MLP, ESOL GNN) under every kernel choice a user's environment
can make here (ATEN_CPU_CAPABILITY, MKL_CBWR, threads), in the default and the portable mode,
interleaved (this VM drifts); prints per run the kernels it got and its best val / test RMSE as
exact floats, whether every run of a mode is bit-identical, and the median time per epoch of each
mode side by side.

    .venv/bin/python scripts/numerics_table.py [--epochs-mlp 3] [--epochs-gnn 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ENVS = [{}, {"ATEN_CPU_CAPABILITY": "default"}, {"ATEN_CPU_CAPABILITY": "avx2"},
        {"ATEN_CPU_CAPABILITY": "avx512"}, {"MKL_CBWR": "AUTO"}, {"MKL_CBWR": "AVX2"},
        {"MKL_CBWR": "AVX512"}, {"MKL_CBWR": "COMPATIBLE"}, {"OMP_NUM_THREADS": "1"}]  # fmt: skip
KNOBS = (
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "ONEDNN_MAX_CPU_ISA",
)


def run(task: str, epochs: int, mode: str, env: dict, out: Path) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in KNOBS}
    cmd = [sys.executable, "-m", "score_exp.cli.train", f"task={task}", f"numerics={mode}",
           f"task.max_epochs={epochs}", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "results.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs-mlp", type=int, default=3)
    p.add_argument("--epochs-gnn", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="keep the run folders here")
    p.add_argument("--envs", type=int, nargs="*", help="indices into ENVS (default: all)")
    args = p.parse_args()
    envs = [ENVS[i] for i in args.envs] if args.envs else ENVS
    root = args.out or Path(tempfile.mkdtemp(prefix="numerics_table_"))
    rows, times = [], {}
    for task, epochs in (("esol_mlp", args.epochs_mlp), ("esol_gnn", args.epochs_gnn)):
        for i, env in enumerate(envs):
            for mode in ("default", "portable") if i % 2 == 0 else ("portable", "default"):
                r = run(task, epochs, mode, env, root / f"{task}_{mode}_{i}")
                k = r["numerics"]
                env_s = " ".join(f"{a}={b}" for a, b in env.items()) or "(unset)"
                rows.append((task, mode, env_s, f"{k['cpu_capability']}/{k['mkl_branch']}/{k['threads']}",
                             repr(r["best_val"]["value"]), repr(r["test"]["rmse"])))  # fmt: skip
                times.setdefault((task, mode), []).append(r["time_per_epoch_s"])
                print(" | ".join(rows[-1]), flush=True)
    print(
        "\n| task | mode | environment | kernels (ATen/MKL/threads) | best val RMSE | test RMSE |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for task in ("esol_mlp", "esol_gnn"):
        for mode in ("default", "portable"):
            values = {(r[4], r[5]) for r in rows if r[0] == task and r[1] == mode}
            print(f"{task} {mode}: {len(values)} distinct result(s) over {len(envs)} environments"
                  + (" (bit-identical)" if len(values) == 1 else ""))  # fmt: skip
        d, q = (statistics.median(times[(task, m)]) for m in ("default", "portable"))
        print(
            f"{task} time per epoch, median over {len(envs)} interleaved runs: default {d:.3f} s, "
            f"portable {q:.3f} s, portable / default {q / d:.2f}x"
        )
    print(f"run folders: {root}")


if __name__ == "__main__":
    main()
