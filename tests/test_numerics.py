"""numerics=portable: the same bits under every kernel choice this CPU offers, whatever the
environment says (tests/numerics_probe.py: a few training steps of the real MLP and GNN in a fresh
process); the mode is recorded in results.json and in the fingerprint; a process that cannot give
the portable kernels is refused."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
from conftest import REPO, cli_env

from score_exp import numerics
from score_exp.runs.fingerprint import run_identity

PROBE = REPO / "tests" / "numerics_probe.py"
# Every kernel choice a user's environment can make here: ATen's ISA, MKL's branch, threads.
ENVS = [
    {},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"ATEN_CPU_CAPABILITY": "avx2"},
    {"ATEN_CPU_CAPABILITY": "avx512"},
    {"MKL_CBWR": "AUTO"},
    {"MKL_CBWR": "AVX2"},
    {"MKL_CBWR": "AVX512"},
    {"MKL_CBWR": "COMPATIBLE"},
    {
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_CBWR": "AVX512",
        "OMP_NUM_THREADS": "2",
        "MKL_NUM_THREADS": "2",
    },  # fmt: skip
]


def probe(mode: str, env: dict[str, str]) -> dict[str, str]:
    clean = {k: v for k, v in cli_env().items() if k not in numerics.PORTABLE_ENV}
    proc = subprocess.run([sys.executable, str(PROBE), mode], env={**clean, **env},
                          capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {line.split()[0]: line.split(None, 1)[1] for line in proc.stdout.splitlines()}


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    return probe("portable", {})


@pytest.mark.slow
@pytest.mark.parametrize("env", ENVS, ids=lambda e: ",".join(f"{k}={v}" for k, v in e.items()) or "unset")  # fmt: skip
def test_portable_mode_gives_the_same_bits_under_every_kernel_choice(env, reference):
    out = probe("portable", env)
    assert out["kernels"] == "DEFAULT COMPATIBLE 1"  # the mode won over the environment
    assert (out["mlp"], out["gnn"]) == (reference["mlp"], reference["gnn"])


@pytest.mark.slow
def test_outside_the_portable_mode_the_environment_chooses_the_kernels(reference):
    native = probe("default", {})
    aten_default = probe("default", {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"})
    assert aten_default["kernels"].split()[0] == "DEFAULT"
    assert probe("default", {"MKL_CBWR": "COMPATIBLE"})["kernels"].split()[1] == "COMPATIBLE"
    if native["kernels"].split()[0] != "DEFAULT":
        # A CPU with vector kernels (every x86-64 CPU of the last decade): the machine's own
        # kernels give other bits than the portable ones, which is why the mode exists.
        assert (native["mlp"], native["gnn"]) != (reference["mlp"], reference["gnn"])


def test_the_mode_is_read_from_the_command_line_and_the_experiment(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "pub.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /task: esol_mlp\n  - override /numerics: portable\n"
    )
    (tmp_path / "experiment" / "plain.yaml").write_text("# @package _global_\nseed: 1\n")
    assert numerics.requested_mode(["numerics=portable"], tmp_path) == "portable"
    assert numerics.requested_mode(["seed=1"], tmp_path) is None
    assert numerics.requested_mode(["experiment=pub"], tmp_path) == "portable"
    assert numerics.requested_mode(["experiment=pub", "numerics=default"], tmp_path) == "default"
    assert numerics.requested_mode(["experiment=plain"], tmp_path) is None
    assert numerics.requested_mode(["-m", "numerics=default,portable"], tmp_path) == "portable"
    # The real publishing experiments ask for it.
    for name in ("claims_moleculenet_mlp_cpu", "claims_moleculenet_gnn_cpu"):
        assert numerics.requested_mode([f"experiment={name}"]) == "portable", name


def test_a_process_already_on_other_kernels_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(numerics, "mismatches", lambda: ["ATen kernels AVX2 (wanted DEFAULT)"])
    with pytest.raises(numerics.NumericsError, match="numerics=portable, but .*AVX2"):
        numerics.apply({"mode": "portable", "threads": 1})
    with pytest.raises(numerics.NumericsError, match="not one of default, portable"):
        numerics.apply({"mode": "fast"})


def test_a_default_mode_run_takes_its_process_threads_not_what_an_earlier_run_left(monkeypatch):
    """A portable run (or Lightning's DDP launcher) leaves one thread and oneDNN off in its
    process; the next default-mode run there is set back to the process's own defaults."""
    import torch

    monkeypatch.setattr(numerics, "mismatches", lambda: [])  # portable kernels, as if re-executed
    saved = (torch.get_num_threads(), torch.backends.mkldnn.enabled,
             torch.are_deterministic_algorithms_enabled())  # fmt: skip
    try:
        first = numerics.apply({"mode": "default"})
        numerics.apply({"mode": "portable", "threads": 1})
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (1, False)
        torch.set_num_threads(3)
        again = numerics.apply({"mode": "default"})
        assert (again["threads"], again["mkldnn"]) == (first["threads"], first["mkldnn"])
        assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == (
            first["threads"], first["mkldnn"])  # fmt: skip
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.mkldnn.enabled = saved[1]
        torch.use_deterministic_algorithms(saved[2])


def test_the_fingerprint_holds_a_portable_mode_and_not_the_default(tmp_path):
    base = {"seed": 0, "task": {"name": "esol_mlp"}}
    old = run_identity(base, tmp_path)  # a folder made before numerics modes
    assert run_identity({**base, "numerics": {"mode": "default"}}, tmp_path) == old
    portable = run_identity({**base, "numerics": {"mode": "portable", "threads": 1}}, tmp_path)
    assert portable["numerics.mode"] == "portable" and portable != old


@pytest.mark.slow
def test_a_portable_run_records_its_kernels(tmp_path):
    from conftest import QUIET, load_results, train_cli

    env = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "2"}
    proc = train_cli(tmp_path / "run", "numerics=portable", "task.max_epochs=1", *QUIET,
                     env=cli_env(**env))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = load_results(tmp_path / "run")["numerics"]
    assert rec["mode"] == "portable" and rec["cpu_capability"] == "DEFAULT"
    assert rec["mkl_branch"] in ("COMPATIBLE", None) and rec["threads"] == 1
    assert rec["env"]["MKL_CBWR"] == "COMPATIBLE" and rec["cpu"]
    # score-eval of that run, in the same hostile environment: it enters the run's portable mode,
    # so its row is the run's own test numbers, bit for bit, and says so.
    from conftest import run_cli

    out = run_cli(f"run_dir={tmp_path / 'run'}", module="score_exp.cli.eval", env=cli_env(**env))
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = list(csv.DictReader((tmp_path / "run" / "eval.csv").open()))
    assert row["numerics"] == "portable"
    test = load_results(tmp_path / "run")["test"]
    assert float(row["test/rmse"]) == test["rmse"] and float(row["test/mae"]) == test["mae"]
