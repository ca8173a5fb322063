"""The CPU-preset checks again on a CUDA device: bf16 autocast, the core, a short CLI run.

Marked ``cuda`` and skipped (with the reason shown by ``-ra``) where no GPU exists, as in CI.
Run on a GPU machine with ``pytest -m cuda``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_results, train_cli
from test_gpt import PRESETS, build_model

from score_exp.core import DepthSpec, RecurrentDepth

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("integrator", ["euler", "heun", "rk4"])
def test_core_matches_the_cpu_result_on_cuda(integrator):
    spec = DepthSpec(steps=4, dt=0.5, integrator=integrator)
    torch.manual_seed(0)
    cpu = RecurrentDepth(lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), spec)
    gpu = RecurrentDepth(lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()), spec)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    h = torch.randn(4, 8)
    assert torch.allclose(gpu(h.cuda()).cpu(), cpu(h), atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_each_depth_preset_trains_a_bf16_step_on_cuda(compose, preset):
    model = build_model(compose("task=shakespeare_char_cpu", f"depth={preset}")).cuda()
    x, y = torch.randint(0, 65, (2, 2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(x, y)
    assert logits.shape == (2, 16, 65) and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_cli_trains_the_cpu_preset_on_the_gpu(tmp_path):
    run_dir = tmp_path / "gpu"
    out = train_cli(
        run_dir,
        "task=shakespeare_char_cpu",
        "trainer=gpu",
        "task.max_steps=60",
        "task.val_check_interval=20",
        "task.data.eval_iters=4",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = load_results(run_dir)
    assert r["status"] == "ok" and r["test"]["loss"] < 4.17  # below ln(65) after 60 steps


def test_compiled_gpt_trains_like_eager_in_bf16_without_recompiling(compose):
    """torch.compile (inductor -> Triton) on CUDA under bf16 autocast: the same first losses as
    eager to bf16 precision, and one graph for every training step."""
    from torch._dynamo.utils import counters

    cfg = compose("task=shakespeare_char_cpu", "depth=score")
    x, y = torch.randint(0, 65, (2, 12, 64), device="cuda")
    losses = {}
    for name in ("eager", "compiled"):
        model = build_model(cfg).cuda()
        if name == "compiled":
            torch._dynamo.reset()
            counters.clear()
            model.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        losses[name] = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert counters["stats"]["unique_graphs"] == 1
    # bf16 matmuls in another order: agreement to a few bf16 ulps (2^-8 relative) per step
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=2e-2)
