"""``make gpu-check`` (``python -m score_exp.bench.gpu_check``): a clear exit without CUDA, and the whole
orchestration on CPU with tiny budgets (``--dry-run``)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import cli_env, run_cli

from score_exp.bench.gpu_check import markdown, targets

NO_CUDA = cli_env(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # no GPU, even on a GPU machine


def test_without_cuda_it_exits_2_with_one_line(tmp_path):
    out = run_cli("--out", str(tmp_path), module="score_exp.bench.gpu_check", env=NO_CUDA)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: error: no CUDA device"), out.stderr
    assert "Traceback" not in out.stderr and not any(tmp_path.iterdir())


def test_unknown_step_is_one_line_exit_2(tmp_path):
    out = run_cli("--dry-run", "--only", "nope", "--out", str(tmp_path),
                  module="score_exp.bench.gpu_check", env=NO_CUDA)  # fmt: skip
    assert out.returncode == 2 and out.stderr.strip() == "gpu-check: error: unknown step 'nope'"


def _summary(val, wall, dry_run=False):
    return {"dry_run": dry_run, "steps": {"train_stacked": {"best_val": val, "wall_time_s": wall}}}


@pytest.mark.parametrize(
    "val, wall, met", [(1.47, 170.0, True), (1.52, 170.0, False), (1.47, 200.0, False)]
)
def test_target_is_best_val_at_most_1_50_in_under_3_minutes(val, wall, met):
    assert targets(_summary(val, wall))["met"] is met
    assert targets(_summary(val, wall, dry_run=True))["met"] is None  # CPU: no target


@pytest.mark.slow
def test_dry_run_runs_every_step_on_cpu_and_writes_both_summaries(tmp_path, compose):
    out = run_cli(
        "--dry-run", "--out", str(tmp_path), module="score_exp.bench.gpu_check", env=NO_CUDA
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["tests", "train_stacked", "train_score", "esol_mlp", "esol_gnn",
                           "esol_attentivefp", "bench", "ddp"]  # fmt: skip
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert "skipped" in steps["tests"]["summary"]  # the CUDA tests skip on CPU
    from score_exp.bench.flops import gpt_flops_per_token
    from score_exp.config import depth_spec
    from score_exp.models import GPT

    for preset in ("stacked", "score"):
        s = steps[f"train_{preset}"]
        assert s["run_status"] == "ok" and math.isfinite(s["best_val"]) and s["tokens_per_s"] > 0
        assert s["recompiles"] == 0  # eager on CPU
        assert s["mfu"] is None and s["achieved_tflops"] > 0  # no CPU peak: no MFU
        cfg = compose("task=shakespeare_char_cpu", f"depth={preset}")
        model = GPT(65, 64, depth_spec(cfg), n_head=4, n_embd=128)
        assert s["flops_per_token"] == gpt_flops_per_token(model, 64)["train"]
    # a shared block costs the compute of the stack: the same FLOPs per token, fewer parameters
    assert steps["train_score"]["flops_per_token"] == steps["train_stacked"]["flops_per_token"]
    assert steps["train_score"]["params"] < steps["train_stacked"]["params"]
    assert [v["label"] for v in steps["bench"]["variants"]] == ["stacked+euler", "score+euler"]
    for name, nfe in (("esol_mlp", 4), ("esol_gnn", 4), ("esol_attentivefp", None)):
        s = steps[name]
        assert s["run_status"] == "ok" and s["nfe"] == nfe and s["test"]["rmse"] > 0, s
    assert "task/model=attentivefp" in steps["esol_attentivefp"]["command"]
    assert steps["ddp"]["run_status"] == "ok"
    assert summary["targets"]["met"] is None
    md = (tmp_path / "gpu_check.md").read_text()
    assert md == markdown(summary) and "| train_score | ok |" in md and "| ddp | ok |" in md
    assert "| esol_attentivefp | " in md.split("| molecules |", 1)[1]
