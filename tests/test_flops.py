"""Model FLOPs per token/molecule against hand counts and torch's FlopCounterMode; peak table; MFU."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from score_exp.bench.flops import (
    counted_flops,
    flops_per_item,
    gpt_flops_per_token,
    mfu,
    mlp_flops_per_molecule,
    peak_bf16_flops,
)
from score_exp.core import DepthSpec
from score_exp.models import GPT, RecurrentMLP

V, T, C, NH = 65, 32, 16, 2  # a tiny GPT: vocabulary, context, width, heads
# One nanoGPT block at C = 16, bias=False: c_attn 16*48 + c_proj 16*16 + c_fc 16*64 + c_proj 64*16
# = 3,072 matmul weights, + 2 LayerNorm gains of 16 = 3,104.
BLOCK, BLOCK_MATMUL = 3104, 3072
OUTSIDE, OUTSIDE_MATMUL = V * C + C, V * C  # tied wte/lm_head 1,040 + ln_f 16 (wpe left out)

# (share, steps, update, integrator) -> nfe
DEPTHS = {
    "score euler 4": (True, 4, "contractive", "euler", 4),
    "stacked 3": (False, 3, "none", "euler", 3),
    "score rk4 2": (True, 2, "contractive", "rk4", 8),
    "stacked residual heun 2": (False, 2, "residual", "heun", 4),
}


def tiny_gpt(share, steps, update, integrator) -> GPT:
    torch.manual_seed(0)
    spec = DepthSpec(share=share, steps=steps, dt=0.5, update=update, integrator=integrator)
    return GPT(V, T, spec, n_head=NH, n_embd=C)


@pytest.mark.parametrize("name", DEPTHS)
def test_gpt_flops_per_token_match_the_hand_count(name):
    *args, nfe = DEPTHS[name]
    model = tiny_gpt(*args)
    n_eff = OUTSIDE + nfe * BLOCK  # compute follows evaluations of F, not distinct parameters
    attn = nfe * T * C
    assert model.depth.nfe == nfe
    assert gpt_flops_per_token(model, T) == {
        "forward": 2 * n_eff + 4 * attn,
        "train": 6 * n_eff + 12 * attn,
        "n_eff": n_eff,
    }
    # score euler 4 written out: N_eff = 1,056 + 4 * 3,104 = 13,472; 2 N_eff + 4*4*32*16 = 35,136
    if name == "score euler 4":
        assert gpt_flops_per_token(model, T)["forward"] == 35136


def test_stacked_euler_n_eff_is_nanogpts_parameter_count():
    model = tiny_gpt(False, 3, "none", "euler")
    assert gpt_flops_per_token(model, T)["n_eff"] == model.get_num_params(non_embedding=True)


def test_a_shared_block_costs_the_compute_of_a_stack_of_the_same_nfe():
    shared, stacked = tiny_gpt(True, 3, "contractive", "euler"), tiny_gpt(False, 3, "none", "euler")
    assert shared.get_num_params() < stacked.get_num_params()
    assert gpt_flops_per_token(shared, T) == gpt_flops_per_token(stacked, T)


@pytest.mark.parametrize("name", DEPTHS)
def test_gpt_count_equals_flop_counter_mode_forward_and_backward(name):
    """FlopCounterMode counts matmuls; the math SDPA kernel makes attention two batched matmuls
    it sees (CPU's fused kernel is not counted). Matmul weights only: EXACT, forward and
    forward + backward (= 3x). nanoGPT's convention (norm gains in N): within 2% here (1.1%)."""
    *args, nfe = DEPTHS[name]
    model = tiny_gpt(*args)
    B = 3
    x = torch.randint(0, V, (B, T))
    with sdpa_kernel(SDPBackend.MATH):
        fwd = counted_flops(lambda: model(x, x))
        train = counted_flops(lambda: model(x, x)[1].backward())
    exact = gpt_flops_per_token(model, T, matmul_only=True)
    assert exact["n_eff"] == OUTSIDE_MATMUL + nfe * BLOCK_MATMUL
    assert fwd == B * T * exact["forward"]
    assert train == B * T * exact["train"]
    nanogpt = gpt_flops_per_token(model, T)
    assert abs(nanogpt["forward"] / (fwd / (B * T)) - 1) < 0.02


def test_mlp_flops_per_molecule_match_the_hand_count_and_flop_counter_mode():
    model = RecurrentMLP(10, DepthSpec(steps=3, dt=0.5), hidden=8)
    # encoder 10*8 + 8, 3 evaluations of (LayerNorm 2*8 + Linear 8*8 + 8), head 8 + 1
    assert mlp_flops_per_molecule(model)["n_eff"] == 88 + 3 * 88 + 9
    matmul = 10 * 8 + 3 * 8 * 8 + 8  # weight matrices only
    assert mlp_flops_per_molecule(model, matmul_only=True)["n_eff"] == matmul
    x = torch.randn(5, 10)
    assert counted_flops(lambda: model(x)) == 5 * 2 * matmul
    # Backward = 2x forward, less the encoder's input gradient (the data needs none).
    train = counted_flops(lambda: model(x).sum().backward())
    assert train == 5 * (6 * matmul - 2 * 10 * 8)


def test_graph_models_have_no_per_molecule_count():
    counts, note = flops_per_item(torch.nn.Linear(2, 2))
    assert counts is None and note.startswith("n/a")


@pytest.mark.parametrize(
    "device_name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10", 125e12),
        ("Tesla V100-SXM2-16GB", None),  # no bf16 tensor cores
    ],
)
def test_peak_table(device_name, peak):
    assert peak_bf16_flops(device_name)[0] == peak


def test_mfu_is_achieved_over_peak_on_cuda_and_none_on_cpu():
    out = mfu(6e9, 1e5, "cuda", "NVIDIA A100-SXM4-40GB")
    assert out["achieved_tflops"] == pytest.approx(600.0)  # 6e9 FLOPs x 1e5 tokens/s
    assert out["mfu"] == pytest.approx(6e14 / 312e12)
    cpu = mfu(6e9, 1e5, "cpu", "cpu")
    assert cpu["mfu"] is None and cpu["achieved_tflops"] == pytest.approx(600.0)
    assert mfu(None, 1e5, "cuda", "NVIDIA H100 PCIe")["mfu"] is None


def test_bench_fields_give_train_flops_and_achieved_rate():
    from score_exp.bench.flops import bench_fields

    model = tiny_gpt(True, 4, "contractive", "euler")
    out = bench_fields(model, T, 1e6, torch.device("cpu"))
    assert out["flops_per_item"] == 105408  # 6 * 13,472 + 12 * 4 * 32 * 16
    assert out["achieved_tflops"] == pytest.approx(105408 * 1e6 / 1e12)
    assert out["mfu"] is None and out["mfu_note"] == "n/a on CPU"
    gnn = bench_fields(torch.nn.Linear(2, 2), None, 1e3, torch.device("cpu"))
    assert gnn["flops_per_item"] is None and gnn["achieved_tflops"] is None
