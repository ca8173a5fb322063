"""Numerics modes: which CPU kernels a run's arithmetic goes through (``configs/numerics/``).

The same code, seed and data give other bits on another x86 CPU, because torch picks its kernels
by the CPU: ATen's vectorised kernels by the widest ISA the CPU has (AVX512, AVX2, none), and
MKL's BLAS (torch's CPU wheel links MKL for matmul: ``torch.__config__.show()``) its own code
branch per CPU. Different kernels sum in other orders, so the rounding differs, and the training
trajectory drifts (0.01-0.09 RMSE on MoleculeNet runs between an AMD EPYC and an Intel Xeon).

``numerics=portable`` fixes every such choice to one that any x86-64 CPU runs identically:

- ``ATEN_CPU_CAPABILITY=default``: ATen's non-vectorised kernels (no AVX2/AVX512 variants);
- ``MKL_CBWR=COMPATIBLE``: MKL's conditional-numerical-reproducibility branch that runs alike on
  every x86-64 CPU (on an AMD CPU MKL honours COMPATIBLE only: AVX2/AVX512 fall back to AUTO);
- one thread (``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = 1, ``torch.set_num_threads(1)``): a
  parallel reduction's order depends on the thread count;
- oneDNN (``torch.backends.mkldnn``) off and ``ONEDNN_MAX_CPU_ISA=SSE41`` for any path that still
  reaches it, deterministic algorithms on.

When torch reads them (measured on torch 2.13, see ``scripts/numerics_table.py``):
``ATEN_CPU_CAPABILITY`` at the first dispatched kernel (importing Lightning or PyG already
dispatches one), ``MKL_CBWR`` at MKL's first call. So they are environment variables that must
be set before torch computes anything: :func:`enter` does it at the very start of an entry point
(before Hydra composes the config, before Lightning is imported), and when this process has
already committed to other kernels it re-executes itself with the fixed environment. Whatever
the user's environment says, the mode wins. :func:`apply` then checks, inside the run, that
the kernels in use are the mode's (a run that cannot get them is refused, never mislabelled),
sets the threads and flags, and returns what ``results.json`` records (``numerics``).

``numerics=default`` (the default) changes nothing: the machine's fastest kernels, numbers that
are bit-identical on one machine only. It does pin each run to the thread count (and oneDNN
switch) its process started with, so a run's bits never depend on what ran before it in the same
process (a Hydra multirun's earlier job, a test calling ``train`` twice). Its config keys stay out of a run's fingerprint, so run
folders made before numerics modes existed keep their identity; a portable run's identity holds
``numerics.*``.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path
from typing import Any

from score_exp.errors import ConfigError

#: The environment of the portable mode: set before torch computes anything.
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_CBWR": "COMPATIBLE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
}
#: The environment variables a run records (what chooses its kernels), in every mode.
RECORDED_ENV = (*PORTABLE_ENV, "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE", "DNNL_MAX_CPU_ISA")
MODES = ("default", "portable")
#: Marks a process that :func:`enter` re-executed (it never re-executes twice).
REEXEC_MARK = "SCORE_NUMERICS_REEXEC"
#: MKL's ``mkl_cbwr_get(MKL_CBWR_BRANCH)`` values (mkl_cbwr.h).
MKL_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1",
                8: "SSE4_2", 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512",
                13: "AVX512_MIC_E1", 14: "AVX512_E1"}  # fmt: skip
_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class NumericsError(ConfigError):
    """The run asks for a numerics mode that this process cannot give it."""


# ----------------------------------------------------------------------------- the mode asked


def requested_mode(argv: list[str], config_dir: Path = _CONFIG_DIR) -> str | None:
    """The mode a command line asks for, before Hydra composes it: ``numerics=<mode>`` (the last
    one wins, a sweep ``numerics=a,b`` counts as portable when any value is), else the
    ``numerics`` that the ``experiment=<name>`` file chooses (``override /numerics: portable``).
    None: nothing asked (the default mode)."""
    mode = None
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "numerics" and value:
            values = [v.strip() for v in value.split(",")]
            mode = "portable" if "portable" in values else values[-1]
    if mode is not None:
        return mode
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "experiment" and value:
            for name in value.split(","):
                if (
                    _experiment_mode(config_dir / "experiment" / f"{name.strip()}.yaml")
                    == "portable"
                ):
                    return "portable"
    return None


def _experiment_mode(path: Path, seen: int = 0) -> str | None:
    """``override /numerics: <mode>`` in an experiment file (or in the experiments it includes)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if m := re.search(r"^\s*-\s*override\s+/numerics\s*:\s*(\w+)", text, re.M):
        return m.group(1)
    for inc in re.findall(r"^\s*-\s*(?:override\s+)?/?experiment/?\s*:?\s*(\w+)\s*$", text, re.M):
        if seen < 5 and (mode := _experiment_mode(path.parent / f"{inc}.yaml", seen + 1)):
            return mode
    return None


