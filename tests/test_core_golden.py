"""The core against the ORIGINAL core's numbers, to float64 rounding (see ``core_golden_cases``).

``tests/data/core_golden.json`` was written by ``tests/core_golden_cases.py`` at commit 92c1f43, before
the core was split into parts: forward outputs, gradients of every parameter and of the input,
traces, re-discretisations, adaptive halting and growth stages of every preset-like spec.

What is compared how, and why:

* float64 tensors: to a relative 1e-12 (of each element, plus 1e-12 of the tensor's largest
  entry for elements near zero). BLAS and vectorised kernels round differently per CPU: on an
  AVX-512 Xeon with MKL, 227 of the 256 tensors differed from the file's bits, all by at most
  9.2e-14 relative. The same is seen here with other kernels forced on one machine
  (``MKL_CBWR=COMPATIBLE``: 219 tensors, 8.5e-14; ``ATEN_CPU_CAPABILITY=default``: 126, 6.4e-14),
  which the tests below run in subprocesses, so the file is checked as it would be on another
  CPU. Any change of what the core computes (another formula, step size, term or order of
  steps) moves results far beyond 1e-12; what passes is a reordering that is exact in real
  arithmetic, the kind of difference another CPU makes.
* integers (the steps each sample used when halting): exactly.
* bit for bit only what is a property of the code, not of the CPU: the same cases run twice in
  one process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from core_golden_cases import load_packed, run_all, unpack

pytestmark = pytest.mark.usefixtures("float64")

GOLDEN = Path(__file__).parent / "data" / "core_golden.json"
RTOL = 1e-12  # float64 rounding of a few hundred operations, with room (measured: <= 9.2e-14)
EXACT = ("/steps_used",)  # integer outputs


def _rediscretise(depth, h, over):
    with depth.discretised(**over):
        return depth(h)


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal to float64 rounding, NaN where NaN (the contraction ratio of step 0 is NaN)."""
    got = got.double()
    if not torch.equal(got.isnan(), ref.isnan()):
        return False
    got, ref = got.nan_to_num(0.0), ref.nan_to_num(0.0)
    scale = ref.abs().max() if ref.numel() else ref.new_zeros(())
    return bool(((got - ref).abs() <= RTOL * (ref.abs() + scale)).all())


def mismatches() -> list[str]:
    """The keys whose tensors today's core does not reproduce (empty: all of them)."""
    ref = unpack(load_packed(GOLDEN))
    got = run_all(_rediscretise)
    if sorted(got) != sorted(ref):
        return [f"keys: {sorted(set(got) ^ set(ref))}"]
    return [
        k
        for k in sorted(ref)
        if not (
            torch.equal(got[k].double(), ref[k]) if k.endswith(EXACT) else _close(got[k], ref[k])
        )
    ]


def test_core_reproduces_the_original_to_float64_rounding():
    differ = mismatches()
    assert not differ, f"{len(differ)} tensors differ: {differ[:8]}"


def test_core_is_bit_identical_run_to_run():
    # Same code, same machine, same process: the same bits (nothing depends on state left over).
    a, b = run_all(_rediscretise), run_all(_rediscretise)
    assert all(torch.equal(a[k].nan_to_num(7.0), b[k].nan_to_num(7.0)) for k in a)


@pytest.mark.parametrize("env", ["MKL_CBWR=COMPATIBLE", "ATEN_CPU_CAPABILITY=default"])
def test_core_golden_holds_with_another_cpus_kernels(env):
    # Other kernels, as another CPU would pick (MKL's compatible code path, aten without SIMD):
    # the stored bits differ, the comparison holds. Where the variable means nothing (a CPU
    # without MKL), this runs the same check again.
    key, value = env.split("=")
    proc = subprocess.run(
        [sys.executable, __file__],
        env={**os.environ, key: value},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


if __name__ == "__main__":  # the check on its own, for the subprocesses above
    torch.set_default_dtype(torch.float64)
    differ = mismatches()
    print(f"{len(differ)} tensors differ: {differ[:8]}" if differ else "ok")
    sys.exit(1 if differ else 0)
