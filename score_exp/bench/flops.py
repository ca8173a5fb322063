"""Model FLOPs per token (or molecule), device peak throughput and model FLOPs utilisation (MFU).

MFU (PaLM, appendix B; nanoGPT's ``estimate_mfu``) is the FLOPs the model needs per item times
the items per second, over the device's peak. The count follows COMPUTE, not parameters: a
shared block holds its parameters once but is evaluated ``nfe`` times per forward, so it costs
``nfe`` times its matmuls. With

* ``N_eff = N_outside_depth + nfe * N_block``: parameters touched per forward, each block
  counted once per evaluation of ``F`` (``N_outside_depth`` is nanoGPT's non-embedding count:
  the tied ``wte``/``lm_head`` matrix in, the position table out; a stacked depth of ``steps``
  blocks and ``nfe = steps`` gives back nanoGPT's ``N`` exactly),
* ``T`` the sequence length and ``C`` the width,

one token costs ``2 * N_eff + 4 * nfe * T * C`` FLOPs forward (a multiply-add is 2 FLOPs; each
weight does one multiply-add per token; attention's ``Q K^T`` and ``A V`` are ``2 T C`` each per
evaluation of ``F``, counted without the causal mask's saving, as nanoGPT and PaLM do) and
three times that to train (the backward pass costs twice the forward):
``6 * N_eff + 12 * nfe * T * C`` -- nanoGPT's ``6N + 12 L T C`` with ``L = nfe``, not ``n_layer``.

Left out, as in nanoGPT: the update rule's axpy (``O(C)`` per token and step), softmax, norms
and activations; their parameters (norm gains, biases) are in ``N_eff`` by convention.
The MLP regressor counts the same way per molecule: ``6 * N_eff``. The GNN's cost depends on
each batch's atoms and bonds, so no per-molecule constant exists: "n/a".
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

# bf16 dense (no 2:4 sparsity) tensor-core peak per GPU, in FLOP/s, from NVIDIA's datasheets
# (the "with sparsity" figures halved). First match wins: specific names before general ones.
PEAK_BF16_FLOPS: list[tuple[str, float, str]] = [
    (r"H100.*PCIe", 756e12, "H100 PCIe (datasheet: 1,513 TFLOPS with sparsity)"),
    (r"H100.*NVL", 835e12, "H100 NVL (datasheet: 1,671 TFLOPS with sparsity)"),
    (r"H100|GH200", 989e12, "H100 SXM5 / GH200 (datasheet: 1,979 TFLOPS with sparsity)"),
    (r"H200.*NVL", 835e12, "H200 NVL (datasheet: 1,671 TFLOPS with sparsity)"),
    (r"H200", 989e12, "H200 SXM (datasheet: 1,979 TFLOPS with sparsity)"),
    (r"A100", 312e12, "A100 SXM4 / PCIe (datasheet: 312 TFLOPS dense)"),
    (r"L40S", 362e12, "L40S (datasheet: 733 TFLOPS with sparsity)"),
    (r"\bL4\b", 121e12, "L4 (datasheet: 242 TFLOPS with sparsity)"),
    (r"\bA10\b", 125e12, "A10 (datasheet: 250 TFLOPS with sparsity)"),
]


def peak_bf16_flops(device_name: str) -> tuple[float | None, str]:
    """The bf16 dense peak (FLOP/s) of a GPU from its ``torch.cuda.get_device_name``.

    Returns:
        ``(peak, what)``: ``what`` names the table row used, or says why there is none.
    """
    for pattern, peak, what in PEAK_BF16_FLOPS:
        if re.search(pattern, device_name):
            return peak, what
    return None, f"no bf16 peak on record for {device_name!r} (see score_exp/bench/flops.py)"


def effective_params(
    model: nn.Module, exclude: tuple[nn.Parameter, ...] = (), matmul_only: bool = False
) -> int:
    """``N_eff``: parameters outside the depth once, the depth's blocks once per evaluation of F.

    Args:
        model: a model with a ``depth`` (:class:`~score_exp.core.RecurrentDepth`) attribute.
        exclude: parameters left out of the count (e.g. the GPT's position table).
        matmul_only: count weight matrices only (no biases or norm gains): the parameters
            that take part in matmuls, as ``FlopCounterMode`` sees them.
    """

    def size(params) -> int:
        return sum(p.numel() for p in params if not matmul_only or p.dim() >= 2)

    depth = model.depth
    skip = {id(p) for p in exclude} | {id(p) for p in depth.parameters()}
    outside = size(p for p in model.parameters() if id(p) not in skip)  # tied tensors once
    blocks = list(depth.blocks)
    per_block = size(blocks[0].parameters())
    if any(size(b.parameters()) != per_block for b in blocks):
        raise ValueError("the depth's blocks differ in size; N_eff needs identical blocks")
    # Stacked: block l is evaluated nfe / steps times (once for Euler), shared: nfe times.
    return outside + depth.nfe * per_block


def gpt_flops_per_token(
    model: nn.Module, seq_len: int, matmul_only: bool = False
) -> dict[str, int]:
    """nanoGPT's FLOPs per token of a :class:`~score_exp.models.GPT` at sequence length ``seq_len``.

    Args:
        matmul_only: ``N_eff`` without norm gains and biases (see :func:`effective_params`).

    Returns:
        ``{"forward": 2 N_eff + 4 nfe T C, "train": 6 N_eff + 12 nfe T C, "n_eff": N_eff}``.
    """
    n_eff = effective_params(model, exclude=(model.wpe.weight,), matmul_only=matmul_only)
    attn = model.depth.nfe * seq_len * model.n_embd
    return {"forward": 2 * n_eff + 4 * attn, "train": 6 * n_eff + 12 * attn, "n_eff": n_eff}


def mlp_flops_per_molecule(model: nn.Module, matmul_only: bool = False) -> dict[str, int]:
    """FLOPs per molecule of a :class:`~score_exp.models.RecurrentMLP` (``2 N_eff`` / ``6 N_eff``)."""
    n_eff = effective_params(model, matmul_only=matmul_only)
    return {"forward": 2 * n_eff, "train": 6 * n_eff, "n_eff": n_eff}


def flops_per_item(model: nn.Module, seq_len: int | None = None) -> tuple[dict | None, str]:
    """Model FLOPs per item (token or molecule) of any model of the package, or why there are none.

    Returns:
        ``(counts, note)``: ``counts`` as :func:`gpt_flops_per_token`, or None with the reason.
    """
    from score_exp.models import GPT, RecurrentMLP

    if isinstance(model, GPT):
        if seq_len is None:
            raise ValueError("a language model's FLOPs per token need the sequence length")
        return gpt_flops_per_token(model, seq_len), "6 N_eff + 12 nfe T C per token"
    if isinstance(model, RecurrentMLP):
        return mlp_flops_per_molecule(model), "6 N_eff per molecule"
    return None, (
        f"n/a for {type(model).__name__}: its FLOPs depend on each batch's atoms and bonds"
    )


def mfu(
    train_flops_per_item: float | None, items_per_s: float, device_type: str, device_name: str
) -> dict[str, Any]:
    """Achieved model FLOP/s and, on CUDA, the fraction of the bf16 dense peak.

    Returns:
        ``achieved_tflops`` (None without a count), ``mfu`` (None on CPU or an unknown GPU) and
        ``mfu_note`` saying which peak was used or why there is none.
    """
    achieved = None if train_flops_per_item is None else train_flops_per_item * items_per_s
    if device_type != "cuda":
        return {"achieved_tflops": _tera(achieved), "mfu": None, "mfu_note": "n/a on CPU"}
    peak, what = peak_bf16_flops(device_name)
    value = None if achieved is None or peak is None else achieved / peak
    return {"achieved_tflops": _tera(achieved), "mfu": value, "mfu_note": what}


def _tera(x: float | None) -> float | None:
    return None if x is None else x / 1e12


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts while ``fn()`` runs."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def bench_fields(model: nn.Module, seq_len: int | None, items_per_s: float, device) -> dict:
    """The FLOPs and MFU fields ``score-bench`` prints beside a variant's throughput."""
    import torch

    counts, note = flops_per_item(model, seq_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    train = None if counts is None else counts["train"]
    return {
        "flops_per_item": train,
        "flops_note": note,
        **mfu(train, items_per_s, device.type, name),
    }