# ----------------------------------------------------------------------------- entry


def enter(argv: list[str] | None = None) -> None:
    """At an entry point's start: give this process (and the processes it starts) the kernels of
    the mode its command line asks for. Portable: set :data:`PORTABLE_ENV` over the user's
    environment; when torch has already committed to other kernels, re-execute this command
    with the fixed environment (once). The default mode: nothing."""
    argv = sys.argv[1:] if argv is None else argv
    if requested_mode(argv) != "portable":
        return
    os.environ.update(PORTABLE_ENV)
    if mismatches() and not os.environ.get(REEXEC_MARK):
        os.environ[REEXEC_MARK] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *_this_command()])


def _this_command() -> list[str]:
    """This process's command after the interpreter: ``-m <module> args`` when it runs a module
    (``python -m``, or a module run by runpy), else the script (a console script) and args."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name.removesuffix(".__main__")
        return ["-m", name, *sys.argv[1:]]
    return [sys.argv[0], *sys.argv[1:]]


def mismatches() -> list[str]:
    """What in this process's kernels differs from the portable mode's (empty: all as asked).

    Asking fixes the answer: torch computes its CPU capability on this call when it has not yet
    (from the environment, which :func:`enter` has set by then), MKL reads ``MKL_CBWR`` likewise.
    """
    out = []
    cap = cpu_capability()
    if cap != "DEFAULT":
        out.append(f"ATen kernels {cap} (wanted DEFAULT: ATEN_CPU_CAPABILITY=default)")
    branch = mkl_branch()
    if branch not in (None, "COMPATIBLE"):
        out.append(f"MKL branch {branch} (wanted COMPATIBLE: MKL_CBWR=COMPATIBLE)")
    return out


def cpu_capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def mkl_branch() -> str | None:
    """MKL's conditional-numerical-reproducibility branch in this process; None without MKL."""
    import torch

    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return "unknown"
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    value = get(1)  # MKL_CBWR_BRANCH
    return MKL_BRANCHES.get(value, str(value))


# ----------------------------------------------------------------------------- in the run


def apply(numerics: Any) -> dict[str, Any]:
    """Inside a run, before the model is built: check and set the mode's numerics; returns the
    record of them (``results.json``'s ``numerics``).

    Args:
        numerics: the run's ``numerics`` config (``mode``, ``threads``); None = default mode.

    Raises:
        NumericsError: portable asked, but the process runs other kernels (its environment was
            set after torch started and it could not re-execute: call :func:`enter` first).
    """
    import torch

    mode = str((numerics or {}).get("mode", "default"))
    if mode not in MODES:
        raise NumericsError(f"numerics.mode={mode!r} is not one of {', '.join(MODES)}")
    threads, mkldnn = _process_defaults()  # read before any run of this process changes them
    if mode == "portable":
        if bad := mismatches():
            raise NumericsError(
                "numerics=portable, but this process already runs other kernels: "
                + "; ".join(bad)
                + ". score-train and score-tune set them before torch starts; elsewhere set "
                + " ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items())
                + " before Python starts"
            )
        torch.set_num_threads(int(numerics.get("threads", 1)))
        torch.backends.mkldnn.enabled = False
        torch.use_deterministic_algorithms(True)
    else:
        # The machine's kernels, at this process's own thread count and oneDNN setting: never
        # what an earlier run in this process left (a portable run's one thread, Lightning's DDP
        # launcher's cpus/processes), as the bits of a reduction depend on the thread count.
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = mkldnn
    return record(mode)


_DEFAULTS: tuple[int, bool] | None = None


def _process_defaults() -> tuple[int, bool]:
    """This process's intra-op thread count and oneDNN switch as its first run found them (torch's
    default: ``OMP_NUM_THREADS``, else the machine's cores; or what the caller set before)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        import torch

        _DEFAULTS = (torch.get_num_threads(), bool(torch.backends.mkldnn.enabled))
    return _DEFAULTS


def record(mode: str) -> dict[str, Any]:
    """What chose this process's kernels: mode, ATen capability, MKL branch, threads, env, CPU."""
    import torch

    return {
        "mode": mode,
        "cpu_capability": cpu_capability(),
        "mkl_branch": mkl_branch(),
        "threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.enabled),
        "env": {k: os.environ[k] for k in RECORDED_ENV if k in os.environ},
        "cpu": cpu_model(),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def identity_keys(identity: dict[str, Any]) -> dict[str, Any]:
    """A run identity without its ``numerics.*`` keys when the mode is the default (runs made
    before modes existed ran the default mode and keep their fingerprint)."""
    if identity.get("numerics.mode", "default") != "default":
        return identity
    return {k: v for k, v in identity.items() if not (k == "numerics" or k.startswith("numerics."))}
