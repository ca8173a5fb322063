"""bf16 autocast on CPU (``trainer.precision=bf16-mixed``): every task trains through the real CLI
with finite, decreasing training loss."""

from __future__ import annotations

import csv
import math

import pytest
from conftest import load_results, train_cli

pytestmark = pytest.mark.slow

TASKS = {
    "esol_mlp": ["task=esol_mlp", "task.model.hidden=64", "trainer.max_epochs=4"],
    "esol_gnn": ["task=esol_gnn", "task.model.hidden=32", "trainer.max_epochs=4"],
    "shakespeare_char_cpu": [
        "task=shakespeare_char_cpu",
        "task.max_steps=40",
        "task.val_check_interval=20",
        "task.data.eval_iters=2",
        "task.log_every_n_steps=5",
    ],
}


def train_losses(run_dir) -> list[float]:
    """The logged ``train/loss`` values in step order (per epoch for ESOL, per 5 steps for GPT)."""
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


@pytest.mark.parametrize("task", TASKS)
def test_bf16_mixed_on_cpu_trains_every_task(tmp_path, task):
    run_dir = tmp_path / task
    out = train_cli(run_dir, *TASKS[task], "trainer.precision=bf16-mixed")
    assert out.returncode == 0, out.stderr[-3000:]
    r = load_results(run_dir)
    assert r["status"] == "ok", r.get("error")
    # Lightning took its autocast path (torch.autocast("cpu", dtype=torch.bfloat16)).
    assert "bfloat16 Automatic Mixed Precision" in (run_dir / "train.log").read_text()
    losses = train_losses(run_dir)
    assert len(losses) >= 4 and all(math.isfinite(v) for v in losses)
    # Decreasing: the last logged loss is below the first, and the second half's mean below
    # the first half's (one noisy interval cannot decide it).
    half = len(losses) // 2
    assert losses[-1] < losses[0]
    assert sum(losses[half:]) / (len(losses) - half) < sum(losses[:half]) / half
    assert all(math.isfinite(v) for v in r["test"].values())
