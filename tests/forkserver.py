"""A fork server for the CLI tests: ``python -m <module> args...`` without paying the imports each time.

Every CLI test runs a command in a fresh process, and most of a short command's time is importing
torch, Lightning, Hydra, PyG and RDKit (about 5 s on 2 cores). This server imports them once and
then, per request, forks a child that is set up as ``python -m module args`` would be (argv, cwd,
environment, stdin/stdout/stderr, signal dispositions, ``__main__``), runs the module with
``runpy``, shuts down as the interpreter would (non-daemon threads joined, atexit handlers run) and
exits with the same status. The tests see the same process boundary, exit codes and output.

Only what is read at import time cannot follow a request's environment; ``Client.usable`` sends
``conftest.run_cli`` to a real subprocess when such a variable (e.g. ``TORCH_LOGS``) differs. ``OMP_NUM_THREADS`` is
applied with ``torch.set_num_threads`` and new ``PYTHONPATH`` entries are put on ``sys.path``.

Protocol (one JSON object per line): the client sends ``{module, args, cwd, env, stdout, stderr,
timeout}``; the server answers ``{"pid": N}`` once forked and ``{"pid": N, "status": S, "timed_out":
B}`` (``os.waitpid``'s status) when the child is gone; past ``timeout`` seconds it kills the child.
The server never runs a command itself, so it holds no state a child could see.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Everything a command imports anyway; nothing here starts a thread or touches a device.
PRELOAD = (
    "torch",
    "lightning",
    "hydra",
    "omegaconf",
    "torch_geometric",
    "rdkit.Chem",
    "scipy.stats",
    "score_exp.cli.train",
    "score_exp.cli.eval",
    "score_exp.cli.sample",
    "score_exp.bench.cli",
    "score_exp.cli.tune",
    "score_exp.report",
    "score_exp.bench.gpu_check",
    "score_exp.tasks.molecules",
    "score_exp.tasks.lm",
)


def _child(req: dict) -> None:
    """Become ``python -m req['module'] *req['args']`` and never return."""
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        for entry in reversed([p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
        import runpy

        sys.argv = [req["module"], *req["args"]]  # runpy sets argv[0] to the module's file
        # `python -m` executes a module that nothing has imported yet (runpy warns otherwise); its
        # dependencies stay imported, which is the time saved.
        sys.modules.pop(req["module"], None)
        try:
            runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # an uncaught exception, printed as the interpreter would
            import traceback

            traceback.print_exc()
            code = 1
        # The interpreter's shutdown: wait for non-daemon threads, then atexit handlers.
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code & 0xFF)


def main() -> None:
    import importlib
    import logging

    # Lightning decides at import whether its loggers propagate (only if the root logger has a
    # handler then; otherwise it adds its own and stops propagating). The doors import it after
    # Hydra has set up logging, so they see the first case: preload it under a placeholder handler.
    placeholder = logging.NullHandler()
    logging.getLogger().addHandler(placeholder)
    for name in PRELOAD:
        # a speed-up only: a command that needs a missing package fails there as it would anyway
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    logging.getLogger().removeHandler(placeholder)
    sys.stdout.write(json.dumps({"ready": os.getpid()}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()
        # Wait here, not in the client: only the parent can kill a child it has not yet reaped
        # without the risk of hitting a recycled pid.
        deadline, timed_out = time.monotonic() + float(req["timeout"]), False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if not timed_out and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                timed_out = True
            time.sleep(0.01)
        sys.stdout.write(json.dumps({"pid": pid, "status": status, "timed_out": timed_out}) + "\n")
        sys.stdout.flush()


# ----------------------------------------------------------------------------- the client

# Read when torch (or Python) starts, so a command that sets one of these differently from this
# process needs a real interpreter; everything else is read at run time.
_IMPORT_TIME_ENV = ("TORCH_", "PYTORCH_", "CUDA_", "NVIDIA_", "PYTHON", "LD_", "MKL_", "KMP_")
_IMPORT_TIME_OK = ("PYTHONPATH", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


class Client:
    """The tests' side: starts the server and runs commands in it (``conftest.run_cli``)."""

    def __init__(self, default_env) -> None:
        self.default_env = default_env  # the environment the server starts with
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.ready = False

    def usable(self, env: dict[str, str]) -> bool:
        if os.environ.get("SCORE_TEST_FORKSERVER", "1") == "0" or _cuda_machine():
            return False
        # Against this process's environment now: what a test asked for beyond the default.
        base = self.default_env()
        keys = set(env) | set(base)
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
            self.ready = False
            self.proc = subprocess.Popen(
                [sys.executable, __file__],
                cwd=Path(__file__).parents[1],
                env=self.default_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

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


def _cuda_machine() -> bool:
    """Whether this machine has a GPU: then every command gets a real interpreter.

    Importing the stack may touch the CUDA driver (``torch.cuda.is_available()`` initialises it),
    and a child forked from such a process fails its first CUDA call ("initialization error").
    """
    import torch

    return torch.cuda.is_available()


_CLIENT: Client | None = None


def client(default_env) -> Client:
    """The test process's one client (``default_env()``: the environment the server starts with)."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = Client(default_env)
        atexit.register(_CLIENT.close)
    return _CLIENT


if __name__ == "__main__":
    main()
