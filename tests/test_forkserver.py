"""The CLI tests' fork server (tests/forkserver.py) behaves as a new interpreter would."""

from __future__ import annotations

import subprocess
import sys

import forkserver
import pytest
import torch
from conftest import _FORK_SERVER, REPO, cli_env, run_cli

# On a GPU machine every command gets a real interpreter (see the last test), so there is no
# server to test: these run in CI, which has no GPU.
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="no fork server on a GPU machine")


@pytest.mark.slow  # one command in a new interpreter (5 s)
def test_a_forked_command_exits_and_prints_as_a_new_interpreter_does(tmp_path):
    args = (f"hydra.run.dir={tmp_path / 'run'}", "seed=abc")
    forked = run_cli(*args)
    real = subprocess.run(
        [sys.executable, "-m", "score_exp.cli.train", *args], cwd=REPO, env=cli_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert forked.returncode == real.returncode == 2
    assert forked.stderr.strip().splitlines()[-1] == real.stderr.strip().splitlines()[-1]
    assert "RuntimeWarning" not in forked.stderr  # runpy ran a module nothing had imported


@no_gpu
def test_an_overrunning_command_is_killed_and_reported_as_a_timeout():
    assert _FORK_SERVER.usable(cli_env())
    with pytest.raises(subprocess.TimeoutExpired):  # a server that never exits by itself
        run_cli("0", "--bind", "127.0.0.1", module="http.server", timeout=1)
    assert run_cli("--help").returncode == 0  # the server still serves


@no_gpu
def test_an_import_time_variable_gets_a_real_interpreter():
    assert not _FORK_SERVER.usable(cli_env(TORCH_LOGS="recompiles"))
    assert _FORK_SERVER.usable(cli_env(OMP_NUM_THREADS="1", SCORE_EXP_TRUSTED_TARGETS="x."))


def test_a_gpu_machine_gets_real_interpreters(monkeypatch):
    # A child forked from a process that touched the CUDA driver fails its first CUDA call
    # ("initialization error"): seen on an H200 in the CLI test of tests/test_cuda.py.
    monkeypatch.setattr(forkserver, "_cuda_machine", lambda: True)
    assert not _FORK_SERVER.usable(cli_env())
