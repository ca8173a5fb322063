"""A SIGTERM that reaches one rank of a DDP run between two collectives: a deterministic
reproduction of the requeue deadlock of a 2-node Slurm job, and its fix.

Two real Trainers (gloo, CPU, ``tests/ddp_sigterm_probe.py``); rank 1 alone is signalled at the
end of the first validation, where rank 0 goes on into the metric sync. With Lightning's own
handler (a ``dist.broadcast`` inside the signal handler) rank 1's broadcast is paired with rank
0's sync: the ranks' collectives go out of step and the run ends differently on each rank (on
Slurm, with both ranks signalled at different points: a hang until SIGKILL). With
:func:`score_exp.tasks.distributed.stop_ranks_together` both ranks stop at the same batch.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
from conftest import REPO, cli_env

pytestmark = pytest.mark.slow


def two_ranks(handler: str) -> tuple[dict[int, str], float]:
    port = str(random.randint(20000, 40000))
    env = cli_env(OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "ddp_sigterm_probe.py"), str(r), port, handler],
            cwd=REPO / "tests",
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    ended = {}
    for r, p in enumerate(procs):
        out, err = p.communicate(timeout=180)
        lines = [ln for ln in out.splitlines() if ln.startswith(f"rank {r}: ")]
        assert lines, f"rank {r} said nothing: {err[-2000:]}"
        ended[r] = lines[0].split(": ", 1)[1]
    return ended, time.monotonic() - t0


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_batch():
    ended, elapsed = two_ranks("ours")
    assert ended[0] == ended[1] == "SIGTERMException at epoch 1 step 4", ended
    print(f"\nSIGTERM on rank 1, stop_ranks_together: {ended} in {elapsed:.1f} s")


def test_lightnings_own_sigterm_handler_puts_the_ranks_collectives_out_of_step():
    """The bug, kept as a test: when it fails, Lightning no longer broadcasts inside its handler
    (or pairs the collectives otherwise) and ``stop_ranks_together`` may be reconsidered."""
    ended, elapsed = two_ranks("lightning")
    # Rank 1 stops, rank 0 (never signalled) loses its peer inside a collective.
    assert ended[1].startswith("SIGTERMException"), ended
    assert not ended[0].startswith("SIGTERMException") and "RuntimeError" in ended[0], ended
    print(f"\nSIGTERM on rank 1, Lightning's handler: {ended} in {elapsed:.1f} s")
