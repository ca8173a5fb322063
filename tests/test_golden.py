"""Behaviour preserved: tiny fixed-seed runs of every depth preset give the recorded numbers.

``tests/data/golden_presets.json`` holds the results of these exact sweeps, recorded on CPU from
commit 92c1f43 (before the builder / core refactor). A refactor that changes what a run trains
(initialisation order, the update rule, the optimiser, the data order) changes these numbers.

Integers and strings (params, nfe, steps, epochs) are compared exactly, floats to 1e-6 relative:
these are float32 trainings of 2 epochs, and another CPU's kernels round differently, a
difference that training carries on. Measured on the recording machine with other kernels
forced (``MKL_CBWR=COMPATIBLE``, ``MKL_CBWR=AVX512``, ``ATEN_CPU_CAPABILITY=default``): at most
2.2e-7 relative, so 1e-6 leaves a margin of 4.5x; the test runs once more with MKL's compatible
kernels. On the recording machine itself the numbers are the file's to the last bit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import QUIET, cli_env, run_cli

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_presets.json").read_text())["runs"]
PRESETS = "score,score025,stacked,stacked_plain,skip05,shared_residual,shared_plain"
TINY = ["trainer.max_epochs=2", "task.model.hidden=32"]
# Beyond SCORE on the same budget: rk4, ANCRe mixing and learned per-step dt (and both).
BEYOND = [
    "depth=score",
    "depth.integrator=rk4",
    "depth.connect=chain,ancre",
    "depth.learn_dt=none,per_step",
    "depth.ancre_init=0.9",
]
KEYS = ("params", "nfe", "best_val", "val", "test", "learned_dt", "connection_weights", "depth")


def _key(overrides: list[str]) -> str:
    kept = dict(o.split("=", 1) for o in overrides if not o.startswith(("trainer.", "task.model")))
    return ",".join(f"{k}={v}" for k, v in sorted(kept.items()))


def _close(a, b, path: str = "") -> None:
    """Exact for ints/strings, to 1e-6 relative for floats, recursively."""
    if isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{path}: {a} != {b} (golden)"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)} (golden)"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r} (golden)"


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernels", [{}, {"MKL_CBWR": "COMPATIBLE"}], ids=["this_cpu", "mkl_compat"]
)
def test_every_preset_reproduces_the_recorded_numbers(tmp_path, kernels):
    env = cli_env(OMP_NUM_THREADS="1", **kernels)
    runs = {}
    for name, overrides in (("presets", [f"depth={PRESETS}"]), ("beyond", BEYOND)):
        sweep = tmp_path / name
        out = run_cli("-m", *overrides, *TINY, *QUIET, f"hydra.sweep.dir={sweep}", env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        for results in sweep.glob("*/results.json"):
            r = json.loads(results.read_text())
            assert r["status"] == "ok", r
            runs[_key(r["overrides"])] = {k: r[k] for k in KEYS if k in r}
    assert runs.keys() == GOLDEN.keys()
    for key, golden in GOLDEN.items():
        _close(runs[key], golden, key)
