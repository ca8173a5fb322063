"""Shared fixtures: the real CLI in a subprocess, and composition of the real configs."""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from score_exp.run import CONFIG_DIR as _CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = Path(_CONFIG_DIR)
SHARED_MIRROR = REPO.parent / "shared" / "data"

# Data tests never skip: with no mirror and no cache they fail with the registry's message.
if "SCORE_DATA_MIRROR" not in os.environ and SHARED_MIRROR.is_dir():
    os.environ["SCORE_DATA_MIRROR"] = str(SHARED_MIRROR)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

# Overrides that keep CLI tests quiet and small.
QUIET = ["trainer.enable_progress_bar=false"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


# Read when torch (or Python) starts, so a command that sets one of these differently from this
# process needs a real interpreter; everything else is read at run time (see tests/forkserver.py).
_IMPORT_TIME_ENV = ("TORCH_", "PYTORCH_", "CUDA_", "NVIDIA_", "PYTHON", "LD_", "MKL_", "KMP_")
_IMPORT_TIME_OK = ("PYTHONPATH", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


class _ForkServer:
    """Client of ``tests/forkserver.py``: one per test process, started on first use."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.lock = threading.Lock()
        self.ready = False

    def usable(self, env: dict[str, str]) -> bool:
        if os.environ.get("SCORE_TEST_FORKSERVER", "1") == "0":
            return False
        keys = set(env) | set(self.env or cli_env())
        base = self.env or cli_env()
        for k in keys:
            if (
                env.get(k) != base.get(k)
                and k.startswith(_IMPORT_TIME_ENV)
                and k not in _IMPORT_TIME_OK
            ):
                return False
        return True

    def start(self) -> None:
        """Start the server without waiting for its imports (they overlap with other tests)."""
        if self.proc is None or self.proc.poll() is not None:
            self.env, self.ready = cli_env(), False
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("forkserver.py"))],
                cwd=REPO, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip

    def _server(self) -> subprocess.Popen:
        self.start()
        if not self.ready:
            ready = self.proc.stdout.readline()
            assert ready.startswith('{"ready"'), f"fork server did not start: {ready!r}"
            self.ready = True
        return self.proc

    def run(self, module, args, cwd, env, timeout) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            proc = self._server()
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            req = {"module": module, "args": list(args), "cwd": str(cwd), "env": env,
                   "stdout": str(out), "stderr": str(err), "timeout": timeout}  # fmt: skip
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
            json.loads(proc.stdout.readline())  # forked
            reply = json.loads(proc.stdout.readline())  # gone (killed past the timeout)
            status = reply["status"]
            if reply["timed_out"]:  # as subprocess.run reports an overrun
                raise subprocess.TimeoutExpired(
                    [module, *args], timeout, out.read_text(), err.read_text()
                )
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            read = lambda p: p.read_bytes().decode(errors="replace") if p.exists() else ""  # noqa: E731
            return subprocess.CompletedProcess(
                [sys.executable, "-m", module, *args], code, read(out), read(err)
            )

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_FORK_SERVER = _ForkServer()
atexit.register(_FORK_SERVER.close)


def pytest_collection_finish(session) -> None:
    """Start the fork server early when a collected test runs a command."""
    files = {Path(str(item.fspath)) for item in session.items}
    if os.environ.get("SCORE_TEST_FORKSERVER", "1") != "0" and any(
        "_cli(" in f.read_text() for f in files if f.suffix == ".py"
    ):
        _FORK_SERVER.start()


def run_cli(
    *args: str,
    module: str = "score_exp.train",
    env: dict[str, str] | None = None,
    timeout: float = 900,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> args...`` as a user would (a fresh process, the real configs).

    The process is forked from a server that has the heavy packages imported (tests/forkserver.py);
    ``SCORE_TEST_FORKSERVER=0`` runs every command in a new interpreter instead.
    """
    env = env or cli_env()
    if _FORK_SERVER.usable(env):
        return _FORK_SERVER.run(module, args, cwd or REPO, env, timeout)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_cli(run_dir: Path, *overrides: str, **kw) -> subprocess.CompletedProcess:
    """``score-train`` into ``run_dir`` (quiet); returns the finished process."""
    return run_cli(f"hydra.run.dir={run_dir}", *QUIET, *overrides, **kw)


def load_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def compose():
    """``compose(*overrides)`` -> the composed train config (hydra resolvers available).

    The builder's composition (``score_exp.run``: the depth schema registered), with Hydra's own
    errors left as they are.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    def _compose(*overrides: str, return_hydra_config: bool = False):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(
                "train", overrides=list(overrides), return_hydra_config=return_hydra_config
            )

    return _compose


@pytest.fixture
def float64():
    """float64 as torch's default dtype for one test; the previous default is restored."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
