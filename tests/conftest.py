"""Shared fixtures: the real CLI in a subprocess, and composition of the real configs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import forkserver
import pytest

from score_exp.config import CONFIG_DIR as _CONFIG_DIR
from score_exp.runs.record import RunRecord

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
# The tiny run of the test suite: the default task (esol_mlp, depth=score) for 2 epochs, narrow.
TINY = ["trainer.max_epochs=2", "task.model.hidden=32"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


# One per test process, whichever way this file is imported (pytest loads it as a conftest, the
# tests import it again by name): the client lives in tests/forkserver.py.
_FORK_SERVER = forkserver.client(cli_env)


def _share_the_cores() -> None:
    """In a pytest-xdist worker: torch's threads = cores / workers (``OMP_NUM_THREADS``, for the
    commands it starts too), as Lightning does for DDP processes, unless the user set it.

    Two workers at torch's default of one thread per core ask for twice the cores: OpenMP's
    waiting threads then spin on cores the other worker needs (a tiny run took 1.6 to 2.8 times
    the CPU time at 2 threads as at 1 on the loaded 2-core VM). Every comparison of two runs in a test runs both under
    this one setting; the golden tests hold to their tolerances at any thread count.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(
        1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1) // workers
    )
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def pytest_configure(config) -> None:
    """Share the cores among the workers, and start the fork server now, so that its imports
    overlap with collection.

    Not for a run that selects only test files that run no command (``tests/test_core.py``...).
    """
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # the pytest-xdist controller runs no test: its workers start their own
    _share_the_cores()
    paths = [Path(a.split("::")[0]) for a in config.args]
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("test_*.py"))]
    if os.environ.get("SCORE_TEST_FORKSERVER", "1") != "0" and any(
        "_cli(" in f.read_text() for f in files if f.suffix == ".py"
    ):
        _FORK_SERVER.start()


# make test hands whole files to its workers (pytest-xdist --dist loadfile: a module's fixtures are
# built once) in this order, the heaviest first, so that the last file a worker starts is a short
# one (longest-first list scheduling); files not listed follow in their usual order. The order
# only balances the workers: measured CPU seconds per file, see docs/development.md.
HEAVIEST_FIRST = (
    "test_moleculenet.py",
    "test_tune.py",
    "test_gpu_check.py",
    "test_numerics.py",
    "test_sweeps.py",
    "test_compile.py",
    "test_rundir.py",
    "test_bench.py",
    "test_snapshot.py",
    "test_verify_results.py",
    "test_hostile.py",
    "test_golden.py",
    "test_refused_input.py",
    "test_train_cli.py",
    "test_bad_input.py",
    "test_gpt.py",
    "test_depth_dial.py",
    "test_ddp_sigterm.py",
    "test_generation.py",
    "test_run_folder_data.py",
    "test_first_contact.py",
    "test_concurrency.py",
    "test_loggers.py",
    "test_ponder.py",
    "test_gnn.py",
    "test_bf16.py",
    "test_claims_rules.py",
    "test_callbacks_registry.py",
    "test_core_golden.py",
    "test_beyond.py",
    "test_report.py",
    "test_mlflow_server.py",
    "test_ddp.py",
)


def pytest_collection_modifyitems(config, items) -> None:
    """The heaviest test files first (:data:`HEAVIEST_FIRST`); a stable sort, so each file's
    tests keep their order. Every xdist worker sorts its collection alike."""
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def run_cli(
    *args: str,
    module: str = "score_exp.cli.train",
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


def load_record(run_dir: Path) -> RunRecord:
    """A run folder's ``results.json``, read (and checked) as the report reads it."""
    return RunRecord.load(run_dir)


def load_results(run_dir: Path) -> dict:
    """:func:`load_record` as the JSON object of ``results.json`` (for tests that index it)."""
    return load_record(run_dir).to_dict()


def train_in_process(run_dir: Path, *overrides: str):
    """``score-train``'s train function in this process: the real configs composed by Hydra,
    then ``score_exp.cli.train.train(cfg, run_dir)``, as lightning-hydra-template's tests do.

    What ``score-train`` does around it (argument checks, Hydra's job logging into
    ``train.log``, the summary line, exit codes) is the door's, tested through the real CLI.
    Returns the run's :class:`RunRecord`; bad input raises its ``ScoreExpError``. The process
    state a run changes (environment variables Lightning sets, deterministic algorithms, the
    Hydra config singleton) is restored afterwards.
    """
    import copy

    import torch
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from score_exp.cli.train import train

    env, deterministic = dict(os.environ), torch.are_deterministic_algorithms_enabled()
    args = [f"hydra.run.dir={run_dir}", *QUIET, *overrides]
    try:
        with initialize_config_dir(
            config_dir=str(CONFIG_DIR), version_base="1.3", job_name="train"
        ):
            cfg = hydra_compose("train", overrides=args, return_hydra_config=True)
            with open_dict(cfg):  # what Hydra's run sets before it calls the task function
                cfg.hydra.runtime.output_dir = str(Path(run_dir).absolute())
            HydraConfig.instance().set_config(cfg)
            task_cfg = copy.deepcopy(cfg)
            with open_dict(task_cfg):
                del task_cfg["hydra"]
            return train(task_cfg, Path(run_dir))
    finally:
        HydraConfig.instance().cfg = None
        os.environ.clear()
        os.environ.update(env)
        torch.use_deterministic_algorithms(deterministic)


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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One finished ``TINY`` run, trained once per test session (per pytest-xdist worker) by
    the real ``score-train``, shared by every test that reads a run folder: ``(run_dir, the
    finished process)``. Read it, never change it: a test that edits a run folder (or trains
    into one) works on a copy (``shutil.copytree``)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    out = train_cli(run_dir, *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir, out


@pytest.fixture
def float64():
    """float64 as torch's default dtype for one test; the previous default is restored."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
